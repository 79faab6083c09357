"""Acceptance tests of the reference (oracle) patching engine on tiny random BLIP and LLaVA models."""

import pytest
import torch
from toy_adapters import QUESTION, STR_QUESTION, blip_adapter, llava_adapter, noise_image, one_torch_thread

from notice.adapters.base import Patch
from notice.patching.corruptions import additive_noise, multiplicative_noise
from notice.patching.hooks import capture
from notice.patching.reference import patch_sample, run_patched
from notice.patching.scores import ROW_COLUMNS, scores
from notice.patching.sites import default_patches

# Several random architectures per family; LLaVA with grouped-query (kv < q heads), multi-query and plain.
CONFIGS = [
    pytest.param((blip_adapter, dict(seed=0)), id="blip-4h"),
    pytest.param((blip_adapter, dict(seed=1, text_heads=2, text_layers=3)), id="blip-2h-3l"),
    pytest.param((llava_adapter, dict(seed=0)), id="llava-gqa-4q2kv"),
    pytest.param((llava_adapter, dict(seed=1, text_heads=8, text_kv_heads=1)), id="llava-mqa-8q1kv"),
    pytest.param((llava_adapter, dict(seed=2, text_kv_heads=4, text_layers=3)), id="llava-mha-3l"),
]

ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def inputs(adapter, corruption: str):
    """(clean, corrupt) inputs: SIP = other image, same prompt; STR = same image, other equal-length prompt."""
    clean = adapter.prepare(noise_image(0), adapter.format_prompt(QUESTION))
    if corruption == "SIP":
        return clean, adapter.prepare(noise_image(1), adapter.format_prompt(QUESTION))
    return clean, adapter.prepare(noise_image(0), adapter.format_prompt(STR_QUESTION))


def all_sites(adapter) -> list[tuple[str, int]]:
    return [(s, layer) for s in (*adapter.module_sites, "layer") for layer in range(adapter.n_layers)]


@pytest.fixture(scope="module", params=CONFIGS)
def adapter(request):
    make, kwargs = request.param
    return make(**kwargs)


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_corruption_changes_the_answer_scores(adapter, corruption):
    clean, corrupt = inputs(adapter, corruption)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    assert (
        abs(scores(adapter.answer_logits(clean), tau, tau_p).ld - scores(adapter.answer_logits(corrupt), tau, tau_p).ld)
        > 1e-3
    )


def test_patching_nothing_gives_the_corrupt_logits(adapter):
    _, corrupt = inputs(adapter, "SIP")
    plain = adapter.answer_logits(corrupt)
    assert torch.equal(run_patched(adapter, corrupt, [], {}), plain)


def test_writing_back_the_corrupt_value_changes_nothing(adapter):
    # Every patch of the standard experiment, with hooks that write the corrupt run's own activation.
    _, corrupt = inputs(adapter, "SIP")
    plain = adapter.answer_logits(corrupt)
    own = capture(adapter, corrupt, all_sites(adapter))[1]
    for patch in default_patches(adapter, corrupt, adapter.option_token_id("red")):
        close(run_patched(adapter, corrupt, patch, own), plain)


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_all_heads_composed_equal_the_whole_attention_site(adapter, corruption):
    clean, corrupt = inputs(adapter, corruption)
    position = adapter.head_position(clean, adapter.option_token_id("red"))
    parent = {"cross_attn_head": "cross_attn", "self_attn_head": "self_attn"}[adapter.head_site]
    clean_acts = capture(adapter, clean, all_sites(adapter))[1]
    for layer in range(adapter.n_layers):
        heads = [Patch(adapter.head_site, layer, position, h) for h in range(adapter.n_heads)]
        whole = run_patched(adapter, corrupt, Patch(parent, layer, position), clean_acts)
        close(run_patched(adapter, corrupt, heads, clean_acts), whole)
        # One head alone is a strict part of it (else the slicing would be wrong).
        assert not torch.equal(run_patched(adapter, corrupt, heads[0], clean_acts), whole)


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_last_layer_output_at_every_position_restores_clean(adapter, corruption):
    # Exact for both families: the answer reads only the last layer's output (BLIP: all text
    # positions via the decoder's cross-attention; LLaVA: the last position).
    clean, corrupt = inputs(adapter, corruption)
    last = adapter.n_layers - 1
    clean_logits, clean_acts = capture(adapter, clean, [("layer", last)])
    patches = [Patch("layer", last, p) for p in range(clean.input_ids.shape[1])]
    close(run_patched(adapter, corrupt, patches, clean_acts), clean_logits)


def test_llava_any_layer_output_at_every_position_restores_clean():
    # In a decoder-only stream, layer l's output at ALL positions (image tokens too) determines the rest.
    adapter = llava_adapter(seed=3, text_layers=3)
    clean, corrupt = inputs(adapter, "SIP")
    clean_logits, clean_acts = capture(adapter, clean, all_sites(adapter))
    for layer in range(adapter.n_layers):
        patches = [Patch("layer", layer, p) for p in range(clean.input_ids.shape[1])]
        close(run_patched(adapter, corrupt, patches, clean_acts), clean_logits)
    # Text positions alone are not enough: image tokens carry the corruption into later layers.
    text_only = [Patch("layer", 0, p) for p in adapter.patch_positions(clean)]
    assert (run_patched(adapter, corrupt, text_only, clean_acts) - clean_logits).abs().max() > 1e-4


