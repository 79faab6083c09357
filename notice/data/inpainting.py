"""SIP by Stable Diffusion inpainting: generate the corrupt image from the clean one (paper, Appendix D).

The paper's settings are the defaults: ``stabilityai/stable-diffusion-2-inpainting``, DDIM scheduler,
120 steps, guidance scale 8, prompt "a picture of {subject} {verb} {object}" filled with the
NEGATIVE triplet (for an SVO-Probes sample: the triplet of the row's other image, column
``corrupt_triplet``), and a mask over the region to change.

Masks (white / non-zero = region to repaint) come from one configurable source: ``sample`` (the
samples table's ``mask_path``), ``dir`` (``<mask_dir>/<image_id>.png``, e.g. contour masks made
with a segmentation model) or ``box`` (a fixed box given as fractions of width and height). A mask
of another size than its image is resized to it (nearest neighbour).

The pipeline works at `size` x `size` pixels; its output is resized back to the clean image's size
and pasted into the clean image through the mask (``composite``): outside the mask the corrupt image
is the clean image pixel for pixel, the standard way to use inpainting output (the VAE round trip
would otherwise change every pixel slightly). Each sample's generator is seeded from (seed,
sample_id) on the CPU, so a sample's image does not depend on the other samples or on the device
type's random number generator. The mask is saved next to the image for the head-function analysis.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from notice.data import RowError
from notice.data.svo_probes import parse_triplet
from notice.files.hub import resolve_inpaint_model
from notice.files.tables import EXCLUSION_COLUMNS, IMAGE_POOL_COLUMNS, check_columns, make_table, stable_seed

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-inpainting"
PROMPT_TEMPLATE = "a picture of {subject} {verb} {object}"
STAGE = "inpaint"
MaskSource = Literal["sample", "dir", "box"]


class MaskError(ValueError):
    """A sample has no usable mask; the message is the exclusion reason."""


@dataclass(frozen=True)
class InpaintSettings:
    steps: int = 120
    guidance: float = 8.0
    size: int = 512  # working resolution of the pipeline (SD-2 inpainting was trained at 512)
    prompt_template: str = PROMPT_TEMPLATE


@dataclass(frozen=True)
class MaskSpec:
    source: MaskSource = "box"
    mask_dir: str = ""
    box: tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)  # x0, y0, x1, y1 as fractions


def load_inpaint_pipeline(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32"):
    """The inpainting pipeline with a DDIM scheduler, loaded from local files only."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    source = resolve_inpaint_model(name_or_path)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(source, dtype=getattr(torch, dtype), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def box_mask(width: int, height: int, box: Sequence[float]) -> np.ndarray:
    """Boolean mask of a box given as (x0, y0, x1, y1) fractions of the image size."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"mask box {tuple(box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    mask = np.zeros((height, width), dtype=bool)
    mask[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = True
    return mask


def load_mask_file(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (non-zero = repaint) from a PNG, resized to `size` = (width, height) if needed."""
    if not path.is_file():
        raise MaskError(f"mask file {path} not found")
    with Image.open(path) as image:
        grey = image.convert("L")
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.NEAREST)
        mask = np.asarray(grey) > 0
    if not mask.any():
        raise MaskError(f"mask {path} is empty")
    return mask


def sample_mask(mask_path: str, image_id: str, size: tuple[int, int], spec: MaskSpec) -> np.ndarray:
    if spec.source == "box":
        return box_mask(*size, spec.box)
    if spec.source == "sample":
        if not mask_path:
            raise MaskError("the sample has no mask_path (mask source 'sample')")
        return load_mask_file(Path(mask_path), size)
    if spec.source == "dir":
        return load_mask_file(Path(spec.mask_dir) / f"{image_id}.png", size)
    raise ValueError(f"unknown mask source {spec.source!r}; expected sample, dir or box")


