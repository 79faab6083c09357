"""Head statistics on results tables with planted effects, so every expected set is known by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from planted_tables import (
    CORRUPTION,
    HEADS,
    LAYERS,
    MULTIMODAL,
    N_SAMPLES,
    PARTIAL,
    PLANTED,
    TEXT,
    VISION,
    borderline_results,
    head_rows,
    module_rows,
    planted_results,
    row,
)

from notice.method.heads import (
    HEAD_KEYS,
    HEAD_SITES,
    MODULE_KEYS,
    MODULE_SITES,
    bootstrap_heads,
    bootstrap_indices,
    head_effects,
    mark_precision,
    module_effects,
    significant_heads,
    token_label,
    universal_heads,
    universal_heads_by_kind,
    universal_heads_summary,
    universal_heads_table,
)


def heads_of(universal: pd.DataFrame, kind: str) -> set:
    picked = universal[universal["kind"] == kind]
    return set(zip(picked["layer"], picked["head"]))


def test_head_effects_mean_std_n():
    effects = head_effects(planted_results())
    assert len(effects) == 4 * LAYERS * HEADS
    cell = effects.set_index(["task", "modality", "layer", "head"]).loc[("A", "image", 2, 0)]
    assert cell["mean"] == pytest.approx(10.0)
    assert cell["std"] == pytest.approx(0.2 * math.sqrt(N_SAMPLES / (N_SAMPLES - 1)))
    assert cell["n"] == N_SAMPLES and cell["metric"] == "logit_diff"


def test_noise_draws_are_averaged_per_sample_first():
    # sample s0 has three draws (1, 2, 3 → 2), sample s1 one draw (10): mean of samples = 6, not 4
    rows = [
        row(
            task="A",
            corruption="gaussian_noise",
            modality="image",
            sample_id=s,
            site="self_attn_head",
            layer=0,
            head=0,
            position=5,
            logit_diff=v,
        )
        for s, v in [("s0", 1), ("s0", 2), ("s0", 3), ("s1", 10)]
    ]
    effects = head_effects(pd.DataFrame(rows))
    assert effects["mean"].item() == pytest.approx(6.0)
    assert effects["n"].item() == 2


def test_two_sigma_threshold_by_hand():
    effects = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "corruption": "sip",
            "modality": "image",
            "site": "cross_attn_head",
            "layer": 0,
            "head": [0, 1, 2, 3],
            "mean": [1.0, 2.0, 3.0, 10.0],
        }
    )
    # mean 4, population variance (9 + 4 + 1 + 36) / 4 = 12.5
    two = significant_heads(effects, k=2.0)
    assert two["threshold"].tolist() == pytest.approx([4 + 2 * math.sqrt(12.5)] * 4)  # 11.0711
    assert not two["significant"].any()
    one = significant_heads(effects, k=1.0)
    assert one["threshold"].iloc[0] == pytest.approx(7.5355339)
    assert one["significant"].tolist() == [False, False, False, True]


def test_significant_sets_per_condition():
    sig = significant_heads(head_effects(planted_results()))
    for (task, modality), planted in PLANTED.items():
        cond = sig[(sig["task"] == task) & (sig["modality"] == modality)]
        assert set(zip(cond.loc[cond["significant"], "layer"], cond.loc[cond["significant"], "head"])) == set(planted)


def test_universal_heads_kinds():
    universal = universal_heads(significant_heads(head_effects(planted_results())))
    assert list(universal.columns) == ["model", "site", "layer", "head", "kind"]
    assert heads_of(universal, "vision") == {VISION}
    assert heads_of(universal, "text") == {TEXT}
    assert heads_of(universal, "multimodal") == {MULTIMODAL}  # not also listed as vision or text
    assert PARTIAL not in set(zip(universal["layer"], universal["head"]))
    assert len(universal) == 3


def test_tasks_counted_are_those_present_for_the_modality():
    results = planted_results()
    only_text_a = results[~((results["modality"] == "text") & (results["task"] == "B"))]
    universal = universal_heads(significant_heads(head_effects(only_text_a)))
    assert heads_of(universal, "text") == {TEXT}
    assert heads_of(universal, "multimodal") == {MULTIMODAL}


def test_corruption_filter_for_universality():
    # Gaussian noise on task A plants only the multimodal head: counted, it removes the vision head
    results = pd.concat([planted_results(), pd.DataFrame(head_rows("A", "gaussian_noise", "image", [MULTIMODAL]))])
    sig = significant_heads(head_effects(results))
    assert heads_of(universal_heads(sig), "vision") == set()
    assert heads_of(universal_heads(sig), "multimodal") == {MULTIMODAL}
    assert heads_of(universal_heads(sig, corruptions=["sip", "str"]), "vision") == {VISION}


def test_bootstrap_planted_heads_are_stable():
    results = planted_results()
    boot = bootstrap_heads(results, n_draws=200, seed=1, k=2.0, metric="logit_diff")
    per_head = boot.set_index(["task", "modality", "layer", "head"])
    assert per_head.loc[("A", "image", *MULTIMODAL), "frac_universal_multimodal"] == 1.0
    assert per_head.loc[("A", "image", *VISION), "frac_universal_vision"] == 1.0
    assert per_head.loc[("A", "text", *TEXT), "frac_universal_text"] == 1.0
    assert per_head.loc[("A", "image", *PARTIAL), "frac_significant"] == 1.0
    assert per_head.loc[("B", "image", *PARTIAL), "frac_significant"] == 0.0
    assert per_head.loc[("A", "image", *PARTIAL), "frac_universal"] == 0.0
    assert per_head.loc[("A", "image", 0, 0), "frac_significant"] == 0.0
    low, high = per_head.loc[("A", "image", *MULTIMODAL), ["ci_low", "ci_high"]]
    assert 9.8 <= low <= 10.0 <= high <= 10.2
    # the same seed gives the same draws
    pd.testing.assert_frame_equal(boot, bootstrap_heads(results, n_draws=200, seed=1, k=2.0, metric="logit_diff"))


def test_bootstrap_borderline_fraction():
    n, n_draws, seed = 5, 2000, 7
    boot = bootstrap_heads(borderline_results(n), n_draws=n_draws, seed=seed, k=2.0, metric="logit_diff")
    head = boot[(boot["layer"] == 1) & (boot["head"] == 1)].set_index("modality")
    # direct re-implementation with the same generator: significant iff sample s0 is drawn
    drawn = {
        modality: (
            bootstrap_indices(seed, ("toy", "A", CORRUPTION[modality], modality, "cross_attn_head"), n, n_draws) == 0
        ).any(axis=1)
        for modality in ("image", "text")
    }
    assert head.loc["image", "frac_significant"] == drawn["image"].mean()
    assert head.loc["text", "frac_significant"] == drawn["text"].mean()
    assert head.loc["image", "frac_universal_multimodal"] == (drawn["image"] & drawn["text"]).mean()
    assert head.loc["image", "frac_universal_vision"] == (drawn["image"] & ~drawn["text"]).mean()
    assert head.loc["image", "frac_universal_text"] == (~drawn["image"] & drawn["text"]).mean()
    # and the analytic probability, within 4 binomial standard errors
    p = 1 - (1 - 1 / n) ** n
    assert abs(head.loc["image", "frac_significant"] - p) < 4 * math.sqrt(p * (1 - p) / n_draws)
    assert abs(head.loc["image", "frac_universal_multimodal"] - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / n_draws)


def test_universal_heads_table_merges_stability():
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads(sig)
    boot = bootstrap_heads(results, n_draws=50, seed=0, k=2.0, metric="logit_diff")
    table = universal_heads_table(sig, universal, boot)
    assert set(table["label"]) == {"L2.H0", "L1.H2", "L0.H3"}
    assert len(table) == 3 * 4  # one row per universal head and condition
    assert (table["frac_universal_kind"] == 1.0).all()
    assert table["kind"].tolist()[:4] == ["vision"] * 4  # ordered vision, text, multimodal
    vision = table[table["kind"] == "vision"].set_index(["task", "modality"])
    assert vision.loc[("A", "image"), "significant"] and not vision.loc[("A", "text"), "significant"]


def test_universal_heads_table_lists_frequent_bootstrap_heads():
    sig = significant_heads(head_effects(borderline_results()))
    universal = universal_heads(sig)  # on the full data, the head is multimodal
    boot = bootstrap_heads(borderline_results(), n_draws=200, seed=3, k=2.0, metric="logit_diff")
    table = universal_heads_table(sig, universal.iloc[0:0], boot, min_frac_universal=0.5)
    assert set(table["label"]) == {"L1.H1"} and set(table["kind"]) == {"none"}
    assert table["frac_universal_kind"].isna().all()


def test_module_effects_mean_and_token_labels():
    effects = module_effects(module_rows(), metric="prob_restoration")
    assert set(effects["site"]) == {"mlp", "self_attn"}  # head rows are not module rows
    assert len(effects) == 2 * 2 * 5
    cell = effects.set_index(["site", "layer", "position"]).loc[("mlp", 1, 2)]
    assert cell["mean"] == pytest.approx(np.mean([0, 1, 2]) + 1 + 2)
    assert cell["n"] == 3 and cell["token"] == "red/blue" and cell["metric"] == "prob_restoration"
    assert effects.set_index(["site", "layer", "position"]).loc[("mlp", 0, 0), "token"] == "[CLS]"


def test_token_label_orders_by_frequency_and_truncates():
    assert token_label(["b", "a", "b"]) == "b/a"
    assert token_label(["a", "b"]) == "a/b"
    assert token_label(list("abcdd")) == "d/a/b/…"


def test_universal_heads_summary_table1():
    results = planted_results()
    sig = significant_heads(head_effects(results))
    boot = bootstrap_heads(results, n_draws=50, seed=0, k=2.0, metric="logit_diff")
    table = universal_heads_table(sig, universal_heads(sig), boot)
    summary = universal_heads_summary(table, corruptions=["sip", "str"]).set_index("label")
    assert summary["kind"].to_dict() == {"L1.H2": "vision", "L0.H3": "text", "L2.H0": "multimodal"}
    # vision: defined by the image conditions only (tasks A and B under SIP), multimodal by all four
    assert summary.loc["L1.H2", "n_conditions"] == 2 and summary.loc["L2.H0", "n_conditions"] == 4
    vision = table[(table["label"] == "L1.H2") & (table["modality"] == "image")]
    assert summary.loc["L1.H2", "mean_effect"] == pytest.approx(vision["mean"].mean())
    assert summary.loc["L1.H2", "ci_low_min"] == vision["ci_low"].min()
    assert summary.loc["L1.H2", "frac_significant_min"] == vision["frac_significant"].min() == 1.0
    assert summary.loc["L1.H2", "frac_universal"] == 1.0
    assert summary.loc["L1.H2", "conditions"].startswith("A/sip: 10 [")
    by_kind = universal_heads_by_kind(universal_heads_summary(table)).iloc[0]
    assert (by_kind["vision heads"], by_kind["text heads"], by_kind["multimodal heads"]) == ("L1.H2", "L0.H3", "L2.H0")


# -- half precision: effects below the precision audit's floor ------------------------------------------------
def floors_of(results: pd.DataFrame, floor: float) -> pd.DataFrame:
    """The same precision floor for every (model, task, corruption, site) of `results`."""
    return results[["model", "task", "corruption", "site"]].drop_duplicates().assign(floor=floor)


def unmarked(marked: pd.DataFrame, task: str, modality: str) -> set:
    rows = marked[(marked["task"] == task) & (marked["modality"] == modality) & ~marked["below_precision"]]
    return set(zip(rows["layer"], rows["head"]))


def test_a_head_below_precision_is_never_significant():
    results = planted_results()
    effects = head_effects(results)
    low = mark_precision(effects, results, floors_of(results, 5.0), HEAD_KEYS, HEAD_SITES)
    assert list(low.columns) == [*effects.columns, "below_precision"]
    for (task, modality), planted in PLANTED.items():
        assert unmarked(low, task, modality) == set(planted)  # effects of 10 stand above a floor of 5; zeros do not
    # The planted heads are above the floor: the same heads are significant as without an audit.
    pd.testing.assert_frame_equal(significant_heads(low).drop(columns="below_precision"), significant_heads(effects))
    high = significant_heads(mark_precision(effects, results, floors_of(results, 15.0), HEAD_KEYS, HEAD_SITES))
    assert high["below_precision"].all() and not high["significant"].any()
    assert high["threshold"].equals(significant_heads(effects)["threshold"])  # the k-sigma rule is as it was
    assert universal_heads(high).empty


def test_below_precision_is_judged_on_the_logit_difference_whatever_the_metric():
    results = planted_results()  # prob_restoration = logit_diff / 20: the planted heads' 0.5 is below 5
    effects = head_effects(results, "prob_restoration")
    marked = mark_precision(effects, results, floors_of(results, 5.0), HEAD_KEYS, HEAD_SITES, "prob_restoration")
    assert list(marked.columns) == [*effects.columns, "below_precision"]
    for (task, modality), planted in PLANTED.items():
        assert unmarked(marked, task, modality) == set(planted)


def test_module_effects_are_marked_by_their_mean_logit_difference():
    results = module_rows().assign(logit_diff=lambda df: df["prob_restoration"])
    effects = module_effects(results, "prob_restoration")
    marked = mark_precision(effects, results, floors_of(results, 3.0), MODULE_KEYS, MODULE_SITES, "prob_restoration")
    assert marked["below_precision"].tolist() == (module_effects(results)["mean"] <= 3.0).tolist()
    assert marked["below_precision"].any() and not marked["below_precision"].all()


def test_the_bootstrap_applies_the_floor_in_every_draw():
    n, n_draws, seed = 5, 2000, 7
    results = borderline_results(n)
    boot = bootstrap_heads(results, n_draws, seed, 2.0, "logit_diff", floors=floors_of(results, 10.0))
    head = boot[(boot["layer"] == 1) & (boot["head"] == 1)].set_index("modality")
    # The head's resampled mean is 30 x (times sample s0 is drawn) / 5: above the k-sigma threshold once s0 is
    # drawn, above the floor of 10 only when it is drawn twice or more.
    twice = {
        modality: (
            bootstrap_indices(seed, ("toy", "A", CORRUPTION[modality], modality, "cross_attn_head"), n, n_draws) == 0
        ).sum(axis=1)
        >= 2
        for modality in ("image", "text")
    }
    assert head.loc["image", "frac_significant"] == twice["image"].mean()
    assert head.loc["text", "frac_significant"] == twice["text"].mean()
    assert head.loc["image", "frac_universal_multimodal"] == (twice["image"] & twice["text"]).mean()
    assert head.loc["image", "frac_universal_vision"] == (twice["image"] & ~twice["text"]).mean()
    # The interval of the mean is the data's, whatever the floor.
    plain = bootstrap_heads(results, n_draws, seed, 2.0, "logit_diff")
    pd.testing.assert_frame_equal(boot[["ci_low", "ci_high"]], plain[["ci_low", "ci_high"]])
    # Conditions without a floor (a full-precision run's) are as without an audit.
    unaudited = bootstrap_heads(results, n_draws, seed, 2.0, "logit_diff", floors=floors_of(results, 10.0).iloc[0:0])
    pd.testing.assert_frame_equal(unaudited, plain)


def test_the_bootstrap_floor_is_on_the_logit_difference_whatever_the_metric():
    results = planted_results()
    plain = bootstrap_heads(results, 50, 0, 2.0, "prob_restoration")
    low = bootstrap_heads(results, 50, 0, 2.0, "prob_restoration", floors=floors_of(results, 5.0))
    pd.testing.assert_frame_equal(low, plain)  # the planted heads' logit_diff (10) stays above 5 in every draw
    assert plain["frac_significant"].max() == 1.0
    high = bootstrap_heads(results, 50, 0, 2.0, "prob_restoration", floors=floors_of(results, 15.0))
    assert (high["frac_significant"] == 0).all() and (high["frac_universal"] == 0).all()


def test_the_universal_heads_table_says_which_heads_are_below_precision():
    results = planted_results()
    floors = floors_of(results, 5.0)
    sig = significant_heads(mark_precision(head_effects(results), results, floors, HEAD_KEYS, HEAD_SITES))
    boot = bootstrap_heads(results, n_draws=50, seed=0, k=2.0, metric="logit_diff", floors=floors)
    table = universal_heads_table(sig, universal_heads(sig), boot)
    columns = list(table.columns)
    assert columns[columns.index("significant") + 1] == "below_precision"
    # each universal head is above the floor where it is significant, below it where its effect is 0
    assert not table.loc[table["significant"], "below_precision"].any() and table["below_precision"].any()
    plain = significant_heads(head_effects(results))
    unaudited = universal_heads_table(plain, universal_heads(plain), bootstrap_heads(results, 50, 0, 2.0))
    assert "below_precision" not in unaudited.columns