def test_blip_str_any_layer_output_at_every_position_restores_clean():
    # With the image unchanged (STR), layer l's output at every text position determines the rest;
    # under SIP the later cross-attention still reads the corrupt image, so only the last layer is exact.
    adapter = blip_adapter(seed=1, text_layers=3)
    clean, corrupt = inputs(adapter, "STR")
    clean_logits, clean_acts = capture(adapter, clean, all_sites(adapter))
    for layer in range(adapter.n_layers):
        patches = [Patch("layer", layer, p) for p in range(clean.input_ids.shape[1])]
        close(run_patched(adapter, corrupt, patches, clean_acts), clean_logits)


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_patch_sample_rows(adapter, corruption):
    clean, corrupt = inputs(adapter, corruption)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = default_patches(adapter, clean, tau)[::7]
    rows = patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    assert [(r["site"], r["layer"], r["position"], r["head"]) for r in rows] == [
        (p.site, p.layer, p.position, p.head) for p in patches
    ]
    assert all(tuple(r) == ROW_COLUMNS for r in rows)
    clean_s = scores(adapter.answer_logits(clean), tau, tau_p)
    corrupt_s = scores(adapter.answer_logits(corrupt), tau, tau_p)
    clean_acts = capture(adapter, clean, [(p.site, p.layer) for p in patches])[1]
    for row, patch in zip(rows, patches):
        assert (row["ld_clean"], row["p_clean"]) == (clean_s.ld, clean_s.p)
        assert (row["ld_corrupt"], row["p_corrupt"]) == (corrupt_s.ld, corrupt_s.p)
        assert row["ld_patched"] == scores(run_patched(adapter, corrupt, patch, clean_acts), tau, tau_p).ld
        assert row["logit_diff"] == row["ld_patched"] - row["ld_corrupt"]
        assert row["prob_restoration"] == row["p_patched"] - row["p_corrupt"]
        assert row["token"] == clean.tokens[patch.position]
    assert any(abs(r["logit_diff"]) > 1e-4 for r in rows)  # patching does something


def test_default_patch_order(adapter):
    clean, _ = inputs(adapter, "SIP")
    tau = adapter.option_token_id("red")
    patches = default_patches(adapter, clean, tau)
    positions = adapter.patch_positions(clean)
    n_module = len(adapter.module_sites) * adapter.n_layers * len(positions)
    assert len(patches) == n_module + adapter.n_layers * adapter.n_heads
    assert patches[:n_module] == [
        Patch(s, layer, p) for s in adapter.module_sites for layer in range(adapter.n_layers) for p in positions
    ]
    head_pos = adapter.head_position(clean, tau)
    assert patches[n_module:] == [
        Patch(adapter.head_site, layer, head_pos, h)
        for layer in range(adapter.n_layers)
        for h in range(adapter.n_heads)
    ]


def test_invalid_patches_and_misaligned_prompts_fail():
    adapter = blip_adapter()
    clean, corrupt = inputs(adapter, "SIP")
    acts = capture(adapter, clean, [("cross_attn", 0)])[1]
    with pytest.raises(ValueError, match="head must be"):
        run_patched(adapter, corrupt, Patch("cross_attn_head", 0, 1), acts)
    with pytest.raises(ValueError, match="takes no head"):
        run_patched(adapter, corrupt, Patch("cross_attn", 0, 1, head=2), acts)
    with pytest.raises(ValueError, match="outside the prompt"):
        run_patched(adapter, corrupt, Patch("cross_attn", 0, 99), acts)
    longer = adapter.prepare(noise_image(0), "is the object a red circle or a green square?")
    with pytest.raises(ValueError, match="different token lengths"):
        patch_sample(adapter, clean, longer, [Patch("mlp", 0, 1)], 5, 6)


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter])
def test_gaussian_noise_on_image_embeddings(make):
    adapter = make()
    clean = adapter.prepare(noise_image(0), adapter.format_prompt(QUESTION))
    noise = multiplicative_noise(nu=5.0, seed=7)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    clean_logits = adapter.answer_logits(clean)
    noisy = run_patched(adapter, clean, [], {}, corrupt_image_fn=noise)
    assert (noisy - clean_logits).abs().max() > 1e-3
    close(run_patched(adapter, clean, [], {}, corrupt_image_fn=noise), noisy)  # same draw every call
    assert not torch.equal(run_patched(adapter, clean, [], {}, multiplicative_noise(5.0, 8)), noisy)
    assert not torch.equal(run_patched(adapter, clean, [], {}, additive_noise(3.0, 7)), clean_logits)
    # Clean last-layer output everywhere restores the clean answer exactly despite the noise.
    last = adapter.n_layers - 1
    acts = capture(adapter, clean, [("layer", last)])[1]
    patches = [Patch("layer", last, p) for p in range(clean.input_ids.shape[1])]
    close(run_patched(adapter, clean, patches, acts, corrupt_image_fn=noise), clean_logits)
    rows = patch_sample(adapter, clean, clean, [Patch(adapter.module_sites[0], last, 1)], tau, tau_p, noise)
    assert rows[0]["ld_corrupt"] == scores(noisy, tau, tau_p).ld
