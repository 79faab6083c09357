"""InternVL's image as the adapter reads it: tiles and a thumbnail between `<img>` and `</img>`, the image grid on
the thumbnail's pixel-shuffled tokens (tiny random model)."""

import numpy as np
import pytest
import torch
from toy_adapters import QUESTION, noise_image, tiny_adapter


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("internvl", seed=1)


def prepared(adapter, width: int, height: int):
    return adapter.prepare(noise_image(0, size=width, height=height), adapter.format_prompt(QUESTION))


def lm_inputs(adapter, inp) -> torch.Tensor:
    """The language model's input embeddings [T, D] (image features spliced in)."""
    seen = []
    with adapter.image_key_states(lambda x: seen.append(x.clone()) or x), torch.no_grad():
        adapter.forward(inp)
    return seen[0][0]


def test_the_markers_are_patched_text_around_the_image_tokens(adapter):
    inp = prepared(adapter, 40, 24)
    image = adapter.image_positions(inp)
    assert image == list(range(image[0], image[-1] + 1))
    assert inp.tokens[image[0] - 1] == "<img>" and inp.tokens[image[-1] + 1] == "</img>"
    assert {image[0] - 1, image[-1] + 1} <= set(adapter.patch_positions(inp))


@pytest.mark.parametrize(("width", "height", "views"), [(40, 24, 3), (32, 32, 1), (24, 64, 4)])
def test_the_grid_is_the_last_view_the_thumbnail_of_a_tiled_image(adapter, width, height, views):
    inp = prepared(adapter, width, height)
    assert inp.pixel_values.shape[0] == views  # 2×1 or 1×3 tiles and the thumbnail, or one tile alone
    grid = adapter.image_grid(inp)
    assert (grid.rows, grid.cols) == (4, 4)
    # Only the last view's pixels reach the grid's keys: the tower encodes each view on its own.
    edited = inp.pixel_values.clone()
    edited[-1] += 1.0
    other = type(inp)(inp.input_ids, inp.attention_mask, edited, inp.tokens, inp.extra)
    changed = (lm_inputs(adapter, inp) != lm_inputs(adapter, other)).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(grid.keys)
    torch.testing.assert_close(
        torch.from_numpy(adapter.model_view(inp)).float(),
        torch.from_numpy(adapter.pixels_view(inp.pixel_values[-1])).float(),
    )


def test_the_grid_is_row_major_over_the_models_pixel_shuffle(adapter):
    """Token k of a view holds the 2×2 patches at rows 2r, 2r+1 and cols 2c, 2c+1 with k = r·side + c."""
    patches = 8
    labels = torch.stack(torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij"), -1).float()
    tokens = adapter.model.model.pixel_shuffle(labels[None], scale_factor=0.5).reshape(-1, 4, 2)
    side = patches // 2
    for k in range(side * side):
        r, c = divmod(k, side)
        assert {tuple(x) for x in tokens[k].int().tolist()} == {(2 * r + i, 2 * c + j) for i in (0, 1) for j in (0, 1)}


def test_the_mask_goes_through_the_same_views(adapter):
    image = noise_image(0, size=40, height=24)
    mask = image.convert("L").point(lambda v: 255 if v > 127 else 0)
    inp = adapter.prepare(image, adapter.format_prompt(QUESTION))
    view = adapter.mask_view(mask, inp)
    assert view.shape == adapter.model_view(inp).shape[:2] == (32, 32)
    thumbnail = mask.convert("RGB").resize((32, 32), resample=3)  # the processor's bicubic squash to one tile
    expected = (torch.from_numpy(np.array(thumbnail)).float().mean(-1) / 255 > 0.5).float()
    assert (torch.from_numpy(view) != expected).float().mean() < 0.02
