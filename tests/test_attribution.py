"""Attribution patching (the screen) against exact patching: exact where the model is linear, agreeing
in sign and ranking on the tiny BLIP and LLaVA fixtures' large effects; GradDrop; bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from linear_toy import LinearAdapter, LinearVLM, linear_inputs
from toy_adapters import (
    DEFAULT_FAMILIES,
    blip_adapter,
    clean_and_corrupt,
    llava_adapter,
    noise_image,
    one_torch_thread,
    tiny_adapter,
)

from notice.adapters.base import Patch
from notice.patching.attribution import (
    IMAGE_LAYER,
    IMAGE_SITE,
    _scores,
    attribution_estimates,
    estimates_table,
    query_key_fix,
    screen_sites,
)
from notice.patching.hooks import hooked
from notice.patching.query_keys import has_attention_taps, patch_queries_keys, qk_sites
from notice.patching.reference import patch_sample
from notice.patching.scores import logit_diff

KEYS = ["site", "layer", "head", "position"]


def exact_and_screen(adapter, clean, corrupt, tau, tau_p, patches, method="atp") -> pd.DataFrame:
    """Exact rows (reference engine) of `patches` joined with the screen's estimates."""
    with one_torch_thread():
        exact = pd.DataFrame(patch_sample(adapter, clean, corrupt, patches, tau, tau_p))
        estimates = attribution_estimates(adapter, clean, corrupt, tau, tau_p, method=method)
    table = estimates_table(estimates, clean.tokens)
    return exact.merge(table[[*KEYS, "estimate"]], on=KEYS, how="left", validate="one_to_one")


def every_patch(adapter, inp, positions) -> list[Patch]:
    modules = [Patch(s, layer, p) for s in adapter.module_sites for layer in range(adapter.n_layers) for p in positions]
    heads = [
        Patch(adapter.head_site, layer, p, h)
        for layer in range(adapter.n_layers)
        for p in positions
        for h in range(adapter.n_heads)
    ]
    return modules + heads


def test_linear_model_estimate_equals_exact_patching():
    adapter = LinearAdapter(LinearVLM(), processor=None)
    clean, corrupt = linear_inputs(1), linear_inputs(2)
    corrupt.input_ids = clean.input_ids.clone()  # same prompt, other image (SIP): the image effect flows through
    corrupt.input_ids[0, 1] = (corrupt.input_ids[0, 1] + 3) % 11  # and one changed token
    joined = exact_and_screen(adapter, clean, corrupt, 3, 7, every_patch(adapter, clean, range(5)))
    assert joined["estimate"].notna().all()
    assert joined["logit_diff"].abs().max() > 0.1  # the check is not vacuous
    assert (joined["estimate"] - joined["logit_diff"]).abs().max() < 1e-5

    # the image embeddings, row by row, against patching one row by hand
    estimates = attribution_estimates(adapter, clean, corrupt, 3, 7)
    clean_rows = adapter.model.image_proj(clean.pixel_values)[0].detach()
    base = float(logit_diff(adapter.answer_logits(corrupt), 3, 7))
    for row in range(4):

        def patch_row(x, row=row):
            x = x.clone()
            x[0, row] = clean_rows[row]
            return x

        with hooked(adapter.image_embedding_module(), "output", patch_row):
            exact = float(logit_diff(adapter.answer_logits(corrupt), 3, 7)) - base
        assert abs(float(estimates.values[(IMAGE_SITE, IMAGE_LAYER)][row]) - exact) < 1e-5


def test_screen_covers_every_position_and_head_and_leaves_the_model_as_it_was():
    adapter = llava_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    flags = [p.requires_grad for p in adapter.model.parameters()]
    before = adapter.answer_logits(corrupt)
    estimates = attribution_estimates(adapter, clean, corrupt, 5, 6)
    table = estimates_table(estimates, clean.tokens)
    length = clean.input_ids.shape[1]
    counts = table.groupby("site").size()
    assert counts["mlp"] == counts["self_attn"] == adapter.n_layers * length  # image tokens included
    assert counts["self_attn_head"] == adapter.n_layers * length * adapter.n_heads
    assert counts["image"] == len(adapter.image_positions(clean))  # one row per spliced image embedding
    assert [p.requires_grad for p in adapter.model.parameters()] == flags
    assert torch.equal(adapter.answer_logits(corrupt), before)
    # heads are slices of the attention site: their estimates add up to it
    heads = table[table["site"] == "self_attn_head"].groupby(["layer", "position"])["estimate"].sum()
    attention = table[table["site"] == "self_attn"].set_index(["layer", "position"])["estimate"]
    assert (heads - attention).abs().max() < 1e-5


