"""Object-token ablation (notice.flow.ablation), on a tiny random model of every family of the family table
(opt-in streams included), and its pure parts.

Ablating no token changes nothing, bit for bit; ablating every image token is its explicit recomputation (the
image tokens captured, their rows replaced by their mean by hand, the model run on that) and moves the score;
the image tokens that `image_key_states` hands over are what the model reads (token fusion: the language
model's input embeddings, text rows the token embeddings; cross-attention: the vision tower's output, or
what a decoder's cross-attention layers read); random
draws are reproducible from the seed and never hold object tokens; a mask's patches give the object's keys;
bfloat16 runs.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from toy_adapters import QUESTION, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import ImageGrid, pre_hook_while_active
from notice.families import family_names
from notice.flow.ablation import ABLATION_COLUMNS, ablation_rows, object_keys, random_keys

TAU, TAU_P = 5, 7  # arbitrary answer and distractor tokens of the tiny vocabularies
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=family_names())
def adapter(request):
    return tiny_adapter(request.param, seed=3)


def prepared(adapter):
    return adapter.prepare(noise_image(0, size=40, height=24), adapter.format_prompt(QUESTION))


def image_states(adapter, inp) -> torch.Tensor:
    """The image tokens as `image_key_states` hands them over in a clean run."""
    seen = []

    def record(states: torch.Tensor) -> torch.Tensor:
        seen.append(states.detach().clone())
        return states

    with adapter.image_key_states(record):
        adapter.answer_logits(inp)
    assert len(seen) == 1
    return seen[0]


def logit_diff(logits: torch.Tensor) -> float:
    return float(logits[TAU] - logits[TAU_P])


def test_ablating_no_token_changes_nothing_bit_for_bit(adapter):
    inp = prepared(adapter)
    rows = ablation_rows(adapter, inp, TAU, TAU_P, (), n_draws=2, seed=0)
    assert tuple(rows.columns) == ABLATION_COLUMNS
    assert rows[["ablated", "draw", "n_tokens"]].values.tolist() == [
        ["object", 0, 0],
        ["random", 0, 0],
        ["random", 1, 0],
    ]
    assert (rows.ld_ablated == rows.ld_base).all() and (rows.ld_change == 0).all()
    assert rows.ld_base.iloc[0] == logit_diff(adapter.answer_logits(inp))
    assert (rows.correct_base == (rows.ld_base > 0)).all() and (rows.correct_ablated == rows.correct_base).all()


def test_ablating_every_image_token_is_its_explicit_recomputation(adapter):
    inp = prepared(adapter)
    keys = list(adapter.image_grid(inp).keys)
    rows = ablation_rows(adapter, inp, TAU, TAU_P, keys, n_draws=0, seed=0)
    assert rows[["ablated", "draw", "n_tokens"]].values.tolist() == [["object", 0, len(keys)]]
    states = image_states(adapter, inp)
    expected = states.clone()
    for key in keys:
        expected[0, key] = states[0, keys].mean(0)
    with adapter.image_key_states(lambda s: expected):
        ld = logit_diff(adapter.answer_logits(inp))
    assert abs(rows.ld_ablated.iloc[0] - ld) <= RTOL * max(abs(ld), 1.0)
    assert rows.ld_change.iloc[0] == pytest.approx(rows.ld_ablated.iloc[0] - rows.ld_base.iloc[0])
    assert abs(rows.ld_change.iloc[0]) > 1e-3  # the model reads what was replaced


def test_the_image_tokens_handed_over_are_what_the_model_reads(adapter):
    inp = prepared(adapter)
    states = image_states(adapter, inp)
    keys = list(adapter.image_grid(inp).keys)
    with torch.no_grad():
        if adapter.head_site == "self_attn_head" and keys == list(adapter.stream_image_grid(inp).keys):
            # Token fusion: the language model's input embeddings, one row per position; text rows are tokens.
            embedded = adapter.model.get_input_embeddings()(inp.input_ids)
            text = sorted(set(range(inp.input_ids.shape[1])) - set(adapter.image_positions(inp)))
            assert states.shape == embedded.shape and torch.equal(states[:, text], embedded[:, text])
        elif adapter.family == "mllama":
            # Cross-attention layers inside the decoder: the image states each of them reads, key k at row k.
            read = []
            layer = adapter.layers[adapter.cross_attention_layers[0]]
            with pre_hook_while_active(layer, lambda _m, args, kwargs: read.append(kwargs["cross_attention_states"])):
                adapter.answer_logits(inp)
            assert torch.equal(states, read[0].reshape(states.shape))
            assert states.shape[1] == len(adapter.image_keys(inp)) and max(keys) < states.shape[1]
        else:
            # The image by cross-attention (BLIP-2's language model: through the Q-Former): the vision tower's
            # output, key k at row k (less the [CLS] row where the keys start at 0).
            vision = adapter.model.vision_model(pixel_values=inp.pixel_values)[0]
            assert torch.equal(states, vision[:, vision.shape[1] - states.shape[1] :])
            assert max(keys) == states.shape[1] - 1


def test_random_draws_are_reproducible_and_never_hold_object_tokens(adapter):
    inp = prepared(adapter)
    keys = adapter.image_grid(inp).keys
    objects = keys[: len(keys) // 4]
    first = ablation_rows(adapter, inp, TAU, TAU_P, objects, n_draws=3, seed=11)
    again = ablation_rows(adapter, inp, TAU, TAU_P, objects, n_draws=3, seed=11)
    assert first.equals(again)
    assert first.n_tokens.tolist() == [len(objects)] * 4
    assert first.ablated.tolist() == ["object", "random", "random", "random"] and first.draw.tolist() == [0, 0, 1, 2]
    draws = random_keys(keys, objects, 3, seed=11)
    assert all(set(draw) <= set(keys) - set(objects) and len(set(draw)) == len(objects) for draw in draws)
    assert len(set(draws)) > 1  # the draws differ


def test_bfloat16_runs(adapter):
    half = tiny_adapter(adapter.family, seed=3)
    half.model.to(torch.bfloat16)
    inp = prepared(half)
    keys = half.image_grid(inp).keys
    rows = ablation_rows(half, inp, TAU, TAU_P, keys[:3], n_draws=2, seed=0)
    assert len(rows) == 3 and np.isfinite(rows[["ld_base", "ld_ablated"]].to_numpy()).all()
    assert rows.ld_base.iloc[0] == logit_diff(half.answer_logits(inp))
    assert (ablation_rows(half, inp, TAU, TAU_P, (), n_draws=1, seed=0).ld_change == 0).all()


def test_a_mask_gives_the_keys_of_the_patches_it_overlaps(adapter):
    inp = prepared(adapter)
    grid = adapter.image_grid(inp)
    mask = np.zeros((24, 40), np.uint8)
    mask[:, :10] = 255  # the image's left quarter
    view = adapter.mask_view(Image.fromarray(mask), inp)
    found = object_keys(grid, view)
    on_left = [key for i, key in enumerate(grid.keys) if i % grid.cols < grid.cols / 2]
    assert found and set(found) <= set(on_left) and list(found) == sorted(found, key=grid.keys.index)


def test_object_keys_are_the_patches_with_an_object_pixel():
    grid = ImageGrid(keys=(10, 11, 12, 13, 14, 15), rows=2, cols=3)
    mask = np.zeros((4, 6), np.float32)
    mask[3, 5] = 1.0  # patch (1, 2)
    mask[0, 0] = 0.5  # not object (the threshold is > 0.5)
    assert object_keys(grid, mask) == (15,)
    mask[1, 2] = 1.0  # patch (0, 1)
    assert object_keys(grid, mask) == (11, 15)
    assert object_keys(grid, np.zeros((0, 0), np.float32)) == ()
    odd = np.zeros((5, 6), np.float32)  # not a multiple of the grid: cell edges at rounded fractions
    odd[4, 5] = 1.0
    assert object_keys(grid, odd) == (15,)


def test_random_keys_need_as_many_non_object_keys_as_object_keys():
    keys = tuple(range(8))
    assert random_keys(keys, (0, 1, 2, 3), 2, seed=0) == random_keys(keys, (0, 1, 2, 3), 2, seed=0)
    assert random_keys(keys, (), 2, seed=0) == [(), ()]
    with pytest.raises(ValueError, match="the object covers 5 of 8 image tokens"):
        random_keys(keys, (0, 1, 2, 3, 4), 1, seed=0)
    assert random_keys(keys, keys, 0, seed=0) == []  # no draws: the whole image may be the object


def test_object_keys_must_be_distinct_keys_of_the_grid():
    adapter = tiny_adapter("llava", seed=3)
    inp = prepared(adapter)
    keys = adapter.image_grid(inp).keys
    with pytest.raises(ValueError, match="distinct image keys"):
        ablation_rows(adapter, inp, TAU, TAU_P, (keys[0], keys[0]), n_draws=0, seed=0)
    with pytest.raises(ValueError, match=r"not: \[0\]"):
        ablation_rows(adapter, inp, TAU, TAU_P, (0,), n_draws=0, seed=0)
