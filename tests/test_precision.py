"""Half precision (docs/method.md, §6 "Precision"): on the tiny model of every family (opt-in streams too) in
bfloat16 and float16, the answer logits are the float32 score head applied to the model's own last hidden
state, and the fast engine adds no error beyond the reference engine's own in that dtype (against float32)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch
from toy_adapters import QUESTION, clean_and_corrupt, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import Patch, VLMAdapter
from notice.families import family_names
from notice.files.tables import PAIR_COLUMNS, make_table
from notice.method.pairs import PAIR_DTYPES
from notice.method.precision import (
    audit_rows,
    audit_sample,
    mark_below_precision,
    precision_floors,
    summarise_audit,
)
from notice.patching import fast, reference
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.engines import get_engine
from notice.patching.experiment import cache_clean_runs, patch_pairs
from notice.patching.sites import default_patches
from notice.workflow.runtime import load_image

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def in_dtype(family: str, dtype: torch.dtype, truth: bool = False) -> VLMAdapter:
    """The family's tiny model (seed 5) with its weights rounded to `dtype`, in `dtype` (or with `truth`, those
    weights back in float32: the same model computed in full precision). Built afresh, not copied: a copy of a
    model would carry the hooks its first adapter installed."""
    adapter = tiny_adapter(family, seed=5)
    model = adapter.model.to(dtype)
    return type(adapter)(model.float() if truth else model, adapter.processor)


@pytest.fixture(scope="module", params=family_names())
def family_models(request) -> dict[tuple[torch.dtype, bool], VLMAdapter]:
    """(dtype, truth) -> the family's tiny model in bfloat16 / float16, and its full-precision truth."""
    return {(dtype, truth): in_dtype(request.param, dtype, truth) for dtype in HALF for truth in (False, True)}


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_scores_are_the_float32_head_on_the_models_own_hidden_state(family_models, dtype):
    adapter, full = family_models[dtype, False], family_models[dtype, True]
    assert adapter.upcast_scores and not full.upcast_scores
    clean, _ = clean_and_corrupt(adapter, "SIP")
    seen: list[torch.Tensor] = []
    handle = adapter.head_input_module().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        scores = adapter.answer_logits(clean)
    finally:
        handle.remove()
    assert scores.dtype == torch.float32 and len(seen) == 1 and seen[0].dtype == dtype
    # The float32 unembedding of the same hidden state: the head of the same model in float32.
    hidden = seen[0][:, -1].float()
    with torch.no_grad():
        expected = full.final_logits(hidden)[0]
        rounded = expected.to(dtype).float()  # what a score read from half-precision logits would be
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert not torch.equal(rounded, expected)


def test_full_precision_scores_are_the_models_own_logits():
    adapter = tiny_adapter("llava", seed=5)
    assert not adapter.upcast_scores and adapter.float32_module(adapter.lm_head) is adapter.lm_head
    clean, _ = clean_and_corrupt(adapter, "SIP")
    with torch.no_grad():
        own = adapter.forward(clean).logits[0, -1].float()  # the model's own head, as the adapter runs it
    assert torch.equal(adapter.answer_logits(clean), own)


def max_ld_error(rows: list[dict], truth: list[dict]) -> float:
    return max(
        abs(r[column] - t[column]) for r, t in zip(rows, truth) for column in ("ld_patched", "ld_clean", "ld_corrupt")
    )


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fast_engine_adds_no_error_of_its_own_in_half_precision(family_models, dtype, corruption):
    adapter, truth_adapter = family_models[dtype, False], family_models[dtype, True]
    clean, corrupt = clean_and_corrupt(adapter, corruption)
    clean32, corrupt32 = clean_and_corrupt(truth_adapter, corruption)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = default_patches(adapter, clean, tau)
    patches = random.Random(0).sample(patches, min(48, len(patches)))
    truth = reference.patch_sample(truth_adapter, clean32, corrupt32, patches, tau, tau_p)
    half_reference = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    half_fast = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    reference_error = max_ld_error(half_reference, truth)
    assert reference_error > 0  # half precision rounds
    assert max_ld_error(half_fast, half_reference) <= 2 * reference_error


# -- the precision audit --------------------------------------------------------------------------
def pair_row(adapter: VLMAdapter, sample_id: str, clean: str, corrupt: str, corruption: str, seed: int) -> dict:
    prompt = adapter.format_prompt(QUESTION)
    return {
        "sample_id": sample_id,
        "task": "colour",
        "category": "red",
        "corruption": corruption,
        "modality": "image",
        "correct_first": True,
        "answer": "red",
        "distractor": "green",
        "answer_token_id": adapter.option_token_id("red"),
        "distractor_token_id": adapter.option_token_id("green"),
        "clean_image_path": clean,
        "corrupt_image_path": corrupt,
        "clean_mask_path": "",
        "corrupt_mask_path": "",
        "clean_prompt": prompt,
        "corrupt_prompt": prompt,
        "noise_seed": seed,
    }


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> dict:
    """A bfloat16 LLaVA's results table over two SIP pairs and one Gaussian-noise pair, its float32 twin."""
    tmp = tmp_path_factory.mktemp("audit")
    paths = []
    for seed in range(3):
        path = tmp / f"image{seed}.png"
        noise_image(seed).save(path)
        paths.append(str(path))
    half, full = in_dtype("llava", torch.bfloat16), in_dtype("llava", torch.bfloat16, truth=True)
    rows = [
        pair_row(half, "a", paths[0], paths[1], "sip", -1),
        pair_row(half, "b", paths[1], paths[2], "sip", -1),
        pair_row(half, "c", paths[2], paths[2], "gn_mult", 7),
    ]
    pairs = make_table(rows, PAIR_COLUMNS, PAIR_DTYPES)
    prompts = pd.DataFrame({"sample_id": pairs["sample_id"], "image_path": pairs["clean_image_path"]})
    prompts["prompt"] = pairs["clean_prompt"]
    with torch.inference_mode():
        results = patch_pairs(
            half,
            pairs,
            cache_clean_runs(half, prompts, load_image),
            load_image,
            engine=get_engine("fast", 64),
            corruption_settings=NOISE,
            patching_settings={"module_sites": True, "head_sites": True},
            labels={"model": "toy", "dataset": "synthetic"},
        )
    return {"half": half, "full": full, "pairs": pairs, "results": results}