def planted(adapter, answer_head: torch.nn.Module, planted_head: int = 1):
    """Small weights keep the model near-linear; a ×20 answer head makes effects large, and one fusion head
    of the last layer ×4 plants the largest of them."""
    module, _ = adapter.site_module(adapter.head_site, adapter.n_layers - 1)
    dims = slice(planted_head * adapter.head_dim, (planted_head + 1) * adapter.head_dim)
    with torch.no_grad():
        answer_head.weight *= 20
        module.weight[:, dims] *= 4
    return adapter


def plant_blip():
    adapter = blip_adapter(std=0.15)
    return planted(adapter, adapter.model.text_decoder.cls.predictions.decoder)


def plant_llava():
    adapter = llava_adapter(std=0.15)
    return planted(adapter, adapter.model.lm_head)


# BLIP's head is patched at the answer word, which STR replaces: its heads' clean and corrupt outputs
# barely differ there, so nothing large can be planted under STR.
@pytest.mark.parametrize(
    ("plant", "corruption"),
    [(plant_blip, "SIP"), (plant_llava, "SIP"), (plant_llava, "STR")],
    ids=["blip-SIP", "llava-SIP", "llava-STR"],
)
def test_sign_and_ranking_agree_with_exact_on_planted_large_effects(plant, corruption):
    adapter = plant()
    clean, corrupt = clean_and_corrupt(adapter, corruption)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    head_position = adapter.head_position(clean, tau)
    heads = [
        Patch(adapter.head_site, layer, head_position, h)
        for layer in range(adapter.n_layers)
        for h in range(adapter.n_heads)
    ]
    joined = exact_and_screen(adapter, clean, corrupt, tau, tau_p, heads).set_index(["layer", "head"])
    planted_head = (adapter.n_layers - 1, 1)
    size = joined["logit_diff"].abs()
    assert size.idxmax() == planted_head and size.max() > 1.0  # the planted effect is large, and the largest
    assert joined["estimate"].abs().idxmax() == planted_head  # the screen ranks it first
    assert (joined.loc[planted_head, "estimate"] > 0) == (joined.loc[planted_head, "logit_diff"] > 0)
    assert joined["estimate"].corr(joined["logit_diff"], method="spearman") > 0.6  # and ranks the rest alike


def test_grad_drop_scores_magnitudes_and_catches_cancelling_paths():
    adapter = LinearAdapter(LinearVLM(), processor=None)
    clean, corrupt = linear_inputs(1), linear_inputs(2)
    corrupt.input_ids = clean.input_ids.clone()
    corrupt.input_ids[0, -1] = (corrupt.input_ids[0, -1] + 3) % 11  # the last position: the one read out
    atp = attribution_estimates(adapter, clean, corrupt, 3, 7)
    star = attribution_estimates(adapter, clean, corrupt, 3, 7, method="atp_star")
    for key, value in star.values.items():
        assert (value >= 0).all(), key
    # a layer-0 site whose later-layer paths cancel: with every later layer's gradient dropped in turn the
    # score sees each path alone. A linear model: dropping layer ℓ removes exactly the paths through it.
    last = adapter.n_layers - 1
    assert torch.allclose(star.values[("mlp", last)], atp.values[("mlp", last)].abs(), atol=1e-6)  # nothing later
    assert star.ld_corrupt == atp.ld_corrupt
    with torch.no_grad():  # only coordinate 0 reaches the logits, and layer 1's MLP removes it again
        adapter.model.layers[1].mlp.weight.zero_()
        adapter.model.layers[1].mlp.bias.zero_()
        adapter.model.layers[2].mlp.weight.zero_()
        adapter.model.layers[2].mlp.bias.zero_()
        adapter.model.layers[1].o_proj.weight.zero_()
        adapter.model.layers[2].o_proj.weight.zero_()
        adapter.model.head.weight[:, :] = 0
        adapter.model.head.weight[3, 0] = 1.0
        adapter.model.layers[1].mlp.weight[0, 0] = -1.0  # layer 1 removes coordinate 0 from the stream again
    atp = attribution_estimates(adapter, clean, corrupt, 3, 7)
    star = attribution_estimates(adapter, clean, corrupt, 3, 7, method="atp_star")
    assert float(atp.values[("mlp", 0)].abs().max()) < 1e-6  # direct and indirect cancel: AtP sees nothing
    assert float(star.values[("mlp", 0)].abs().max()) > 1e-3  # GradDrop does


