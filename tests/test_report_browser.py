"""The workflow report, built from constructed inputs, opened in headless Chromium with no network.

Inputs: the planted head effects of test_heads (model "toy", cross-attention heads: L1.H2 vision,
L0.H3 text, L2.H0 multimodal) and hand-made attention records on a 4×4 patch grid whose object is
patches 0, 1, 4, 5 (area 1/4): in "toy", head L2.H0 puts all its attention on the object (4×
uniform); in "toy_llava" (self-attention) every head attends uniformly (1×). So the report must
answer the grounding question with "Yes" and those numbers.

Chromium loads a copy of the report with a checker script appended, which records after the load event
every image's natural size (logging a console error for any image that failed to decode) and the layout
in a window of a given width: the narrowest text block, the tables that run past their container
without a scrolling box, the tables without a row. Hand-made broken pages prove that each check can fail.
A second report is built from the same inputs without universal heads, head functions or screen rows:
each of its empty tables must say what it means.
"""

from __future__ import annotations

import html as html_text
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from planted_tables import accuracy_table, empty_screen, module_table, planted_results

from notice.method.head_functions import HeadFunctionConfig, grounding_summary, scores_from_records
from notice.method.heads import bootstrap_heads, head_effects, significant_heads, universal_heads, universal_heads_table
from notice.present.accuracy import accuracy_chart
from notice.present.attention import attention_overlays, overlay_panels
from notice.present.effects import bootstrap_stability, corruption_comparison, head_heatmaps, module_heatmaps
from notice.present.report import TABLE_FILES, workflow_report

GRID, OBJECT = (4, 4), [0, 1, 4, 5]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]
CHECKER = """<script>
window.addEventListener("load", () => {
  const body = document.body;
  const sizes = Array.from(document.images).map((img, i) => {
    if (!img.complete || img.naturalWidth === 0) console.error("broken image " + i);
    return img.naturalWidth + "x" + img.naturalHeight;
  });
  body.setAttribute("data-image-sizes", sizes.join(" "));
  body.setAttribute("data-viewport", String(window.innerWidth));
  const blocks = Array.from(document.querySelectorAll("p, li, caption, figcaption"))
    .filter((el) => el.textContent.trim() && el.getClientRects().length)
    .map((el) => [el.getBoundingClientRect().width, el.tagName.toLowerCase() + ": " + el.textContent.trim()]);
  blocks.sort((a, b) => a[0] - b[0]);
  body.setAttribute("data-narrowest-text", blocks.map((b) => Math.round(b[0]) + " " + b[1].slice(0, 80))[0] || "");
  // a table may reach past a box's edge only inside a box that scrolls sideways (overflow-x auto or scroll)
  const cut = [];
  Array.from(document.querySelectorAll("table")).forEach((table, i) => {
    const edge = table.getBoundingClientRect().right;
    for (let box = table.parentElement; box; box = box.parentElement) {
      const overflow = getComputedStyle(box).overflowX;
      if (overflow === "auto" || overflow === "scroll") break;
      if (edge > box.getBoundingClientRect().left + box.clientLeft + box.clientWidth + 1) {
        cut.push("table " + i + " runs past its " + box.tagName.toLowerCase());
        break;
      }
    }
  });
  body.setAttribute("data-cut-tables", cut.join("; "));
  const bare = Array.from(document.querySelectorAll("table")).filter((table) => !table.querySelector("tbody tr"));
  body.setAttribute("data-bare-tables", String(bare.length));
});
</script>"""
# the narrowest a text block may be in a 1400 or 800 px wide window: a readable line, not a word
MIN_TEXT_WIDTH = 300


