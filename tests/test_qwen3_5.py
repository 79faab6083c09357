"""What is special about Qwen3.5: a hybrid language model whose linear-attention layers carry every earlier
position in a recurrent state and a convolution window, sites per layer kind, and a byte-level tokenizer.

The family contract (tests/test_family_contract.py) runs prompts shorter than one delta-rule chunk, where the
fast engine's linear-attention layers start from position 0; here the prompt is long enough (a 96×96 image:
144 image tokens) that rows resume after one and two chunk boundaries, from the corrupt run's states there.
"""

import numpy as np
import pytest
import torch
from toy_adapters import QUESTION, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import Patch
from notice.flow.knockout import knocked_logits
from notice.flow.knockout_suffix import Knockout
from notice.method.screen import image_effects
from notice.patching import fast, reference
from notice.patching.attribution import IMAGE_SITE, attribution_estimates
from notice.patching.fast_qwen3_5 import DELTA_RULE_CHUNK, Qwen35Fast
from notice.patching.hooks import capture
from notice.patching.query_keys import has_attention_taps, qk_sites
from notice.patching.sites import all_sites, check_patch, default_patches, site_layers

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def adapter():
    """The tiny model with slowly decaying linear-attention states (a state forgets ~0.2-0.5% a step, as a trained
    model's long-memory heads do; random weights forget within a few steps) and a linear-attention output three
    times the random one, so what the states carry reaches the answer."""
    adapter = tiny_adapter("qwen3_5", seed=3, max_pixels=96 * 96)
    with torch.no_grad():
        for layer in adapter.linear_attention_layers:
            adapter.layers[layer].linear_attn.A_log.fill_(-6.0)
            adapter.layers[layer].linear_attn.out_proj.weight.mul_(3.0)
    return adapter


@pytest.fixture(scope="module")
def long_inputs(adapter):
    """(clean, corrupt): SIP on a 96×96 image, a prompt of more than two delta-rule chunks."""
    prompt = adapter.format_prompt(QUESTION)
    clean, corrupt = (adapter.prepare(noise_image(seed, size=96), prompt) for seed in (0, 1))
    assert clean.input_ids.shape[1] > 2 * DELTA_RULE_CHUNK
    return clean, corrupt


def long_patches(adapter, inp) -> list[Patch]:
    """mlp / layer in every layer and self_attn (and a head) in the full-attention layers, at positions before,
    inside and after the image, past the chunk boundaries and at the last position."""
    T = inp.input_ids.shape[1]
    positions = [3, DELTA_RULE_CHUNK + 5, 2 * DELTA_RULE_CHUNK - 1, 2 * DELTA_RULE_CHUNK + 2, T - 4, T - 1]
    patches = [
        Patch(site, layer, p)
        for site in ("mlp", "layer", "self_attn")
        for layer in site_layers(adapter, site)
        for p in positions
    ]
    return patches + [Patch("self_attn_head", layer, T - 1, 1) for layer in site_layers(adapter, "self_attn_head")]


def test_default_patch_set_has_self_attention_in_full_attention_layers_only(adapter, long_inputs):
    clean, _ = long_inputs
    full, linear = adapter.full_attention_layers, adapter.linear_attention_layers
    assert full == [1, 3] and linear == [0, 2]
    patches = default_patches(adapter, clean, adapter.option_token_id("red"))
    layers = {site: {p.layer for p in patches if p.site == site} for site in ("mlp", "self_attn", "self_attn_head")}
    assert layers == {"mlp": {0, 1, 2, 3}, "self_attn": {1, 3}, "self_attn_head": {1, 3}}
    assert sorted(all_sites(adapter)) == [
        ("mlp", 0),
        ("mlp", 1),
        ("mlp", 2),
        ("mlp", 3),
        ("self_attn", 1),
        ("self_attn", 3),
    ]
    with pytest.raises(ValueError, match="layer 0 has no self_attn \\(its sites: mlp\\)"):
        check_patch(adapter, Patch("self_attn_head", 0, 5, 0), clean.input_ids.shape[1])
    with pytest.raises(ValueError, match="layer 2 is a linear-attention layer"):
        adapter.site_module("self_attn", 2)


def test_fast_equals_reference_past_chunk_boundaries(adapter, long_inputs):
    clean, corrupt = long_inputs
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = long_patches(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, batch_size=8)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= RTOL
    assert max(abs(r["logit_diff"] - r["ld_corrupt"]) for r in expected) > 1e-2