def test_unknown_sites_method_and_misaligned_prompts_are_refused():
    adapter = llava_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    with pytest.raises(ValueError, match="cross_attn"):
        screen_sites(adapter, ["mlp", "cross_attn"])
    with pytest.raises(ValueError, match="atp, atp_star|'atp', 'atp_star'"):
        attribution_estimates(adapter, clean, corrupt, 5, 6, method="atp_plus")
    short = adapter.prepare(noise_image(0), adapter.format_prompt("red?"))
    with pytest.raises(ValueError, match="different token lengths"):
        attribution_estimates(adapter, clean, short, 5, 6)


@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_attention_taps_see_what_the_model_computes_and_change_nothing(family):
    adapter = tiny_adapter(family)
    if not has_attention_taps(adapter):  # the screen leaves the query/key sites out (tests/test_screen.py)
        pytest.skip(f"{family}: no attention taps")
    clean, _ = clean_and_corrupt(adapter, "SIP")
    seen = {}

    class Record:
        def query(self, layer, query):
            seen[("q", layer)] = query
            return query

        def key(self, layer, key):
            seen[("k", layer)] = key
            return key

        def probs(self, layer, probs, scaling, mask, softcap):
            seen[("p", layer)] = (probs, scaling, mask, softcap)
            return probs

    with one_torch_thread():
        plain = adapter.answer_logits(clean)
        with adapter.attention_taps(Record()):
            tapped = adapter.answer_logits(clean)
    assert torch.equal(plain, tapped)
    assert {layer for _, layer in seen} == set(adapter.fusion_layers())
    for layer in adapter.fusion_layers():
        q, k, (probs, scaling, mask, softcap) = seen[("q", layer)], seen[("k", layer)], seen[("p", layer)]
        assert q.shape[1] == adapter.n_heads and probs.shape[1:3] == q.shape[1:3] and probs.shape[-1] == k.shape[2]
        # the probabilities are the softmax of the reported queries, keys and settings
        scores = _scores(q[0], k[0], scaling, softcap) + (0 if mask is None else mask.double())
        assert torch.allclose(torch.softmax(scores, -1), probs[0].double(), atol=1e-5)


def brute_force_fix(clean_q, clean_k, q, k, grad, scaling, mask):
    """Each query / key patched on its own, the softmax recomputed from scratch."""
    heads, length, keys = grad.shape
    rep = heads // k.shape[0]
    base = torch.softmax(_scores(q, k, scaling, None) + mask, -1)
    query = torch.zeros(length, heads, dtype=torch.float64)
    for t in range(length):
        patched = q.clone()
        patched[:, t] = clean_q[:, t]
        query[t] = ((torch.softmax(_scores(patched, k, scaling, None) + mask, -1) - base) * grad).sum((-1, -2))
    key = torch.zeros(keys, k.shape[0], dtype=torch.float64)
    for s in range(keys):
        patched = k.clone()
        patched[:, s] = clean_k[:, s]
        change = ((torch.softmax(_scores(q, patched, scaling, None) + mask, -1) - base) * grad).sum((-1, -2))
        key[s] = change.view(k.shape[0], rep).sum(1)
    return query, key


@pytest.mark.parametrize("saturated", [False, True])
def test_query_key_fix_is_the_softmax_recomputed_for_each_query_and_key(saturated):
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, length, dim = 4, 2, 6, 8
    scale = 30.0 if saturated else 1.0  # large scores: one key takes all the attention
    q, clean_q = (scale * torch.randn(heads, length, dim, generator=generator) for _ in range(2))
    k, clean_k = (torch.randn(kv_heads, length, dim, generator=generator) for _ in range(2))
    grad = torch.randn(heads, length, length, generator=generator, dtype=torch.float64)
    mask = torch.zeros(length, length).masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    query, key = query_key_fix(clean_q, clean_k, q, k, grad, dim**-0.5, mask, None)
    expected_query, expected_key = brute_force_fix(clean_q, clean_k, q, k, grad, dim**-0.5, mask.double())
    assert torch.allclose(query.double(), expected_query, atol=1e-5)
    assert torch.allclose(key.double(), expected_key, atol=1e-5)
    if saturated:  # where AtP's gradient through the softmax is ~0 but patching moves the attention
        assert expected_key.abs().max() > 0.1