def chromium() -> str:
    """The chromium binary; installed with apt when missing and running as root, else the test skips."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(command)}` failed: {done.stderr[-500:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def open_in_chromium(html: Path, tmp_path: Path, width: int = 1280) -> tuple[dict[str, str], list[str]]:
    """(what the checker recorded, console errors) of `html` with the checker appended, in a `width` px window."""
    checked = tmp_path / f"{html.stem}.{width}.checked.html"
    checked.write_text(html.read_text().replace("</body>", CHECKER + "</body>"))
    done = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--window-size={width},2000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body[^>]*data-image-sizes=[^>]*>", done.stdout)
    assert body, "the checker did not run: " + done.stdout[:500]
    found = {name: html_text.unescape(value) for name, value in re.findall(r'data-([a-z-]+)="([^"]*)"', body.group())}
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and ("rror" in line or "broken" in line)]
    return found, errors


def records(site_weights: np.ndarray, prefix: str) -> list[dict]:
    """Two samples with the same [L, H, Q, P] attention, the object mask on the top-left quarter."""
    mask = np.zeros((32, 32), np.float32)
    mask[:16, :16] = 1.0
    rng = np.random.default_rng(0)
    return [
        {
            "sample_id": f"{prefix}{i}",
            "task": "A",
            "weights": site_weights,
            "mass": np.ones(site_weights.shape[:3]),
            "all_heads_average": site_weights.mean(axis=(0, 1)),
            "layers": np.arange(site_weights.shape[0]),
            "heads": np.arange(site_weights.shape[1]),
            "grid": np.asarray(GRID),
            "query_labels": np.asarray(["is", "<answer>"]),
            "query_tokens": np.asarray(["is", "red"]),
            "head_query_index": 1,
            "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "mask": mask,
        }
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser")
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads_table(sig, universal_heads(sig), bootstrap_heads(results, n_draws=40, seed=0))
    cross = np.full((3, 6, 2, 16), 1 / 16)
    cross[2, 0, :, :] = 0.0
    cross[2, 0, :, OBJECT] = 0.25  # L2.H0: all attention on the object
    self_ = np.full((2, 4, 2, 16), 1 / 16)
    config = HeadFunctionConfig()
    keys = ["model", "site", "dataset"]
    groups = {
        ("toy", "cross_attn_head", "synthetic"): records(cross, "b"),
        ("toy_llava", "self_attn_head", "synthetic"): records(self_, "l"),
    }
    scores = scores_from_records(groups, keys, config)
    grounding = grounding_summary(scores, keys)
    figure_dirs = {"toy": out / "toy", "toy_llava": out / "toy_llava"}
    modules = module_table()
    pngs = [
        p
        for p in module_heatmaps(modules, figure_dirs["toy"])
        + head_heatmaps(sig, universal, figure_dirs["toy"])
        + corruption_comparison(modules, figure_dirs["toy"])
        + bootstrap_stability(universal, figure_dirs["toy"])
        + accuracy_chart(accuracy_table(), figure_dirs["toy"])
        if p.suffix == ".png"
    ]
    for (model, site, _), recs in groups.items():
        in_model = (universal["model"] == model) & (universal["site"] == site)
        panels = overlay_panels(universal[in_model], scores[(scores["model"] == model)], max_heads=4)
        pngs += [
            p
            for p in attention_overlays(recs, panels, figure_dirs[model] / f"attention_{model}_synthetic", model)
            if p.suffix == ".png"
        ]
    html = workflow_report(
        universal,
        sig,
        accuracy_table(),
        scores,
        grounding,
        figure_dirs,
        {"k_sigma": 2.0, "universal_corruptions": ["sip", "str"], "head_functions": {}},
        out / "report.html",
        out / "tables",
    )
    return html, pngs, out


@pytest.fixture(scope="module")
def empty_report(tmp_path_factory):
    """The report of a run without universal heads (nor candidates), attention records or screen rows."""
    out = tmp_path_factory.mktemp("empty")
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads_table(sig, universal_heads(sig), bootstrap_heads(results, n_draws=40, seed=0))
    keys = ["model", "site", "dataset"]
    scores = scores_from_records({}, keys, HeadFunctionConfig())
    screen = empty_screen()
    (out / "toy").mkdir()
    return workflow_report(
        universal.iloc[0:0],
        sig,
        accuracy_table(),
        scores,
        grounding_summary(scores, keys),
        {"toy": out / "toy"},
        {"k_sigma": 2.0, "universal_corruptions": ["sip", "str"], "head_functions": {}},
        out / "report.html",
        out / "tables",
        screen,
    )


def test_report_answers_the_grounding_question_with_numbers(report):
    html, _, _ = report
    text = html.read_text()
    assert "Yes, in this run: cross-attention grounds objects and self-attention does not" in text
    assert "best cross-attention head L2.H0 (toy) 4.0× uniform attention on the object" in text
    assert "vs best self-attention head L0.H0 (toy_llava) 1.0×" in text
    assert "toy L2.H0 (multimodal), synthetic: object_detection at &lt;answer&gt;" in text


def test_paper_tables_written(report):
    _, _, out = report
    for name in TABLE_FILES:
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0
    table1 = pd.read_csv(out / "tables/table1_universal_heads.csv").set_index("label")
    assert table1.loc["L2.H0", "kind"] == "multimodal" and table1.loc["L1.H2", "kind"] == "vision"
    assert table1.loc["L2.H0", "n_conditions"] == 4 and table1.loc["L1.H2", "n_conditions"] == 2
    assert table1.loc["L2.H0", "frac_universal"] == 1.0
    assert (
        "| toy     | cross_attn_head | L1.H2          | L0.H3        | L2.H0"
        in (out / "tables/table1_universal_heads.md").read_text()
    )
    table3 = (out / "tables/table3_head_functions.md").read_text()
    assert re.search(r"\| toy +\| cross_attn_head \| object_detection +\| L2\.H0", table3)


def test_every_figure_renders_offline_in_chromium(report, tmp_path):
    html, pngs, out = report
    text = html.read_text()
    assert "http://" not in text and "https://" not in text
    assert text.count("<img") == len(pngs) and len(pngs) >= 7
    assert "attention_toy_llava_synthetic" in text and "Attention patterns (paper Fig. 6/7)" in text
    found, errors = open_in_chromium(html, tmp_path)
    sizes = found["image-sizes"].split()
    assert len(sizes) == len(pngs) and all(not s.startswith("0x") for s in sizes), sizes
    assert errors == [], errors
    screenshot = out / "report.png"
    done = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'shot'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,4000",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and screenshot.stat().st_size > 50_000, done.stderr[-2000:]
    print(f"screenshot: {screenshot}")


def test_the_browser_check_catches_a_broken_image(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="data:image/png;base64,bm90IGEgcG5n"></body></html>')
    found, errors = open_in_chromium(broken, tmp_path)
    assert found["image-sizes"] == "0x0" and any("broken image 0" in line for line in errors), (found, errors)


@pytest.mark.parametrize("width", [1400, 800])
@pytest.mark.parametrize("which", ["report", "empty_report"])
def test_report_reads_well_in_a_window(which, width, request, tmp_path):
    fixture = request.getfixturevalue(which)
    html = fixture[0] if which == "report" else fixture
    found, errors = open_in_chromium(html, tmp_path, width)
    assert errors == [], errors
    assert int(found["viewport"]) >= width - 20, found["viewport"]  # the window size took effect
    narrowest = found["narrowest-text"]
    print(f"{which} at {width} px: narrowest text block {narrowest[:60]!r}; cut tables: {found['cut-tables']!r}")
    assert int(narrowest.split()[0]) >= MIN_TEXT_WIDTH, narrowest
    assert found["cut-tables"] == ""
    assert found["bare-tables"] == "0"


def test_empty_tables_say_what_they_mean(empty_report):
    text = empty_report.read_text()
    assert text.count("<table") == 1  # accuracy: the one table with rows
    for sentence in (
        "No universal heads: no head is significant (mean effect above the mean of all heads + 2 SD) in every "
        "task under image corruption, nor in every task under text corruption (the corruptions that count: sip, "
        "str), and none is often universal under bootstrap resampling.",
        "No head functions: there is no universal head, nor any head often universal under resampling, to score.",
        "No best object detector: no head was scored on an image with an object mask.",
        "No validation rows: no site has both a screen estimate and an exact effect.",
        "No object shares: no screened sample has an object mask.",
        "No misses: no site has both a screen estimate and an exact effect.",
    ):
        assert sentence in text, sentence


def test_the_layout_check_catches_a_squeezed_text_a_cut_table_and_a_bare_header(tmp_path):
    wide_row = "<tr>" + "<td>a_long_cell_value_that_does_not_wrap</td>" * 40 + "</tr>"
    page = tmp_path / "bad.html"
    page.write_text(
        "<html><body><div style='display: flex'><p>squeezed words next to a wide table</p>"
        f"<table><tbody>{wide_row}</tbody></table></div>"
        "<table><caption>empty</caption><thead><tr><th>model</th></tr></thead><tbody></tbody></table></body></html>"
    )
    found, _ = open_in_chromium(page, tmp_path, 1400)
    assert int(found["narrowest-text"].split()[0]) < MIN_TEXT_WIDTH, found
    assert found["cut-tables"] == "table 0 runs past its div", found
    assert found["bare-tables"] == "1", found