class ZeroStates(Qwen35Fast):
    """The mechanism ignored: linear-attention layers resume from zero states at the chunk boundary."""

    def states_at(self, boundary):
        return {
            layer: (torch.zeros_like(c), torch.zeros_like(r)) for layer, (c, r) in super().states_at(boundary).items()
        }


def test_rows_that_ignore_the_recurrent_state_are_far_off(adapter, long_inputs):
    clean, corrupt = long_inputs
    T = clean.input_ids.shape[1]
    patches = [Patch("mlp", 0, T - 1), Patch("mlp", 2, 2 * DELTA_RULE_CHUNK + 2), Patch("self_attn", 1, T - 4)]
    _, acts = capture(adapter, clean, [(p.site, p.layer) for p in patches])
    expected = torch.stack([reference.run_patched(adapter, corrupt, p, acts) for p in patches])
    scale = expected.abs().max()
    real = Qwen35Fast(adapter, clean, corrupt)
    assert all(real.state_start(p.position) > 0 for p in patches)
    assert ((real.run_rows(patches) - expected).abs().max() / scale).item() <= RTOL
    wrong = ZeroStates(adapter, clean, corrupt)
    assert ((wrong.run_rows(patches) - expected).abs().max() / scale).item() > 1e-2


def test_the_byte_level_tokenizer_keeps_answer_words_apart(adapter):
    tokenizer = adapter.processor.tokenizer
    assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"
    options = ["red", "green", "blue", "yellow", "circle", "square"]
    ids = [adapter.option_token_id(option) for option in options]
    assert len(set(ids)) == len(options)
    for option, token in zip(options, ids):
        # After the closed thinking block's newlines the answer has no leading space; either way one token.
        assert tokenizer.decode([token]) == option
        assert len(tokenizer(" " + option)["input_ids"]) == 1
        assert tokenizer.decode(tokenizer(" " + option)["input_ids"]) == " " + option
    assert adapter.prompt_template.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_knockout_refuses_with_the_reason_and_the_attention_stage_reads_the_full_attention_layers(adapter, long_inputs):
    with pytest.raises(NotImplementedError, match="layers \\[0, 2\\] are linear attention"):
        adapter.attention_blocks({}, {})
    # Knockout refuses on either engine (the rows' attention goes through `attention_blocks`).
    clean, _ = long_inputs
    T = clean.input_ids.shape[1]
    own = torch.zeros(T, T, dtype=torch.bool)
    own[T - 1, 5] = True  # the last position does not read position 5
    row = Knockout(layer_start=1, window=1, own=own)
    for engine in ("fast", "reference"):
        with pytest.raises(NotImplementedError, match="attention knockout needs"):
            knocked_logits(adapter, clean, [row], engine=engine)
    # Attention patterns, head functions and the screen's query/key taps: the full-attention layers' heads.
    assert adapter.fusion_layers() == adapter.full_attention_layers == [1, 3]
    assert adapter.fusion_attention_modules() == [adapter.layers[1].self_attn, adapter.layers[3].self_attn]
    assert has_attention_taps(adapter)


@pytest.mark.parametrize("method", ["atp", "atp_star"])
def test_the_attribution_screen_covers_each_site_in_its_layers(adapter, long_inputs, method):
    clean, corrupt = long_inputs
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    estimates = attribution_estimates(adapter, clean, corrupt, tau, tau_p, method=method)
    taps = qk_sites(adapter)
    stream = {key for key in estimates.values if key[0] not in (IMAGE_SITE, *taps)}
    assert stream == {("mlp", layer) for layer in range(4)} | {
        (site, layer) for site in ("self_attn", "self_attn_head") for layer in (1, 3)
    }
    assert {key for key in estimates.values if key[0] in taps} == {(site, layer) for site in taps for layer in (1, 3)}
    effects = image_effects(adapter, estimates, clean)
    assert effects is not None and effects.shape == (4, len(adapter.image_grid(clean).keys))
    # A linear-attention layer's image effect is its MLP's; a full-attention layer's adds its self-attention's.
    keys = list(adapter.image_grid(clean).keys)
    np.testing.assert_allclose(effects[0], estimates.values[("mlp", 0)].numpy()[keys])
    both = estimates.values[("mlp", 1)].numpy() + estimates.values[("self_attn", 1)].numpy()
    np.testing.assert_allclose(effects[1], both[keys])
