"""SD-inpainting SIP on a tiny random inpainting pipeline built here, saved and loaded back offline."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_inpainting import tiny_inpaint_pipeline_dir

from notice.data.inpainting import (
    DEFAULT_MODEL,
    InpaintSettings,
    MaskSpec,
    box_mask,
    composite,
    inpaint,
    inpaint_prompt,
    inpaint_samples,
    load_inpaint_pipeline,
)
from notice.files.hub import ModelNotFoundError, resolve_inpaint_model
from notice.files.tables import IMAGE_POOL_COLUMNS

SETTINGS = InpaintSettings(steps=2, guidance=8.0, size=32)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    # One thread: on a shared 2-core machine torch's thread pool makes these tiny convolutions 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_inpaint_pipeline(str(tiny_inpaint_pipeline_dir(tmp_path_factory.mktemp("model"))))
    torch.set_num_threads(threads)


def _clean_image(width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_loaded_pipeline_uses_ddim(pipe):
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.config.in_channels == 9


def test_output_differs_from_clean_only_inside_mask_and_is_deterministic(pipe):
    clean = _clean_image()
    mask = box_mask(*clean.size, (0.25, 0.2, 0.75, 0.8))
    first = inpaint(pipe, clean, mask, "a picture of lady cross street", 7, SETTINGS)
    second = inpaint(pipe, clean, mask, "a picture of lady cross street", 7, SETTINGS)
    other_seed = inpaint(pipe, clean, mask, "a picture of lady cross street", 8, SETTINGS)
    clean_px, out_px = np.asarray(clean), np.asarray(first)
    assert first.size == clean.size
    assert (out_px[~mask] == clean_px[~mask]).all()  # outside: pixel-identical
    assert (out_px[mask] != clean_px[mask]).any(axis=-1).mean() > 0.5  # inside: repainted
    assert (np.asarray(second) == out_px).all()
    assert (np.asarray(other_seed)[mask] != out_px[mask]).any()


def test_composite_keeps_clean_pixels_outside_mask():
    clean = _clean_image(8, 6)
    generated = Image.new("RGB", (16, 16), (1, 2, 3))
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:4, 3:6] = True
    out = np.asarray(composite(clean, generated, mask))
    assert (out[~mask] == np.asarray(clean)[~mask]).all()
    assert (out[mask] == (1, 2, 3)).all()


def test_inpaint_samples_writes_pool_masks_and_exclusions(pipe, tmp_path):
    clean_path = tmp_path / "clean.png"
    _clean_image().save(clean_path)
    sample_mask_path = tmp_path / "sample_mask.png"
    sample_mask = np.zeros((30, 40), dtype=np.uint8)
    sample_mask[5:15, 10:30] = 255
    Image.fromarray(sample_mask).save(sample_mask_path)
    samples = pd.DataFrame(
        [
            dict(
                sample_id="svo_r000000_pos",
                dataset="svo",
                task="svo_subject",
                image_id="11",
                image_path=str(clean_path),
                mask_path=str(sample_mask_path),
                pool_key="svo_r000000",
                distractor="lady",
                corrupt_triplet="lady,cross,street",
            ),
            dict(
                sample_id="svo_r000001_pos",
                dataset="svo",
                task="svo_object",
                image_id="12",
                image_path=str(clean_path),
                mask_path="",
                pool_key="svo_r000001",
                distractor="road",
                corrupt_triplet="child,cross,road",
            ),
            dict(
                sample_id="svo_r000002_pos",
                dataset="svo",
                task="svo_object",
                image_id="13",
                image_path=str(clean_path),
                mask_path=str(sample_mask_path),
                pool_key="svo_r000002",
                distractor="x",
                corrupt_triplet="broken",
            ),
        ]
    )
    pool, exclusions = inpaint_samples(
        pipe, samples, tmp_path / "out", MaskSpec(source="sample"), SETTINGS, seed=0, progress=False
    )
    assert list(pool.columns) == list(IMAGE_POOL_COLUMNS)
    assert pool[["pool_key", "value"]].values.tolist() == [["svo_r000000", "lady"]]
    saved_mask = np.asarray(Image.open(pool.loc[0, "mask_path"])) > 0
    assert (saved_mask == (sample_mask > 0)).all()
    corrupt = np.asarray(Image.open(pool.loc[0, "image_path"]))
    assert (corrupt[~saved_mask] == np.asarray(_clean_image())[~saved_mask]).all()
    assert dict(zip(exclusions["sample_id"], exclusions["reason"])) == {
        "svo_r000001_pos": "the sample has no mask_path (mask source 'sample')",
        "svo_r000002_pos": "corrupt_triplet 'broken' is not 'subject,verb,object'",
    }
    assert set(exclusions["stage"]) == {"inpaint"}

    # Masks from a directory, named by image_id; a missing one is excluded with its path.
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    Image.fromarray(sample_mask[::2, ::2]).save(mask_dir / "12.png")  # other size: resized to the image
    pool, exclusions = inpaint_samples(
        pipe,
        samples.iloc[:2],
        tmp_path / "out2",
        MaskSpec(source="dir", mask_dir=str(mask_dir)),
        SETTINGS,
        seed=0,
        progress=False,
    )
    assert pool["value"].tolist() == ["road"]
    assert exclusions["reason"].tolist() == [f"mask file {mask_dir / '11.png'} not found"]


def test_prompt_is_filled_with_the_negative_triplet():
    assert (
        inpaint_prompt("lady,cross,street", "a picture of {subject} {verb} {object}")
        == "a picture of lady cross street"
    )


def test_missing_model_fails_fast_naming_model_and_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    with pytest.raises(
        ModelNotFoundError, match=r"inpainting model 'stabilityai/stable-diffusion-2-inpainting'.*HF_HOME"
    ):
        resolve_inpaint_model(DEFAULT_MODEL)
    with pytest.raises(ModelNotFoundError, match="inpainting model directory .* does not exist"):
        load_inpaint_pipeline(str(tmp_path / "no-such-dir"))
