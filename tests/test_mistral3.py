"""Mistral 3's image as the adapter reads it: rows of `[IMG]` tokens between `[IMG_BREAK]` markers on the 2×2-merged
Pixtral grid of the image at its own (resized) size, `image_sizes` reaching the tower, and the processor loaded
without torchvision (tiny random model)."""

import sys

import numpy as np
import pytest
import torch
import transformers
from toy_adapters import QUESTION, noise_image, tiny_adapter

from notice.adapters.base import ModelInput
from notice.adapters.loading import load_adapter
from notice.adapters.processors import processor_class

TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("mistral3", seed=1)


def prepared(adapter, width: int, height: int) -> ModelInput:
    return adapter.prepare(noise_image(0, size=width, height=height), adapter.format_prompt(QUESTION))


def logits(adapter, inp: ModelInput) -> torch.Tensor:
    return adapter.answer_logits(inp)


@pytest.mark.parametrize(("width", "height", "rows", "cols"), [(40, 24, 3, 4), (24, 64, 4, 2), (32, 32, 4, 4)])
def test_the_grid_is_the_img_tokens_row_by_row_the_markers_skipped(adapter, width, height, rows, cols):
    # 40×24 → 32×19 (longest edge 32), rounded up to whole 8-pixel tokens: 32×24, 3 rows of 4 tokens.
    inp = prepared(adapter, width, height)
    grid = adapter.image_grid(inp)
    assert (grid.rows, grid.cols) == (rows, cols)
    assert inp.pixel_values.shape[-2:] == (8 * rows, 8 * cols)
    first = inp.tokens.index("[INST]") + 1
    for r in range(rows):
        row = grid.keys[r * cols : (r + 1) * cols]
        start = first + r * (cols + 1)  # each earlier row is its tokens and one marker
        assert row == tuple(range(start, start + cols))
        assert {inp.tokens[k] for k in row} == {"[IMG]"}
        assert inp.tokens[start + cols] == ("[IMG_END]" if r == rows - 1 else "[IMG_BREAK]")
    # The markers are vocabulary tokens, not image features: patched text positions, outside the grid.
    markers = [p for p, t in enumerate(inp.tokens) if t in ("[IMG_BREAK]", "[IMG_END]")]
    assert len(markers) == rows
    assert set(markers) <= set(adapter.patch_positions(inp)) and not set(markers) & set(grid.keys)
    assert sorted(grid.keys) == adapter.image_positions(inp)


