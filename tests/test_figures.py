"""Every figure function writes non-empty PNG, SVG and offline HTML files."""

import re

import numpy as np
import pandas as pd
import pytest
from planted_tables import accuracy_table, module_table, planted_results

from notice.method.heads import (
    bootstrap_heads,
    head_effects,
    significant_heads,
    universal_heads,
    universal_heads_table,
)
from notice.present.accuracy import accuracy_chart
from notice.present.charts import safe_stem
from notice.present.effects import bootstrap_stability, corruption_comparison, head_heatmaps, module_heatmaps

# what a browser would fetch: script/img/link sources, CSS url(...) and JavaScript imports
NETWORK_LOAD = re.compile(
    r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|"""
    r"""import\s*(?:\(|[^;]*?from)\s*["'](?:https?:)?//""",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("figures")
    results = planted_results()
    sig = significant_heads(head_effects(results))
    universal = universal_heads(sig)
    table = universal_heads_table(sig, universal, bootstrap_heads(results, n_draws=50, seed=0))
    modules = module_table()
    return {
        "module": module_heatmaps(modules, out),
        "heads": head_heatmaps(sig, universal, out),
        "corruptions": corruption_comparison(modules, out),
        "bootstrap": bootstrap_stability(table, out),
        "accuracy": accuracy_chart(accuracy_table(), out, model="Salesforce/blip-vqa-base"),
    }


def test_file_names(written):
    names = {kind: sorted(p.name for p in paths) for kind, paths in written.items()}
    assert names["module"] == sorted(
        f"module_toy_A_{c}_image.{ext}" for c in ("sip", "gaussian_noise") for ext in ("png", "svg", "html")
    )
    assert names["heads"] == sorted(f"heads_toy_cross_attn_head.{ext}" for ext in ("png", "svg", "html"))
    assert names["corruptions"] == sorted(f"corruptions_toy_A_image.{ext}" for ext in ("png", "svg", "html"))
    assert names["bootstrap"] == sorted(f"bootstrap_toy_cross_attn_head.{ext}" for ext in ("png", "svg", "html"))
    assert names["accuracy"] == sorted(f"accuracy_Salesforce_blip-vqa-base.{ext}" for ext in ("png", "svg", "html"))


def test_files_are_non_empty_images_and_offline_html(written):
    for path in (p for paths in written.values() for p in paths):
        data = path.read_bytes()
        assert len(data) > 1000, path
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        elif path.suffix == ".svg":
            assert b"<svg" in data[:500] and (b"<rect" in data or b"<path" in data), path
        else:
            text = data.decode("utf-8")
            assert "vegaEmbed" in text and not NETWORK_LOAD.search(text), path


def test_titles_and_labels_readable(written):
    svg = next(p for p in written["heads"] if p.suffix == ".svg").read_text()
    assert "Letters mark universal heads" in svg and "Layer" in svg and "Head" in svg
    module_svg = next(p for p in written["module"] if p.name.endswith("sip_image.svg")).read_text()
    assert "red/blue" in module_svg and "Restoration probability" in module_svg


def test_corruption_comparison_needs_two_corruptions(tmp_path):
    only_sip = module_table().query("corruption == 'sip'")
    assert corruption_comparison(only_sip, tmp_path) == []


def test_safe_stem():
    assert safe_stem("module", "llava-hf/llava-1.5-7b-hf", "svo probes") == "module_llava-hf_llava-1.5-7b-hf_svo_probes"


def test_head_heatmap_of_a_large_model(tmp_path):
    # LLaVA-7B size: 32 layers × 32 heads × 3 tasks × 2 modalities = 6,144 rows
    grid = pd.MultiIndex.from_product(
        [["A", "B", "C"], ["image", "text"], range(32), range(32)], names=["task", "modality", "layer", "head"]
    ).to_frame(index=False)
    effects = grid.assign(
        model="llava",
        site="self_attn_head",
        metric="logit_diff",
        corruption=grid["modality"].map({"image": "sip", "text": "str"}),
        mean=(grid["layer"] - grid["head"]) / 32.0,
    )
    universal = pd.DataFrame(
        {"model": ["llava"], "site": ["self_attn_head"], "layer": [28], "head": [2], "kind": ["multimodal"]}
    )
    paths = head_heatmaps(significant_heads(effects), universal, tmp_path)
    assert [p.name for p in paths] == [f"heads_llava_self_attn_head.{ext}" for ext in ("png", "svg", "html")]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_screen_figures_draw_the_comparison_and_the_image_maps(tmp_path):
    from notice.present.screen import screen_image_maps, screen_scatter

    rng = np.random.default_rng(0)
    exact = rng.normal(size=40)
    paired = pd.DataFrame(
        {
            "site": ["mlp"] * 20 + ["self_attn_key"] * 20,
            "layer": 0,
            "head": -1,
            "position": np.arange(40),
            "token": "t",
            "estimate": exact + 0.1 * rng.normal(size=40),
            "exact": exact,
            "method": "atp_star",
        }
    )
    paths = screen_scatter(paired, tmp_path / "screenscatter_x", "title")
    assert [p.suffix for p in paths] == [".png", ".svg", ".html"] and all(p.stat().st_size for p in paths)
    mask = np.zeros((16, 16))
    mask[:8, :8] = 1.0
    record = {
        "sample_id": "s0",
        "task": "colour",
        "effects": rng.normal(size=(2, 4)),
        "grid": np.array([2, 2]),
        "image": np.zeros((16, 16, 3), np.uint8),
        "mask": mask,
    }
    paths = screen_image_maps([record, dict(record, sample_id="s1")], tmp_path / "screenmap_x", "maps", n_samples=1)
    svg = paths[1].read_text()
    assert "on object" in svg and "average of 2" in svg and "max over layers" in svg
    with pytest.raises(ValueError, match="no image maps"):
        screen_image_maps([], tmp_path / "none", "maps")