def composite(clean: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """The generated pixels inside `mask`, the clean pixels outside it (same size as `clean`)."""
    clean_rgb = np.asarray(clean.convert("RGB"))
    generated_rgb = np.asarray(generated.convert("RGB").resize(clean.size, Image.Resampling.LANCZOS))
    return Image.fromarray(np.where(mask[..., None], generated_rgb, clean_rgb))


def inpaint(
    pipe, clean: Image.Image, mask: np.ndarray, prompt: str, seed: int, settings: InpaintSettings
) -> Image.Image:
    """The corrupt image: `clean` repainted inside `mask` following `prompt`, composited (see module doc)."""
    size = (settings.size, settings.size)
    work_image = clean.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    work_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    generated = pipe(
        prompt=prompt,
        image=work_image,
        mask_image=work_mask,
        height=settings.size,
        width=settings.size,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return composite(clean, generated, mask)


def inpaint_prompt(corrupt_triplet: str, template: str) -> str:
    triplet = parse_triplet(corrupt_triplet, "corrupt_triplet")
    return template.format(subject=triplet.subject, verb=triplet.verb, object=triplet.object)


def file_stem(sample_id: str) -> str:
    """A file name for `sample_id`: readable, and unique thanks to a short hash of the full id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[-80:]
    return f"{readable}-{hashlib.sha256(sample_id.encode('utf-8')).hexdigest()[:10]}"


def inpaint_samples(
    pipe,
    samples: pd.DataFrame,
    out_dir: str | Path,
    mask: MaskSpec,
    settings: InpaintSettings,
    seed: int,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image pool, exclusions) of SD-inpainted corrupt images for `samples`, written under `out_dir`.

    `samples` needs sample_id, dataset, task, image_id, image_path, mask_path, pool_key, distractor
    and corrupt_triplet (SVO-Probes). Pool rows: (pool_key, value = distractor) -> the generated image
    (``out_dir/images``) and its mask (``out_dir/masks``), the same contract as the dataset's own pool.
    """
    check_columns(
        samples,
        (
            "sample_id",
            "dataset",
            "task",
            "image_id",
            "image_path",
            "mask_path",
            "pool_key",
            "distractor",
            "corrupt_triplet",
        ),
        "inpaint samples",
    )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    pool, exclusions = [], []
    rows = samples.sort_values("sample_id").itertuples(index=False)
    for row in tqdm(rows, total=len(samples), desc="inpaint", file=sys.stderr, disable=not progress):
        try:
            prompt = inpaint_prompt(str(row.corrupt_triplet), settings.prompt_template)
            with Image.open(row.image_path) as opened:
                clean = opened.convert("RGB")
            region = sample_mask(str(row.mask_path), str(row.image_id), clean.size, mask)
        except (RowError, MaskError) as error:
            exclusions.append({"sample_id": row.sample_id, "stage": STAGE, "reason": str(error)})
            continue
        image = inpaint(pipe, clean, region, prompt, stable_seed(seed, row.sample_id), settings)
        stem = file_stem(str(row.sample_id))
        image_path, mask_path = out / "images" / f"{stem}.png", out / "masks" / f"{stem}.png"
        image.save(image_path, format="PNG")
        Image.fromarray(region.astype(np.uint8) * 255).save(mask_path, format="PNG")
        pool.append(
            {
                "dataset": row.dataset,
                "task": row.task,
                "pool_key": row.pool_key,
                "value": row.distractor,
                "image_path": str(image_path),
                "mask_path": str(mask_path),
            }
        )
    pool_df = make_table(pool, IMAGE_POOL_COLUMNS, {})
    duplicated = pool_df.duplicated(["dataset", "task", "pool_key", "value"], keep=False)
    if duplicated.any():
        raise ValueError(
            "inpaint: several samples share (pool_key, distractor), so one pool row cannot serve them: "
            f"{pool_df.loc[duplicated, ['pool_key', 'value']].drop_duplicates().to_dict('records')[:5]}"
        )
    return pool_df, make_table(exclusions, EXCLUSION_COLUMNS, {})
