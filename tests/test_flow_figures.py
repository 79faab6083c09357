"""The flow stage's figures, summaries and report section, on hand-built tables with planted effects."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from planted_tables import (
    FLOW_LAYERS,
    FLOW_WINDOW,
    KNOCKOUT_DIPS,
    LENS_OBJECT,
    accuracy_table,
    planted_ablation,
    planted_knockout,
    planted_lens,
    planted_results,
    planted_skipped,
)

from notice.flow.logit_lens import lens_shares
from notice.method.head_functions import HeadFunctionConfig, grounding_summary, scores_from_records
from notice.method.heads import bootstrap_heads, head_effects, significant_heads, universal_heads, universal_heads_table
from notice.present.flow import (
    ablation_figure,
    ablation_summary,
    knockout_chart,
    knockout_curves,
    knockout_figure,
    lens_map_cells,
    lens_map_figure,
    lens_share_chart,
    lens_share_figure,
    map_layers,
    skipped_summary,
)
from notice.present.report import FLOW_TITLE, FlowResults, workflow_report


def test_knockout_curves_average_the_samples_and_dip_at_the_planted_window():
    curves = knockout_curves(planted_knockout())
    assert len(curves) == 2 * 2 * (FLOW_LAYERS - FLOW_WINDOW + 1)
    assert set(curves["n_samples"]) == {6} and set(curves["window"]) == {FLOW_WINDOW}
    for task, dips in KNOCKOUT_DIPS.items():
        curve = curves[(curves["task"] == task) & (curves["edge"] == "image:last")].set_index("layer_start")
        assert curve["mean"].idxmin() == min(dips, key=dips.get)
        expected = [dips.get(start, 0.0) for start in range(FLOW_LAYERS - FLOW_WINDOW + 1)]
        np.testing.assert_allclose(curve["mean"].to_numpy(), expected, atol=1e-12)
        # ±0.02 alternating over 6 samples: sd = 0.02·sqrt(6/5), sem = sd / sqrt(6)
        np.testing.assert_allclose(curve["sem"], 0.02 * np.sqrt(6 / 5) / np.sqrt(6))
        flat = curves[(curves["task"] == task) & (curves["edge"] == "question:last")]
        np.testing.assert_allclose(flat["mean"], 0.0, atol=1e-12)


def test_the_knockout_figure_has_a_panel_per_task_and_a_line_per_edge(tmp_path):
    paths = knockout_figure(planted_knockout(), tmp_path / "knockout_toy_synthetic", "toy: knockout")
    assert [p.name for p in paths] == [f"knockout_toy_synthetic.{ext}" for ext in ("png", "svg", "html")]
    assert all(p.stat().st_size > 0 for p in paths)
    spec = knockout_chart(knockout_curves(planted_knockout()), "t").to_dict()
    assert spec["facet"]["column"]["field"] == "task"
    values = pd.DataFrame(next(iter(spec["datasets"].values())))
    assert set(values["edge"]) == {"image:last", "question:last"}
    deepest = values.loc[values["change"].idxmin()]
    assert (deepest["task"], deepest["edge"], deepest["layer_start"]) == ("shape", "image:last", 5)
    assert deepest["change"] == pytest.approx(-90.0)  # in percent
    with pytest.raises(ValueError, match="no knockout rows"):
        knockout_figure(planted_knockout().iloc[:0], tmp_path / "empty", "t")


def test_the_lens_share_chart_draws_the_shares_per_layer_and_task():
    spec = lens_share_chart(lens_shares(planted_lens(), by=["task"]), "t").to_dict()
    values = pd.DataFrame(next(iter(spec["datasets"].values()))).set_index(["task", "word", "layer"])["share"]
    values = values.sort_index()
    assert list(values.loc["colour", "answer"]) == [0.0, 0.0, pytest.approx(4 / 9), 1.0]
    assert list(values.loc["colour", "object word"]) == [0.0, 0.0, 0.0, pytest.approx(4 / 9)]
    assert ("shape", "object word") not in values.index.droplevel("layer")  # no object word known: no line
    assert list(values.loc["shape", "answer"]) == list(values.loc["colour", "answer"])


def test_lens_maps_take_samples_of_every_task_and_the_planted_cells_are_in_the_top5(tmp_path):
    cells = lens_map_cells(planted_lens(), n_samples=3, n_layers=2)
    assert list(dict.fromkeys(cells["sample_id"])) == ["colour0", "shape0", "colour1"]
    assert sorted(cells["layer"].unique()) == [0, 3]
    at_two = lens_map_cells(planted_lens(), n_samples=1, n_layers=4)
    top = at_two[(at_two["layer"] == 2) & at_two["in_top5"]]
    assert set(zip(top["row"], top["col"])) == LENS_OBJECT
    assert map_layers(pd.Series(range(8)), 4) == [0, 2, 5, 7]
    for draw, stem in ((lens_share_figure, "lens_toy_synthetic"), (lens_map_figure, "lensmap_toy_synthetic")):
        paths = draw(planted_lens(), tmp_path / stem, "toy: logit lens")
        assert [p.suffix for p in paths] == [".png", ".svg", ".html"] and all(p.stat().st_size for p in paths)


def test_ablation_summary_averages_random_draws_within_a_sample_first(tmp_path):
    summary = ablation_summary(planted_ablation()).set_index(["task", "ablated"])
    assert summary.loc[("colour", "object"), "ld_change"] == pytest.approx(-2.0)
    assert summary.loc[("colour", "random"), "ld_change"] == pytest.approx(-0.1)
    assert summary.loc[("shape", "random"), "ld_change"] == pytest.approx(-0.3)
    assert summary.loc[("colour", "object"), "ld_change_sem"] == 0.0
    assert summary.loc[("colour", "object"), "accuracy_change"] == pytest.approx(-0.25)
    assert summary.loc[("colour", "random"), "accuracy_change"] == 0.0
    assert set(summary["n_samples"]) == {4} and set(summary["n_tokens"]) == {4}
    paths = ablation_figure(summary.reset_index(), tmp_path / "flowablation_toy", "toy: ablation")
    assert [p.suffix for p in paths] == [".png", ".svg", ".html"]


def test_skipped_summary_counts_samples_per_reason():
    summary = skipped_summary(planted_skipped())
    assert summary[["analysis", "item", "n_samples"]].values.tolist() == [
        ["ablation", "object", 1],
        ["knockout", "object:last", 2],
        ["knockout", "object:question", 2],
    ]


@pytest.fixture(scope="module")
def head_tables():
    """The planted patching results' head tables (a short bootstrap: the report only lays them out)."""
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads_table(sig, universal_heads(sig), bootstrap_heads(results, n_draws=4, seed=0))
    keys = ["model", "site", "dataset"]
    scores = scores_from_records({}, keys, HeadFunctionConfig())
    return universal, sig, scores, grounding_summary(scores, keys)


