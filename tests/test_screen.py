"""The screen's validation against exact tables, its confirmations and image maps, from constructed tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from toy_adapters import clean_and_corrupt, llava_adapter

from notice.files.tables import RESULT_COLUMNS, TableError
from notice.method.screen import (
    KEY_COLUMNS,
    TABLE_COLUMNS,
    VALIDATION_COLUMNS,
    confirm_patches,
    object_fraction_table,
    object_share,
    paired_effects,
    screen_pairs,
    validation_tables,
)
from notice.patching.attribution import attribution_estimates, estimates_table
from notice.patching.engines import get_engine

LABELS = {"model": "m", "dataset": "d", "task": "colour", "corruption": "sip", "modality": "image"}


def tables(n_samples: int = 6, n_sites: int = 30, seed: int = 0, method: str = "atp"):
    """A screen table and an exact table over the same keys, the estimate a noisy copy of the exact effect."""
    rng = np.random.default_rng(seed)
    screen, exact = [], []
    for sample in range(n_samples):
        effect = rng.normal(size=n_sites) * np.linspace(3, 0.1, n_sites)
        keys = pd.DataFrame(
            {**LABELS, "sample_id": f"s{sample}", "site": "mlp", "layer": np.arange(n_sites) // 10, "head": -1}
        ).assign(position=np.arange(n_sites) % 10)
        estimate = effect + 0.1 * rng.normal(size=n_sites)
        screen.append(
            keys.assign(
                token="t",
                estimate=np.abs(estimate) if method == "atp_star" else estimate,
                estimate_atp=estimate,
                ld_clean=1.0,
                ld_corrupt=-1.0,
                method=method,
            )
        )
        exact.append(keys.assign(token="t", logit_diff=effect))
    screen_df = pd.concat(screen, ignore_index=True)[list(TABLE_COLUMNS)]
    exact_df = pd.concat(exact, ignore_index=True)
    for column in RESULT_COLUMNS:
        if column not in exact_df:
            exact_df[column] = 0.0
    return screen_df, exact_df[list(RESULT_COLUMNS)]


def test_a_faithful_screen_validates_and_a_broken_exact_table_lowers_the_numbers():
    screen, exact = tables()
    validation, misses = validation_tables(paired_effects(screen, [exact]), top_k=10, dtype="float32")
    assert list(validation.columns) == list(VALIDATION_COLUMNS)
    [row] = validation.to_dict("records")
    assert row["n_sites"] == 180 and row["n_samples"] == 6 and row["sites_per_sample"] == 30
    assert row["spearman"] > 0.95 and row["pearson"] > 0.95 and row["recall_top10"] >= 0.9
    assert row["spearman_atp"] == row["spearman"]  # method atp: the same estimate
    broken = exact.copy()
    broken["logit_diff"] = broken["logit_diff"].sample(frac=1.0, random_state=1).to_numpy()
    [after] = validation_tables(paired_effects(screen, [broken]), top_k=10, dtype="float32")[0].to_dict("records")
    assert after["spearman"] < 0.3 and after["recall_top10"] < row["recall_top10"] and after["misses"] > row["misses"]
    assert len(validation_tables(paired_effects(screen, [broken]), top_k=10, dtype="float32")[1]) == after["misses"]


def test_misses_are_exact_top10_sites_outside_the_screens_top_k():
    screen, exact = tables(n_samples=1)
    top = exact["logit_diff"].abs().idxmax()
    screen.loc[top, "estimate"] = 0.0  # the largest exact effect, estimated as nothing
    validation, misses = validation_tables(paired_effects(screen, [exact]), top_k=10, dtype="float32")
    assert validation["misses"].iloc[0] >= 1
    assert (misses["position"] == exact.loc[top, "position"]).any() and (misses["exact_rank"] == 1).any()
    assert misses.loc[misses["exact_rank"] == 1, "screen_rank"].iloc[0] > 10


def test_recall_is_not_reported_where_the_top_k_holds_every_site():
    screen, exact = tables(n_sites=8)
    [row] = validation_tables(paired_effects(screen, [exact]), top_k=10, dtype="float32")[0].to_dict("records")
    assert np.isnan(row["recall_top10"]) and row["misses"] == 0 and row["spearman"] > 0.9


def test_grad_drop_scores_are_compared_with_the_size_of_the_exact_effect():
    screen, exact = tables(method="atp_star")
    [row] = validation_tables(paired_effects(screen, [exact]), top_k=10, dtype="float32")[0].to_dict("records")
    assert row["spearman"] > 0.9  # |estimate| against |exact|; against the signed effect it would be ~0


def test_draws_of_a_sample_are_averaged_on_both_sides_and_exact_tables_are_merged():
    screen, exact = tables(n_samples=2)
    doubled_screen = pd.concat([screen, screen.assign(estimate=screen["estimate"] + 1.0)], ignore_index=True)
    doubled_exact = pd.concat([exact, exact.assign(logit_diff=exact["logit_diff"] - 1.0)], ignore_index=True)
    paired = paired_effects(doubled_screen, [doubled_exact])
    assert len(paired) == len(screen)
    merged = paired.merge(screen, on=list(KEY_COLUMNS), suffixes=("", "_one"))
    assert np.allclose(merged["estimate"], merged["estimate_one"] + 0.5)
    assert np.allclose(merged["exact"], merged.merge(exact, on=list(KEY_COLUMNS))["logit_diff"] - 0.5)
    # a second exact table (the confirmations) adds keys; a key in both keeps the first
    confirmed = exact.assign(logit_diff=99.0)
    assert (paired_effects(screen, [exact.head(5), confirmed])["exact"] == 99.0).sum() == len(exact) - 5


def test_missing_columns_name_the_table():
    screen, exact = tables()
    with pytest.raises(TableError, match="exact results table"):
        paired_effects(screen, [exact.drop(columns="logit_diff")])
    with pytest.raises(TableError, match="screen table"):
        paired_effects(screen.drop(columns="estimate"), [exact])


def test_object_share_and_its_table():
    mask = np.zeros((8, 8))
    mask[:4, :4] = 1.0  # the top-left patch of a 2×2 grid
    effects = np.array([[3.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])  # two layers; Σ = [2, 1, 0, 0]
    share, area = object_share(effects, mask, (2, 2))
    assert share == pytest.approx(2 / 3) and area == pytest.approx(0.25)
    records = [
        {"task": "colour", "sample_id": "a", "effects": effects, "mask": mask, "grid": np.array([2, 2])},
        {"task": "colour", "sample_id": "b", "effects": np.zeros((2, 4)), "mask": mask, "grid": np.array([2, 2])},
    ]
    [row] = object_fraction_table(records, {"model": "m"}).to_dict("records")
    assert row["n_samples"] == 1 and row["n_no_effect"] == 1 and row["ratio"] == pytest.approx((2 / 3) / 0.25)


def test_confirmed_sites_are_the_top_ranked_patchable_ones():
    adapter = llava_adapter()
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    table = estimates_table(attribution_estimates(adapter, clean, corrupt, 5, 6), clean.tokens)
    patches = confirm_patches(adapter, table, 7)
    assert len(patches) == 7 and all(p.site != "image" for p in patches)
    patchable = table[table["site"] != "image"]
    assert {abs(v) for v in patchable["estimate"].abs().nlargest(7)} == {
        abs(
            float(
                table.loc[
                    (table["site"] == p.site)
                    & (table["layer"] == p.layer)
                    & (table["head"] == p.head)
                    & (table["position"] == p.position),
                    "estimate",
                ].iloc[0]
            )
        )
        for p in patches
    }


def test_a_screen_setting_the_model_cannot_take_names_the_config_key():
    adapter = llava_adapter()
    for settings, expected in [
        ({"sites": ["cross_attn"]}, "config screen: screen sites \\['cross_attn'\\] do not exist"),
        ({"grad_drop": True}, "config screen: qk_fix and grad_drop are the parts of method atp_star"),
    ]:
        with pytest.raises(ValueError, match=expected):
            screen_pairs(
                adapter,
                pd.DataFrame(),
                lambda path: None,
                engine=get_engine("reference", 1),
                settings={"method": "atp", "confirm_top": 0, **settings},  # the schema's defaults
                corruption_settings={},
                labels={},
                masks={},
            )
