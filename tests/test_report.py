"""The report is one offline HTML file holding every figure, table and the generated summary."""

import base64
import re

import pandas as pd
import pytest
from planted_tables import accuracy_table, borderline_results, empty_screen, planted_results

from notice.method.head_functions import HeadFunctionConfig, grounding_summary, scores_from_records
from notice.method.heads import bootstrap_heads, head_effects, significant_heads, universal_heads, universal_heads_table
from notice.method.precision import AUDIT_COLUMNS
from notice.present.accuracy import accuracy_chart
from notice.present.effects import bootstrap_stability, head_heatmaps
from notice.present.findings import summarise_findings
from notice.present.page import Figure, Section, Table, build_report
from notice.present.report import workflow_report


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads(sig)
    table = universal_heads_table(sig, universal, bootstrap_heads(results, n_draws=40, seed=0))
    pngs = [
        p
        for p in head_heatmaps(sig, universal, out)
        + bootstrap_stability(table, out)
        + accuracy_chart(accuracy_table(), out)
        if p.suffix == ".png"
    ]
    return out, table, pngs


def test_report_contains_every_figure_and_is_offline(analysis):
    out, table, pngs = analysis
    summary = summarise_findings(table, accuracy_table())
    sections = [
        Section("Summary", html=summary),
        Section(
            "Heads",
            text="Patching single heads.\n\nSource: https://example.org/data.csv",
            figures=[Figure(p, f"Caption for {p.stem}") for p in pngs],
        ),
        Section("Tables", tables=[Table(table, "Universal heads"), Table(accuracy_table(), "Accuracy")]),
    ]
    html = build_report(sections, out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert "example.org/data.csv" in html  # the URL is shown as text, not as a reference
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert sorted(embedded) == sorted(base64.b64encode(p.read_bytes()).decode() for p in pngs)
    for p in pngs:
        assert f"Caption for {p.stem}</figcaption>" in html
    assert html.count("<table") == 2 and "<figcaption>Universal heads</figcaption>" in html
    assert "L2.H0" in html and "multimodal" in html
    assert not re.search(r'(?:src|href)="(?!data:|#)', html)


def test_a_table_scrolls_in_its_own_box_and_an_empty_one_says_what_it_means(tmp_path):
    wide = pd.DataFrame([range(30)], columns=[f"column_{i}" for i in range(30)])
    tables = [Table(wide, "Wide."), Table(wide.iloc[0:0], "Empty.", "No rows here: nothing was measured.")]
    html = build_report([Section("Tables", tables=tables)], tmp_path / "r.html").read_text()
    assert '<figcaption>Wide.</figcaption><div class="scroll"><table' in html and html.count("<table") == 1
    assert '<figcaption>Empty.</figcaption><p class="empty">No rows here: nothing was measured.</p>' in html
    assert re.search(r"\.scroll \{ overflow-x: auto; \}", html)


def test_report_refuses_external_references(tmp_path):
    with pytest.raises(ValueError, match="external"):
        build_report([Section("x", html='<img src="logo.png">')], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_summary_numbers(analysis):
    _, table, _ = analysis
    summary = summarise_findings(table, accuracy_table(), models=["toy", "other"])
    assert "vision: L1.H2 (vision in 100% of 40 resamples)" in summary
    assert "text: L0.H3 (text in 100% of 40 resamples)" in summary
    assert "multimodal: L2.H0 (multimodal in 100% of 40 resamples)" in summary
    assert "<b>other</b>: no universal heads." in summary
    assert "Conditions: image corruption: A (sip), B (sip); text corruption: A (str), B (str)" in summary
    assert "A 85.0% (17/20), lowest category blue 80.0%" in summary
    assert "B 100.0% (5/5), lowest category happy 100.0%" in summary
    assert "2 standard deviations" in summary


def test_summary_of_a_model_without_universal_heads_names_its_significant_heads(analysis):
    _, table, _ = analysis
    rows = [  # (task, corruption, layer, head, mean, significant): a different head per task, none universal
        ("A", "sip", 0, 1, 2.0, True),
        ("A", "sip", 1, 3, 1.5, True),
        ("A", "sip", 0, 0, 0.1, False),
        ("B", "sip", 1, 0, 3.0, True),
        ("B", "sip", 0, 1, 0.2, False),
        ("A", "str", 0, 2, 0.1, False),
        ("B", "str", 1, 1, 0.4, True),
        ("A", "gn_mult", 1, 1, 5.0, True),  # Gaussian noise does not define universal heads
    ]
    significant = pd.DataFrame(
        [
            {
                "model": "other",
                "site": "cross_attn_head",
                "task": t,
                "corruption": c,
                "layer": layer,
                "head": head,
                "mean": mean,
                "significant": sig,
            }
            for t, c, layer, head, mean, sig in rows
        ]
    )
    summary = summarise_findings(table, accuracy_table(), models=["toy", "other"], significant=significant)
    assert (
        "<b>other</b>: no universal heads.<br><small>Significant heads per condition: A (sip): L0.H1, L1.H3; "
        "A (str): none; B (sip): L1.H0; B (str): L1.H1.</small>"
    ) in summary
    assert "gn_mult" not in summary
    assert "vision: L1.H2 (vision in 100% of 40 resamples)" in summary  # models with universal heads unchanged


def test_summary_lists_frequent_candidates():
    results = borderline_results()
    sig = significant_heads(head_effects(results))
    boot = bootstrap_heads(results, n_draws=100, seed=3)
    table = universal_heads_table(sig, universal_heads(sig).iloc[0:0], boot, min_frac_universal=0.5)
    accuracy = pd.DataFrame(
        {"model": ["toy"], "task": ["A"], "category": ["(all)"], "n": [4], "n_correct": [3], "accuracy": [0.75]}
    )
    summary = summarise_findings(table, accuracy)
    frac = boot.loc[(boot["layer"] == 1) & (boot["head"] == 1), "frac_universal"].iloc[0]
    assert f"often under resampling: L1.H1 (universal in {frac:.0%} of 100 resamples)" in summary
    assert "toy: A 75.0% (3/4)." in summary


def audit_rows(values: dict) -> pd.DataFrame:
    """One AUDIT_COLUMNS row of a bfloat16 toy model, with `values`."""
    row = dict.fromkeys(AUDIT_COLUMNS, 0.0)
    row |= {"model": "toy", "dataset": "synthetic", "corruption": "sip", "site": "cross_attn_head"}
    row |= {"dtype": "bfloat16", "audit_dtype": "float32", "audit_device": "cpu", "n_rows": 360, "n_audited": 40}
    return pd.DataFrame([row | values], columns=list(AUDIT_COLUMNS))


def workflow_html(out, analysis, precision=None, screen_precision=None) -> str:
    _, table, _ = analysis
    sig = significant_heads(head_effects(planted_results()))
    keys = ["model", "site", "dataset"]
    scores = scores_from_records({}, keys, HeadFunctionConfig())
    screen = empty_screen(screen_precision)
    (out / "toy").mkdir(exist_ok=True)
    settings = {"k_sigma": 2.0, "universal_corruptions": ["sip", "str"], "head_functions": {}}
    if precision is not None:
        settings["precision_k"] = 3.0
    path = workflow_report(
        table,
        sig,
        accuracy_table(),
        scores,
        grounding_summary(scores, keys),
        {"toy": out / "toy"},
        settings,
        out / "report.html",
        out / "tables",
        screen,
        precision,
    )
    return path.read_text()


def test_the_report_shows_the_precision_audits_of_half_precision_models(analysis, tmp_path):
    audit = audit_rows({"median": 0.0123, "p95": 0.0456, "max": 0.0789, "effect_spread": 1.25})
    screen_audit = audit_rows({"site": "mlp", "median": 0.0321, "p95": 0.0654, "max": 0.0987})
    html = workflow_html(tmp_path, analysis, audit, screen_audit)
    universal = html[html.index("<h2>Universal heads</h2>") : html.index("<h2>Head functions</h2>")]
    assert "Precision audit of the models patched in float16 / bfloat16" in universal
    assert "not above 3 × p95 is marked below_precision" in universal
    assert all(number in universal for number in ("0.0123", "0.0456", "0.0789", "1.25", "bfloat16"))
    screen = html[html.index("<h2>Attribution screen</h2>") :]
    assert "Precision audit of the screen" in screen and "0.0654" in screen and "0.0456" not in screen
    empty = workflow_html(tmp_path, analysis, audit.iloc[0:0], screen_audit.iloc[0:0])
    assert "No audited rows: the patching tables of the half-precision models have no rows." in empty


def test_a_full_precision_run_shows_no_precision_audit(analysis, tmp_path):
    html = workflow_html(tmp_path, analysis)
    assert "Precision audit" not in html and "below_precision" not in html