def report(tmp_path, head_tables, flow) -> str:
    (tmp_path / "figures").mkdir(exist_ok=True)
    universal, sig, scores, grounding = head_tables
    settings = {"k_sigma": 2.0, "universal_corruptions": ["sip", "str"], "head_functions": {}}
    path = workflow_report(
        universal,
        sig,
        accuracy_table(),
        scores,
        grounding,
        {"toy": tmp_path / "figures"},
        settings,
        tmp_path / "report.html",
        tmp_path / "tables",
        flow=flow,
    )
    return path.read_text()


@pytest.fixture(scope="module")
def flow_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_figures")
    summary = ablation_summary(planted_ablation())
    knockout_figure(planted_knockout(), out / "knockout_toy_synthetic", "toy: knockout")
    lens_share_figure(planted_lens(), out / "lens_toy_synthetic", "toy: logit lens")
    lens_map_figure(planted_lens(), out / "lensmap_toy_synthetic", "toy: logit lens map")
    ablation_figure(summary, out / "flowablation_toy", "toy: ablation")
    return FlowResults(summary, skipped_summary(planted_skipped()), {"toy": out})


def test_the_report_has_the_flow_section_only_with_flow(tmp_path, head_tables, flow_results):
    html = report(tmp_path, head_tables, flow_results)
    assert html.count(FLOW_TITLE) >= 1
    for stem in ("knockout_toy_synthetic", "lens_toy_synthetic", "lensmap_toy_synthetic", "flowablation_toy"):
        assert f"File: {stem}." in html
    assert "Attention knockout (as Zhang et al." in html and "no object mask" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    without = report(tmp_path, head_tables, None)
    assert FLOW_TITLE not in without and "knockout_toy" not in without


def test_the_ablation_table_in_the_report_is_the_summary(tmp_path, head_tables, flow_results):
    html = report(tmp_path, head_tables, flow_results)
    section = html.split(FLOW_TITLE, 1)[1]
    assert "ld_change_sem" in section and "accuracy_change" in section
    assert json.dumps("object")[1:-1] in section and "random" in section
