"""Prefix-LM attention (PaliGemma): a patched prefix position changes the positions before it too.

PaliGemma's processor makes every prompt token prefix (`token_type_ids` 0): attention is bidirectional
over the image and the prompt, causal over a suffix (token type 1). So a patch at a prefix position
changes, from the next layer on, the positions before it as well, and an engine that reuses the
corrupt run's keys/values before the patched position (the causal decoder engine) is wrong there.
The `prefix_lm` engine must equal the reference (the model's own forward with one hook) at every
prefix position, for PaliGemma (Gemma) and PaliGemma 2 (Gemma 2: soft-capped attention and logits,
sliding-window layers), and with a causal suffix.
"""

import random
from collections.abc import Iterator

import pytest
import torch
from toy_adapters import clean_and_corrupt, one_torch_thread, paligemma_adapter, patch_positions_with_image_samples

from notice.adapters.base import ModelInput, Patch
from notice.adapters.paligemma import PaliGemmaAdapter
from notice.patching import corruptions, fast, hooks, reference
from notice.patching.fast_decoder import DecoderFast
from notice.patching.fast_prefix_lm import PrefixLMFast

RTOL = 1e-5
SUFFIX = 4  # prompt tokens made suffix (token type 1) where a test needs a causal part
# Gemma 2 at the tiny scale: caps low enough to bend the logits, a window shorter than the prompt.
PALIGEMMA2 = dict(kind="paligemma2", layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def with_suffix(inp: ModelInput, n: int = SUFFIX) -> ModelInput:
    """`inp` with its last `n` tokens in the causal suffix (token type 1)."""
    token_type_ids = inp.extra["token_type_ids"].clone()
    token_type_ids[0, -n:] = 1
    return ModelInput(
        inp.input_ids, inp.attention_mask, inp.pixel_values, inp.tokens, {"token_type_ids": token_type_ids}
    )


def layer_outputs(adapter: PaliGemmaAdapter, inp: ModelInput, patch: Patch | None = None, clean=None) -> torch.Tensor:
    """Every layer's output [L, T, D] in one forward of `inp`, with `patch` (clean values `clean`) applied."""
    sites = [("layer", layer) for layer in range(adapter.n_layers)]
    if patch is None:
        _, acts = hooks.capture(adapter, inp, sites)
    else:
        module, kind = adapter.site_module(patch.site, patch.layer)
        value = clean[(patch.site, patch.layer)][patch.position]

        def overwrite(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[0, patch.position] = value
            return x

        with hooks.hooked(module, kind, overwrite):
            _, acts = hooks.capture(adapter, inp, sites)
    return torch.stack([acts[site] for site in sites])


def changed_positions(patched: torch.Tensor, corrupt: torch.Tensor) -> list[int]:
    return torch.nonzero((patched - corrupt).abs().amax(-1) > 1e-6).flatten().tolist()


@pytest.mark.parametrize("suffix", [False, True], ids=["all-prefix", "with-suffix"])
def test_a_paligemma_patch_reaches_the_positions_that_attend_to_it(suffix):
    adapter = paligemma_adapter(seed=3, layers=3)
    clean, corrupt = clean_and_corrupt(adapter, "STR")
    if suffix:
        clean, corrupt = with_suffix(clean), with_suffix(corrupt)
    T = clean.input_ids.shape[1]
    # A prefix position (the question's first option), or the suffix's first position.
    position = T - SUFFIX if suffix else clean.tokens.index("red")
    patch = Patch("mlp", 0, position)
    clean_acts = hooks.capture(adapter, clean, [("mlp", 0)])[1]
    patched = layer_outputs(adapter, corrupt, patch, clean_acts)
    corrupt_out = layer_outputs(adapter, corrupt)
    assert changed_positions(patched[0], corrupt_out[0]) == [position]  # in its own layer, only itself
    if suffix:
        # Causal suffix: the prefix and the suffix before it never see it.
        assert changed_positions(patched[1], corrupt_out[1]) == list(range(position, T))
        assert torch.equal(patched[:, :position], corrupt_out[:, :position])
    else:
        # Prefix: one layer later every position has read it, the image tokens and <bos> before it included.
        assert changed_positions(patched[1], corrupt_out[1]) == list(range(T))
        assert position > adapter.image_positions(clean)[-1] + 1


def every_patch(adapter: PaliGemmaAdapter, inp: ModelInput) -> list[Patch]:
    """Every site kind × layer × position (text positions and image samples), every head at every
    other position; shuffled."""
    positions = patch_positions_with_image_samples(adapter, inp)
    patches = [
        Patch(site, layer, p)
        for site in ("mlp", "self_attn", "layer")
        for layer in range(adapter.n_layers)
        for p in positions
    ]
    patches += [
        Patch("self_attn_head", layer, p, head)
        for layer in range(adapter.n_layers)
        for p in positions[::2]
        for head in range(adapter.n_heads)
    ]
    random.Random(0).shuffle(patches)
    return patches


def both_engines(adapter: PaliGemmaAdapter, clean: ModelInput, corrupt: ModelInput, noise=None):
    """(fast rows, reference rows) of every patch."""
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = every_patch(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=16)
    return rows, expected


@pytest.mark.parametrize(
    "overrides, suffix",
    [
        pytest.param({}, False, id="paligemma"),
        pytest.param(PALIGEMMA2, False, id="paligemma2-softcap-window"),
        pytest.param({"layers": 3}, True, id="paligemma-with-suffix"),
        pytest.param(PALIGEMMA2, True, id="paligemma2-with-suffix"),
    ],
)
@pytest.mark.parametrize("corruption", ["SIP", "STR", "noise"])
def test_paligemma_fast_equals_reference_at_every_position(overrides, suffix, corruption):
    adapter = paligemma_adapter(seed=3, **overrides)
    assert fast.family_engine(adapter) is PrefixLMFast
    clean, corrupt = clean_and_corrupt(adapter, corruption)
    if suffix:
        clean, corrupt = with_suffix(clean), with_suffix(corrupt)
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3) if corruption == "noise" else None
    rows, expected = both_engines(adapter, clean, corrupt, noise)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= RTOL
    assert max(abs(r["logit_diff"]) for r in expected) > 1e-2  # the patches move the score


def test_paligemma_reusing_the_corrupt_keys_values_before_the_patch_is_wrong(monkeypatch):
    """The causal decoder engine (corrupt keys/values before the patched position, causal after it)
    refuses the prefix-LM masks; let through, it gives other scores than the model on the same
    patches: the equality above is not a given."""
    adapter = paligemma_adapter(seed=3)
    clean, corrupt = clean_and_corrupt(adapter, "STR")
    with pytest.raises(ValueError, match="attends to later positions .*prefix_lm"):
        DecoderFast(adapter, clean, corrupt)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    text = adapter.patch_positions(clean)
    patches = [Patch("mlp", 0, p) for p in text[1:]]  # after <bos>: positions with others before them
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    ld = [r["ld_patched"] for r in expected]
    monkeypatch.setattr(DecoderFast, "take_masks", lambda self, masks: None)
    for engine in (DecoderFast, PrefixLMFast):
        logits = engine(adapter, clean, corrupt).run_rows(patches)
        error = max(abs(float(x[tau] - x[tau_p]) - y) / max(abs(y), 1.0) for x, y in zip(logits, ld))
        if engine is DecoderFast:
            assert error > 1e-2
        else:
            assert error <= RTOL