def test_merged_token_k_holds_the_2x2_patches_of_grid_cell_k(adapter):
    """The projector's patch merger, fed each patch's (row, col): token k = r·cols + c holds patches rows 2r, 2r+1
    and cols 2c, 2c+1, so the `[IMG]` positions in order are the grid row-major."""
    patch = adapter.model.config.vision_config.patch_size
    merger = adapter.model.model.multi_modal_projector.patch_merger
    patch_rows, patch_cols = 6, 8
    hidden = adapter.model.config.vision_config.hidden_size
    features = torch.zeros(patch_rows, patch_cols, hidden)
    features[..., 0] = torch.arange(patch_rows)[:, None].float()
    features[..., 1] = torch.arange(patch_cols)[None, :].float()
    seen = []
    handle = merger.merging_layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        merger(features.reshape(-1, hidden), torch.tensor([[patch_rows * patch, patch_cols * patch]]))
    finally:
        handle.remove()
    tokens = seen[0].reshape(-1, hidden, 4)[:, :2].transpose(1, 2)  # [tokens, 2×2 patches, (row, col)]
    cols = patch_cols // 2
    assert tokens.shape[0] == (patch_rows // 2) * cols
    for k in range(tokens.shape[0]):
        r, c = divmod(k, cols)
        assert {tuple(x) for x in tokens[k].int().tolist()} == {(2 * r + i, 2 * c + j) for i in (0, 1) for j in (0, 1)}


def test_image_sizes_of_a_non_square_image_reach_the_tower(adapter):
    inp = prepared(adapter, 40, 24)
    assert inp.extra["image_sizes"].tolist() == [[24, 32]]
    seen = {}

    def record(_module, args, kwargs):
        seen["image_sizes"] = kwargs["image_sizes"]

    handle = adapter.model.model.vision_tower.register_forward_pre_hook(record, with_kwargs=True)
    try:
        base = logits(adapter, inp)
    finally:
        handle.remove()
    assert seen["image_sizes"].tolist() == [[24, 32]]
    # Padded as a batch pads a smaller image: the tower reads only the `image_sizes` part, so nothing changes.
    padded = torch.nn.functional.pad(inp.pixel_values, (0, 16, 0, 8), value=5.0)
    torch.testing.assert_close(logits(adapter, ModelInput(**{**vars(inp), "pixel_values": padded})), base)
    # The same padded pixels read at their full size are another image (more patches than [IMG] tokens).
    wrong = ModelInput(**{**vars(inp), "pixel_values": padded, "extra": {"image_sizes": torch.tensor([[32, 48]])}})
    with pytest.raises(ValueError, match="do not match"):
        logits(adapter, wrong)


def test_the_default_prompt_has_one_bos_and_no_dated_system_prompt(adapter):
    inp = prepared(adapter, 40, 24)
    assert inp.tokens[:3] == ["<s>", "[INST]", "[IMG]"] and inp.tokens.count("<s>") == 1
    assert inp.tokens[-1] == "[/INST]" and "[SYSTEM_PROMPT]" not in inp.tokens
    # The chat template writes <s> itself and a system prompt: tokenised as rendered, <s> would come twice; the
    # chat prompt leaves it to the tokenizer.
    template = adapter.rendered_chat_template()
    assert template.startswith("<s>[SYSTEM_PROMPT]")
    tokenizer = adapter.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer(template)["input_ids"])[:2] == ["<s>", "<s>"]
    chat = adapter.chat_prompt_template()
    assert chat == template.removeprefix("<s>")
    assert tokenizer.convert_ids_to_tokens(tokenizer(chat)["input_ids"])[:2] == ["<s>", "[SYSTEM_PROMPT]"]


def test_model_view_and_mask_view_are_the_resized_image(adapter):
    image = noise_image(0, size=40, height=24)
    mask = image.convert("L").point(lambda v: 255 if v > 127 else 0)
    inp = adapter.prepare(image, adapter.format_prompt(QUESTION))
    view = adapter.model_view(inp)
    assert view.shape == (24, 32, 3)
    # 40×24 → 32×19 within the longest edge, rounded up to whole tokens: one bicubic resize to 32×24.
    assert np.array_equal(view, np.array(image.resize((32, 24), resample=3)))
    mask_view = adapter.mask_view(mask, inp)
    assert mask_view.shape == view.shape[:2]
    assert np.array_equal(mask_view, np.array(mask.convert("RGB").resize((32, 24), resample=3)).mean(-1) / 255 > 0.5)


def test_the_processor_loads_offline_without_torchvision(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # On this machine transformers itself offers only a placeholder (its module imports torchvision).
    assert getattr(transformers.PixtralProcessor, "is_dummy", False)
    cls = processor_class("PixtralProcessor")
    assert not getattr(cls, "is_dummy", False) and cls.__module__ == "transformers.models.pixtral.processing_pixtral"
    assert TORCHVISION_MODULE not in sys.modules  # the PIL stand-in was only there while the module was imported
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path))
    assert isinstance(loaded.processor, cls)
    assert type(loaded.processor.image_processor).__name__ == "PixtralImageProcessorPil"
    assert (loaded.processor.patch_size, loaded.processor.spatial_merge_size) == (4, 2)
    inp, again = prepared(adapter, 40, 24), prepared(loaded, 40, 24)
    assert torch.equal(again.input_ids, inp.input_ids) and torch.equal(again.pixel_values, inp.pixel_values)
    assert torch.equal(again.extra["image_sizes"], inp.extra["image_sizes"])
    torch.testing.assert_close(logits(loaded, again), logits(adapter, inp), rtol=1e-5, atol=1e-5)
