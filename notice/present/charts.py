"""Shared ground of the figures: site titles, file names, and writing a chart as PNG, SVG and offline HTML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import altair as alt
import vl_convert
from altair.utils.mimebundle import spec_to_mimebundle

SITE_TITLES: dict[str, str] = {
    "mlp": "MLP",
    "self_attn": "Self-attention",
    "cross_attn": "Cross-attention",
    "layer": "Whole layer",
    "self_attn_head": "self-attention heads",
    "cross_attn_head": "cross-attention heads",
    "self_attn_query": "self-attention queries",
    "self_attn_key": "self-attention keys",
    "cross_attn_query": "cross-attention queries",
    "cross_attn_key": "cross-attention keys",
    "image": "Image embeddings",
}
FORMATS: tuple[str, ...] = ("png", "svg", "html")
PNG_SCALE = 2


def safe_stem(*parts: object) -> str:
    """A file name stem from parts such as model ids ("org/model-7b" → "org_model-7b")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(map(str, parts))).strip("_")


def save_chart(chart: alt.TopLevelMixin, stem: str | Path) -> list[Path]:
    """Write `stem`.png, .svg and .html (JavaScript inlined, so it opens offline); return the paths.

    The chart is compiled and rendered once, the PNG being the SVG rasterised (what vl-convert's own PNG
    export does): about a third of the time of three `chart.save` calls, each of which validated and
    rendered the spec again (same PNG and HTML bytes).
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{fmt}" for fmt in FORMATS]
    png, svg, html = paths
    # a 32-layer × 32-head model over 3 tasks × 2 modalities exceeds Altair's default 5,000-row guard;
    # the default transformer inlines the data, as `chart.save` does
    with alt.data_transformers.enable("default"), alt.data_transformers.disable_max_rows():
        spec = chart.to_dict(context={"pre_transform": False})
    versions: dict[str, Any] = {
        "vega_version": alt.VEGA_VERSION,
        "vegalite_version": alt.VEGALITE_VERSION,
        "vegaembed_version": alt.VEGAEMBED_VERSION,
    }
    svg_text = spec_to_mimebundle(spec, "svg", mode="vega-lite", **versions)["image/svg+xml"]
    svg.write_text(svg_text, encoding="utf-8")
    png.write_bytes(vl_convert.svg_to_png(svg_text, scale=PNG_SCALE, ppi=72))
    # no action menu: its "open in editor" link is the one thing in the page that leaves the machine
    page = spec_to_mimebundle(
        spec, "html", mode="vega-lite", embed_options={"actions": False}, template="inline", **versions
    )["text/html"]
    html.write_text(page, encoding="utf-8")
    return paths
