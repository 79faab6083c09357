"""The adapter contract, checked on a tiny random model of every family of the family table (its tiny builder).

For each family: sites exist with their documented widths at every position; patching a site with
its own clean activation into the clean run changes nothing; the heads of an attention site patched
together are the site; the fast engine equals the reference (oracle) engine within 1e-5 (float32,
relative to max(|ref|, 1)) for every site kind, layer, position (every text position and image
positions at the start, middle and end of the image) and head, on SIP, STR and Gaussian noise, with
the same rows and keys in the same order. Images are not square, so any-resolution tiling
(LLaVA-NeXT) and native-resolution grids (Qwen2-VL) are exercised.
"""

import random

import pytest
import torch
from toy_adapters import (
    DEFAULT_FAMILIES,
    QUESTION,
    clean_and_corrupt,
    noise_image,
    one_torch_thread,
    patch_positions_with_image_samples,
    tiny_adapter,
)

from notice.adapters.base import HEAD_SITE_PARENT, Patch
from notice.adapters.loading import load_adapter
from notice.patching import corruptions, fast, hooks, reference
from notice.patching.scores import ROW_COLUMNS
from notice.patching.sites import layer_head_sites

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=DEFAULT_FAMILIES)
def adapter(request):
    return tiny_adapter(request.param, seed=3)


def image(seed: int):
    return noise_image(seed, size=40, height=24)


def inputs(adapter, corruption: str):
    return clean_and_corrupt(adapter, corruption, image)


def every_patch(adapter, inp) -> list[Patch]:
    """Every site kind × layer × position (× head), shuffled."""
    positions = patch_positions_with_image_samples(adapter, inp)
    head_sites = [site for site, parent in HEAD_SITE_PARENT.items() if parent in adapter.module_sites]
    patches = [
        Patch(site, layer, p)
        for site in (*adapter.module_sites, "layer")
        for layer in range(adapter.n_layers)
        if site in (*adapter.layer_sites(layer), "layer")
        for p in positions
    ]
    patches += [
        Patch(site, layer, p, head)
        for site in head_sites
        for layer in range(adapter.n_layers)
        if HEAD_SITE_PARENT[site] in adapter.layer_sites(layer)
        for p in positions
        for head in range(adapter.n_heads)
    ]
    random.Random(0).shuffle(patches)
    return patches


def test_sites_have_their_documented_widths(adapter):
    clean, _ = inputs(adapter, "SIP")
    sites = [
        (site, layer)
        for site in (*adapter.module_sites, "layer")
        for layer in range(adapter.n_layers)
        if site in (*adapter.layer_sites(layer), "layer")
    ]
    _, acts = hooks.capture(adapter, clean, sites)
    T = clean.input_ids.shape[1]
    for site, layer in sites:
        width = adapter.n_heads * adapter.head_dim if site.endswith("attn") else adapter.hidden_size
        assert adapter.site_width(site) == width
        assert acts[(site, layer)].shape == (T, width), (site, layer)
    assert adapter.site_width(adapter.head_site) == adapter.head_dim
    assert adapter.head_site in HEAD_SITE_PARENT and HEAD_SITE_PARENT[adapter.head_site] in adapter.module_sites


def test_patching_the_clean_run_with_itself_changes_nothing(adapter):
    clean, _ = inputs(adapter, "SIP")
    patches = every_patch(adapter, clean)[::7]
    logits, acts = hooks.capture(adapter, clean, [(p.site, p.layer) for p in patches])
    for patch in patches:
        assert torch.equal(reference.run_patched(adapter, clean, patch, acts), logits), patch


def test_the_heads_of_a_site_together_are_the_site(adapter):
    clean, corrupt = inputs(adapter, "SIP")
    head_sites = [(layer, site) for layer in range(adapter.n_layers) for site in layer_head_sites(adapter, layer)]
    assert head_sites, "no layer has heads"
    position = adapter.head_position(clean, adapter.option_token_id("red"))
    _, acts = hooks.capture(adapter, clean, [(HEAD_SITE_PARENT[s], layer) for layer, s in head_sites])
    for layer, head_site in head_sites:
        site = reference.run_patched(adapter, corrupt, Patch(HEAD_SITE_PARENT[head_site], layer, position), acts)
        heads = reference.run_patched(
            adapter, corrupt, [Patch(head_site, layer, position, h) for h in range(adapter.n_heads)], acts
        )
        torch.testing.assert_close(heads, site, rtol=1e-6, atol=1e-6)


def test_answer_tokens_and_positions(adapter):
    clean, _ = inputs(adapter, "SIP")
    red, green = adapter.option_token_id("red"), adapter.option_token_id("green")
    assert red != green
    positions = adapter.patch_positions(clean)
    assert positions == sorted(positions) and adapter.head_position(clean, red) in range(clean.input_ids.shape[1])
    grid = adapter.image_grid(clean)
    assert len(grid.keys) == grid.rows * grid.cols > 0


@pytest.mark.parametrize("corruption", ["SIP", "STR", "noise"])
def test_fast_equals_reference(adapter, corruption):
    clean, corrupt = inputs(adapter, corruption)
    options = ("green", "red") if corruption == "STR" else ("red", "green")
    tau, tau_p = (adapter.option_token_id(o) for o in options)
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3) if corruption == "noise" else None
    patches = every_patch(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=16)
    assert [list(r) for r in rows] == [list(ROW_COLUMNS)] * len(patches)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= RTOL  # also checks keys and their order
    # The comparison is meaningful: the corruption and the patches move the score.
    assert abs(expected[0]["ld_clean"] - expected[0]["ld_corrupt"]) > 1e-3
    assert max(abs(r["logit_diff"]) for r in expected) > 1e-2


def test_a_saved_model_loads_back_offline_with_the_same_logits(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path))
    assert type(loaded) is type(adapter) and loaded.prompt_template == adapter.prompt_template
    clean, _ = inputs(adapter, "SIP")
    again = loaded.prepare(image(0), loaded.format_prompt(QUESTION))
    assert torch.equal(again.input_ids, clean.input_ids)
    torch.testing.assert_close(loaded.answer_logits(again), adapter.answer_logits(clean), rtol=1e-5, atol=1e-5)