NOISE = {"nu": 5.0, "sigma_multiplier": 3.0}


def test_the_audit_sample_is_seeded_and_holds_every_site_kind(half_run):
    results = half_run["results"]
    kinds = set(zip(results["corruption"], results["site"]))
    sample = audit_sample(results, 9, seed=1)
    assert len(sample) == 9 and set(zip(sample["corruption"], sample["site"])) == kinds
    assert sample.equals(audit_sample(results, 9, seed=1)) and not sample.equals(audit_sample(results, 9, seed=2))
    assert len(audit_sample(results, 2, seed=1)) == len(kinds)  # one of each kind whatever `n`
    assert len(audit_sample(results, 10**6, seed=1)) == len(results)
    assert list(sample.index) == sorted(sample.index)


def test_the_audit_is_the_float32_reference_on_the_audited_rows(half_run):
    half, full, pairs, results = half_run["half"], half_run["full"], half_run["pairs"], half_run["results"]
    sample = audit_sample(results, 30, seed=0)
    audited = audit_rows(full, pairs, sample, load_image, NOISE)
    assert len(audited) == len(sample) and set(audited["sample_id"]) == {"a", "b", "c"}
    # Each audited row, recomputed directly: the float32 model, the reference engine, that one patch.
    for row in audited.itertuples():
        pair = pairs.set_index("sample_id").loc[row.sample_id]
        clean, corrupt = (
            full.prepare(load_image(pair[f"{k}_image_path"]), pair[f"{k}_prompt"]) for k in ("clean", "corrupt")
        )
        noise = corrupt_image_fn(pair["corruption"], NOISE, int(pair["noise_seed"]))
        [exact] = reference.patch_sample(
            full,
            clean,
            corrupt,
            [Patch(row.site, row.layer, row.position, row.head)],
            int(pair["answer_token_id"]),
            int(pair["distractor_token_id"]),
            corrupt_image_fn=noise,
        )
        assert row.logit_diff_float32 == exact["logit_diff"]
        assert row.abs_error == abs(row.logit_diff - exact["logit_diff"])
    assert audited["abs_error"].max() > 0  # bfloat16 rounds
    summary = summarise_audit(audited, results, "bfloat16", "cpu")
    assert len(summary) == len(results.groupby(["corruption", "site"])) == 6
    for site_row in summary.itertuples():
        mine = (audited["corruption"] == site_row.corruption) & (audited["site"] == site_row.site)
        errors = audited.loc[mine, "abs_error"].to_numpy()
        table = results[(results["corruption"] == site_row.corruption) & (results["site"] == site_row.site)]
        assert site_row.n_audited == len(errors) > 0 and site_row.n_rows == len(table)
        assert (site_row.median, site_row.p95, site_row.max) == (
            np.median(errors),
            np.percentile(errors, 95),
            errors.max(),
        )
        assert site_row.effect_spread == table["logit_diff"].std(ddof=0)
    assert half.upcast_scores


def planted_effects(mean: float) -> pd.DataFrame:
    """Head effects of one condition: head 0 stands out at `mean`, the others at 0."""
    rows = [
        {
            "model": "toy",
            "task": "colour",
            "corruption": "sip",
            "modality": "image",
            "site": "self_attn_head",
            "layer": 0,
            "head": h,
            "mean": mean if h == 0 else 0.0,
        }
        for h in range(8)
    ]
    return pd.DataFrame(rows)


def test_effects_below_the_rounding_are_marked_and_large_ones_are_not():
    results = pd.DataFrame({"model": ["toy"], "dataset": ["synthetic"], "task": ["colour"], "corruption": ["sip"]})
    audit = pd.DataFrame(
        [
            {
                "model": "toy",
                "dataset": "synthetic",
                "corruption": "sip",
                "site": "self_attn_head",
                "dtype": "bfloat16",
                "audit_dtype": "float32",
                "audit_device": "cpu",
                "n_rows": 8,
                "n_audited": 8,
                "median": 0.01,
                "p95": 0.05,
                "max": 0.06,
                "effect_spread": 0.1,
            }
        ]
    )
    floors = precision_floors(audit, results, k=3.0)
    assert floors["floor"].tolist() == [pytest.approx(0.15)]
    small = mark_below_precision(planted_effects(0.1), floors)
    assert small["below_precision"].all()  # every head, the standing-out one included
    large = mark_below_precision(planted_effects(5.0), floors)
    assert large["below_precision"].tolist() == [False] + [True] * 7
    unaudited = mark_below_precision(planted_effects(0.1).assign(corruption="str"), floors)
    assert not unaudited["below_precision"].any()  # no audit (a full-precision run): nothing marked