def test_atp_star_query_key_fix_changes_only_the_attention_query_and_key_sites():
    adapter = llava_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "STR")
    with one_torch_thread():
        atp = attribution_estimates(adapter, clean, corrupt, 5, 6)
        fixed = attribution_estimates(adapter, clean, corrupt, 5, 6, method="atp_star", grad_drop=False)
    assert fixed.method == "atp+qk_fix" and atp.method == "atp"
    changed = {key[0] for key in atp.values if not torch.allclose(atp.values[key], fixed.values[key], atol=1e-6)}
    assert changed == {"self_attn_query", "self_attn_key"}
    for key, value in atp.values.items():
        if key[0] not in changed:
            assert torch.equal(value, fixed.values[key]), key


def test_blip_key_sites_are_the_image_tokens_of_each_layer():
    adapter = blip_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    estimates = attribution_estimates(adapter, clean, corrupt, 5, 6, method="atp_star", grad_drop=False)
    table = estimates_table(estimates, clean.tokens)
    keys = table[table["site"] == "cross_attn_key"]
    vision = adapter.model.config.vision_config
    n_image = 1 + (vision.image_size // vision.patch_size) ** 2
    assert keys.groupby("layer")["position"].nunique().eq(n_image).all()
    assert keys["token"].str.startswith("<image row").all()
    assert keys["estimate"].abs().max() > 0
    # STR leaves the image, so its keys, as they were: no effect at all, not rounding noise
    _, text_corrupt = clean_and_corrupt(adapter, "STR")
    unchanged = attribution_estimates(adapter, clean, text_corrupt, 5, 6, method="atp_star", grad_drop=False)
    assert all(
        float(unchanged.values[("cross_attn_key", layer)].abs().max()) == 0.0 for layer in range(adapter.n_layers)
    )


def test_patching_a_query_through_the_tap_is_patching_its_projection():
    adapter = llava_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    layer, head, position = 1, 2, clean.input_ids.shape[1] - 1
    [row] = patch_queries_keys(adapter, clean, corrupt, [Patch("self_attn_query", layer, position, head)], 5, 6)
    projection = adapter.layers[layer].self_attn.q_proj
    dims = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
    captured = {}
    with hooked(projection, "output", lambda x: captured.setdefault("clean", x.clone())):
        adapter.answer_logits(clean)

    def overwrite(x):
        x = x.clone()
        x[0, position, dims] = captured["clean"][0, position, dims]
        return x

    with hooked(projection, "output", overwrite):
        patched = float(logit_diff(adapter.answer_logits(corrupt), 5, 6))
    # rotary position embedding is a fixed rotation per position: patching before or after it is the same
    assert abs(row["ld_patched"] - patched) < 1e-5
    assert abs(row["logit_diff"]) > 1e-4


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter], ids=["blip", "llava"])
def test_atp_star_estimates_queries_and_keys_closer_to_exact_patching_than_atp(make):
    adapter = make()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    with one_torch_thread():
        atp = estimates_table(attribution_estimates(adapter, clean, corrupt, tau, tau_p), clean.tokens)
        star = attribution_estimates(adapter, clean, corrupt, tau, tau_p, method="atp_star", grad_drop=False)
        star_table = estimates_table(star, clean.tokens)
        sites = atp[atp["site"].isin(qk_sites(adapter))]
        patches = [Patch(r.site, int(r.layer), int(r.position), int(r.head)) for r in sites.itertuples()]
        exact = pd.DataFrame(patch_queries_keys(adapter, clean, corrupt, patches, tau, tau_p))
    joined = exact.merge(atp[[*KEYS, "estimate"]], on=KEYS).merge(
        star_table[[*KEYS, "estimate"]], on=KEYS, suffixes=("_atp", "_star")
    )
    assert len(joined) == len(patches)
    error_atp = (joined["estimate_atp"] - joined["logit_diff"]).abs().mean()
    error_star = (joined["estimate_star"] - joined["logit_diff"]).abs().mean()
    assert error_star < 0.7 * error_atp
