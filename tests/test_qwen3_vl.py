"""Qwen3-VL (tiny random model): DeepStack's image features, added to the residual stream at the image positions
after the decoder's first layers, are added by the fast engines as the model adds them (the corrupt run's when
patching, the clean run's in knockouts), and a fast engine that left them out would be far off; the interleaved
multimodal RoPE positions are the model's own; the chat prompt and the default patch set."""

from contextlib import nullcontext

import pytest
import torch
from toy_adapters import QUESTION, clean_and_corrupt, one_torch_thread, tiny_adapter

from notice.adapters.base import Patch
from notice.adapters.decoder import ResidualAddition
from notice.flow.knockout import Knockout, knocked_logits
from notice.patching import fast, reference
from notice.patching.corruptions import additive_noise
from notice.patching.fast_decoder import DecoderFast
from notice.patching.sites import default_patches

TAU, TAU_P = 5, 7  # arbitrary answer and distractor tokens of the tiny vocabulary


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def adapter(request):
    return tiny_adapter(request.param, seed=2)


def additions_of(adapter, inp) -> list[ResidualAddition]:
    additions: list[ResidualAddition] = []
    with adapter.residual_additions_recorded(additions), torch.no_grad():
        adapter.forward(inp)
    return additions


def without_additions(adapter, monkeypatch):
    """The adapter as a family without DeepStack would be: its fast engines add nothing between layers."""
    monkeypatch.setattr(adapter, "residual_additions_recorded", lambda additions: nullcontext())


def test_deepstack_adds_a_feature_at_the_image_positions_after_each_of_the_first_layers(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    taps = adapter.model.config.vision_config.deepstack_visual_indexes
    assert 0 < len(taps) < adapter.n_layers  # the tiny model has layers with and without an addition
    clean_additions, corrupt_additions = additions_of(adapter, clean), additions_of(adapter, corrupt)
    assert [a.layer for a in corrupt_additions] == list(range(len(taps)))
    for a, b in zip(clean_additions, corrupt_additions):
        assert a.positions.tolist() == b.positions.tolist() == adapter.image_positions(corrupt)
        assert a.values.shape == (len(a.positions), adapter.hidden_size)
        assert float((a.values - b.values).abs().max()) > 1e-2  # another image: other features
    # The residual stream after layer 0 is its output plus the feature (the model's own arithmetic).
    seen = {}
    layers = adapter.layers
    handles = [
        layers[0].register_forward_hook(lambda _m, _a, out: seen.setdefault("output", out)),
        layers[1].register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0])),
    ]
    try:
        with torch.no_grad():
            adapter.forward(corrupt)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(corrupt_additions[0].added(seen["output"]), seen["input"])
    assert not torch.equal(seen["output"], seen["input"])


def rows_entering_at_layer_0(adapter, inp) -> list[Patch]:
    """Rows at layer 0 at the first and a middle image position: the later image positions lie in the suffix the
    fast engine recomputes, through every layer that adds a DeepStack feature. (With the default patch set under
    SIP every image position lies before the first patched position that changes anything, where the engine
    keeps the corrupt run's residual stream, DeepStack's additions included.)"""
    image = adapter.image_positions(inp)
    return [Patch(site, 0, p) for site in ("mlp", "self_attn", "layer") for p in (image[0], image[len(image) // 2])]


def ld_error(rows, expected) -> float:
    return max(abs(r["ld_patched"] - e["ld_patched"]) for r, e in zip(rows, expected))


@pytest.mark.parametrize("corruption", ["SIP", "noise"])
def test_the_fast_engine_adds_the_corrupt_runs_deepstack_features_and_would_be_far_off_without(
    adapter, corruption, monkeypatch
):
    clean, corrupt = clean_and_corrupt(adapter, corruption)
    noise = additive_noise(3.0, seed=0) if corruption == "noise" else None
    patches = rows_entering_at_layer_0(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, TAU, TAU_P, noise)
    assert all(e["ld_patched"] != e["ld_corrupt"] for e in expected)  # the rows patch something
    rows = fast.patch_sample(adapter, clean, corrupt, patches, TAU, TAU_P, noise, batch_size=4)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5
    without_additions(adapter, monkeypatch)
    wrong = fast.patch_sample(adapter, clean, corrupt, patches, TAU, TAU_P, noise, batch_size=4)
    assert ld_error(wrong, expected) > 1e-2


def test_the_knockout_engine_adds_the_clean_runs_deepstack_features(adapter, monkeypatch):
    inp, _ = clean_and_corrupt(adapter, "SIP")
    T = inp.input_ids.shape[1]
    first_image = min(adapter.image_positions(inp))
    own = torch.zeros(T, T, dtype=torch.bool)
    own[first_image - 1, 0] = True  # <|vision_start|> does not read the first token: every image position changes
    rows = [Knockout(0, 1, own), Knockout(0, adapter.n_layers, own)]
    expected = knocked_logits(adapter, inp, rows, engine="reference")
    torch.testing.assert_close(knocked_logits(adapter, inp, rows), expected, rtol=1e-5, atol=1e-5)
    without_additions(adapter, monkeypatch)
    assert float((knocked_logits(adapter, inp, rows) - expected).abs().max()) > 1e-2


def test_the_fast_engine_reuses_the_models_interleaved_multimodal_positions(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    engine = DecoderFast(adapter, clean, corrupt, None, None)
    position_ids, _ = adapter.model.model.get_rope_index(
        clean.input_ids, clean.extra["mm_token_type_ids"], clean.extra["image_grid_thw"]
    )
    image = adapter.image_positions(clean)
    assert not torch.equal(position_ids[1, 0, image], position_ids[2, 0, image])  # rows and columns of the grid
    expected_cos, _ = adapter.language_model.rotary_emb(engine.resid[0][None], position_ids)
    for layer_embeddings in engine.position_embeddings:  # every layer's, as the model gave them
        cos, _ = layer_embeddings
        torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    # Rows after the image, at its last layer included, equal the reference.
    after = [p for p in adapter.patch_positions(clean) if p > max(image)]
    patches = [Patch("mlp", layer, p) for layer in range(adapter.n_layers) for p in after]
    expected = reference.patch_sample(adapter, clean, corrupt, patches, TAU, TAU_P)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, TAU, TAU_P)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5


def test_the_chat_prompt_and_the_default_patch_set(adapter):
    inp, _ = clean_and_corrupt(adapter, "SIP")
    assert adapter.format_prompt(QUESTION).startswith("<|im_start|>user\n<|vision_start|>")  # no system turn
    image = adapter.image_positions(inp)
    assert image == list(range(image[0], image[-1] + 1))
    assert inp.tokens[image[0] - 1] == "<|vision_start|>" and inp.tokens[image[-1] + 1] == "<|vision_end|>"
    grid = adapter.image_grid(inp)
    assert grid.rows * grid.cols == len(image)
    patches = default_patches(adapter, inp, TAU)
    text = set(range(inp.input_ids.shape[1])) - set(image)
    assert {p.position for p in patches if p.head < 0} == text  # the markers are patched text positions
    assert {p.position for p in patches if p.head >= 0} == {inp.input_ids.shape[1] - 1}
    assert {p.site for p in patches} == {"mlp", "self_attn", "self_attn_head"}
