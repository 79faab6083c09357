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

from notice.adapters.base import HALF_PRECISION, Patch, VLMAdapter
from notice.families import family_names
from notice.files.tables import PAIR_COLUMNS, make_table
from notice.method.pairs import PAIR_DTYPES
from notice.method.precision import (
    AUDIT_ROW_COLUMNS,
    HALF_DTYPES,
    audit_sample,
    draws,
    is_half,
    mark_below_precision,
    precision_floors,
    summarise_audit,
)
from notice.method.precision_audit import SCREEN_AUDIT_ROW_COLUMNS, audit_rows, audit_screen
from notice.method.screen import TABLE_COLUMNS, screen_pairs
from notice.patching import fast, reference
from notice.patching.attribution import attribution_estimates, estimates_table
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.engines import get_engine
from notice.patching.experiment import cache_clean_runs, patch_pairs
from notice.patching.sites import default_patches
from notice.workflow.runtime import FIT_FRACTION, fitting_device, load_image

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
    """A bfloat16 LLaVA's results table over two SIP pairs and two Gaussian-noise draws of one sample (rows with
    the same keys), its float32 twin."""
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
        pair_row(half, "c", paths[2], paths[2], "gn_mult", 8),
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


def test_a_rows_draw_is_its_pair_among_its_samples_pairs(half_run):
    results = half_run["results"]
    draw = draws(results)
    noise = results["corruption"] == "gn_mult"
    assert set(draw[~noise]) == {0} and set(draw[noise]) == {0, 1}
    # The second draw's rows follow the first's (pairs are patched in the manifest's order), one each.
    first, second = results[noise & (draw == 0)], results[noise & (draw == 1)]
    assert len(first) == len(second) and first.index.max() < second.index.min()
    assert not np.allclose(first["ld_corrupt"], second["ld_corrupt"])  # two noise draws


def test_half_dtypes_are_the_adapters_half_precision():
    assert set(HALF_DTYPES) == {str(dtype).removeprefix("torch.") for dtype in HALF_PRECISION}
    assert is_half("bfloat16") and is_half("float16") and not is_half("float32")


def test_the_float32_model_runs_where_it_fits():
    gb = 10**9
    assert fitting_device("cuda:1", 28 * gb, 40 * gb) == ("cuda:1", "cuda:1")
    device, where = fitting_device("cuda:1", 28 * gb, 20 * gb)
    assert device == "cpu" and where == "cpu (the float32 model, 28.0 GB, does not fit in the 20.0 GB free on cuda:1)"
    assert fitting_device("cuda:0", int(FIT_FRACTION * 30 * gb) + 1, 30 * gb)[0] == "cpu"


@pytest.fixture(scope="module")
def audit(half_run) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sample, audited rows) of 30 rows of the bfloat16 run."""
    sample = audit_sample(half_run["results"], 30, seed=0)
    return sample, audit_rows(half_run["full"], half_run["pairs"], sample, load_image, NOISE)


def pair_of(pairs: pd.DataFrame, sample_id: str, draw: int) -> pd.Series:
    return pairs[pairs["sample_id"] == sample_id].iloc[draw]


def test_the_audit_is_the_float32_reference_on_the_audited_rows(half_run, audit):
    half, full, pairs, results = half_run["half"], half_run["full"], half_run["pairs"], half_run["results"]
    sample, audited = audit
    assert list(audited.columns) == list(AUDIT_ROW_COLUMNS)
    assert len(audited) == len(sample) and set(audited["sample_id"]) == {"a", "b", "c"}
    assert set(audited["draw"]) == {0, 1}  # the second noise draw too
    # Each audited row, recomputed directly: the float32 model, the reference engine, that one patch of its pair
    # (of a Gaussian-noise sample, the draw it came from).
    for row in audited.itertuples():
        pair = pair_of(pairs, row.sample_id, row.draw)
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


SCREEN = {"method": "atp", "confirm_top": 0}


def half_screen(pairs: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The screen table of the bfloat16 LLaVA (built afresh: the screen backpropagates, and the half_run model's
    float32 head copy was made in inference mode)."""
    screen, _, _ = screen_pairs(
        in_dtype("llava", torch.bfloat16),
        pairs,
        load_image,
        engine=get_engine("fast", 64),
        settings=settings,
        corruption_settings=NOISE,
        labels={"model": "toy", "dataset": "synthetic"},
        masks={},
    )
    return screen


def test_the_screen_audit_is_the_float32_screen_of_the_audited_pairs(half_run, audit):
    full, pairs = half_run["full"], half_run["pairs"]
    screen = half_screen(pairs, SCREEN)
    audited = audit[1]
    rows = audit_screen(full, pairs, screen, audited, load_image, SCREEN, NOISE)
    assert list(rows.columns) == list(SCREEN_AUDIT_ROW_COLUMNS)
    audited_pairs = set(zip(audited["sample_id"], audited["draw"]))
    assert set(zip(rows["sample_id"], rows["draw"])) == audited_pairs and (1 in audited["draw"].to_numpy())
    keys = ["site", "layer", "head", "position"]
    for sample_id, draw in audited_pairs:
        mine = rows[(rows["sample_id"] == sample_id) & (rows["draw"] == draw)]
        # the half-precision side: that pair's rows of the screen table
        half_rows = screen[(screen["sample_id"] == sample_id) & (draws(screen) == draw)]
        pd.testing.assert_frame_equal(
            mine[[*keys, "estimate"]].sort_values(keys).reset_index(drop=True),
            half_rows[[*keys, "estimate"]].sort_values(keys).reset_index(drop=True),
        )
        # the float32 side: the screen of that pair (its own noise draw) on the float32 model, directly
        pair = pair_of(pairs, sample_id, draw)
        clean, corrupt = (
            full.prepare(load_image(pair[f"{k}_image_path"]), pair[f"{k}_prompt"]) for k in ("clean", "corrupt")
        )
        noise = corrupt_image_fn(pair["corruption"], NOISE, int(pair["noise_seed"]))
        estimates = attribution_estimates(
            full, clean, corrupt, int(pair["answer_token_id"]), int(pair["distractor_token_id"]), corrupt_image_fn=noise
        )
        direct = estimates_table(estimates, clean.tokens)
        merged = mine.merge(direct, on=keys, suffixes=("", "_direct"), validate="one_to_one")
        assert len(merged) == len(mine) == len(direct)
        assert (merged["estimate_float32"] == merged["estimate_direct"]).all()
        assert (merged["abs_error"] == (merged["estimate"] - merged["estimate_direct"]).abs()).all()
    assert rows["abs_error"].max() > 0  # bfloat16 rounds
    summary = summarise_audit(rows, screen, "bfloat16", "cpu", value="estimate")
    assert set(summary["site"]) == set(screen["site"]) and (summary["n_audited"] > 0).all()
    for site_row in summary.itertuples():
        table = screen[(screen["corruption"] == site_row.corruption) & (screen["site"] == site_row.site)]
        assert site_row.n_rows == len(table) and site_row.effect_spread == table["estimate"].std(ddof=0)
        assert 0 <= site_row.median <= site_row.p95 <= site_row.max


def test_a_screen_of_other_sites_is_refused(half_run, audit):
    full, pairs = half_run["full"], half_run["pairs"]
    screen = half_screen(pairs, {**SCREEN, "sites": ["mlp"]})
    with pytest.raises(ValueError, match="other sites than the screen table"):
        audit_screen(full, pairs, screen[list(TABLE_COLUMNS)], audit[1], load_image, SCREEN, NOISE)


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
