"""Figures of the NOTICE analysis (Altair), each written as PNG, SVG and a self-contained HTML file.

Every figure function takes a tidy table from `notice.method.heads` (or the accuracy table), writes its
files under `out_dir` and returns their paths. Effects use a diverging colour scale centred at 0:
red = patching the clean activation restores the correct answer, blue = it pushes towards the
incorrect one.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import vl_convert
from altair.utils.mimebundle import spec_to_mimebundle
from PIL import Image

from notice.files.tables import check_columns
from notice.method.head_functions import object_fraction
from notice.method.heads import KINDS, head_label
from notice.method.screen import is_unsigned, layer_maps, object_share

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
METRIC_TITLES: dict[str, str] = {
    "logit_diff": "Logit difference (patched − corrupt)",
    "prob_restoration": "Restoration probability (P patched − P corrupt)",
}
KIND_MARKS: dict[str, str] = {"vision": "V", "text": "T", "multimodal": "M"}
KIND_COLOURS: dict[str, str] = {"vision": "#4c78a8", "text": "#f58518", "multimodal": "#54a24b", "none": "#9d9d9d"}
FORMATS: tuple[str, ...] = ("png", "svg", "html")
# `category` of an accuracy table's per-task total row (notice.method.evaluate writes "(all)")
TOTAL_CATEGORIES: tuple[str, ...] = ("all", "(all)")
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


def _metric_title(df: pd.DataFrame) -> str:
    metric = str(df["metric"].iloc[0]) if "metric" in df and len(df) else "effect"
    return METRIC_TITLES.get(metric, metric)


def _samples(n: pd.Series) -> str:
    low, high = int(n.min()), int(n.max())
    return f"{low}" if low == high else f"{low}–{high}"


def _lines(title: str) -> list[str]:
    """A long legend title on two lines ("Logit difference" / "(patched − corrupt)"), never cut."""
    head, _, tail = title.partition(" (")
    return [head, f"({tail}"] if tail else [head]


def _bound(values: pd.Series) -> float:
    """Largest absolute value (1 when all are 0 or missing): the ends of a symmetric colour scale."""
    bound = float(np.nanmax(np.abs(values.to_numpy(dtype=float)))) if values.notna().any() else 0.0
    return bound if bound > 0 else 1.0


def _diverging(field: str, values: pd.Series, title: str) -> alt.Color:
    """Colour encoding symmetric around 0, so white means no effect whatever the data range."""
    bound = _bound(values)
    scale = alt.Scale(scheme="redblue", reverse=True, domain=[-bound, bound], domainMid=0)
    return alt.Color(f"{field}:Q", title=_lines(title), scale=scale)


def _cell(n: int, largest: int = 22, smallest: int = 8, span: int = 360) -> int:
    """Pixel size of a heatmap cell: big for toy models, small enough for 32-layer models."""
    return int(max(smallest, min(largest, span // max(n, 1))))


def _with_labels(module_df: pd.DataFrame) -> pd.DataFrame:
    out = module_df.copy()
    out["site_title"] = out["site"].map(lambda s: SITE_TITLES.get(s, s))
    # the position index keeps rows with equal tokens (two "is") apart and in prompt order
    out["position_label"] = [f"{p}: {t}" for p, t in zip(out["position"], out["token"])]
    return out


def _site_order(sites: pd.Series) -> list[str]:
    present = set(sites)
    return [SITE_TITLES[s] for s in ("mlp", "self_attn", "cross_attn", "layer") if s in present]


def _module_panels(df: pd.DataFrame, colour: alt.Color) -> alt.FacetChart:
    """Token × layer heatmaps of one condition, one panel per module site."""
    n_layers, n_positions = df["layer"].nunique(), df["position"].nunique()
    cell = _cell(max(n_layers, n_positions))
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("layer:O", title="Layer patched", axis=alt.Axis(labelAngle=0)),
            y=alt.Y(
                "position_label:N",
                title="Token position patched",
                sort=alt.EncodingSortField(field="position", op="min"),
            ),
            color=colour,
            tooltip=["site_title:N", "layer:O", "position:O", "token:N", alt.Tooltip("mean:Q", format=".4f"), "n:Q"],
        )
        .properties(width=max(120, cell * n_layers), height=cell * n_positions)
        .facet(column=alt.Column("site_title:N", title=None, sort=_site_order(df["site"])))
    )


def module_heatmaps(module_effects_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Paper Fig. 3: per (model, task, corruption, modality), token × layer heatmaps per module site.

    Files: module_<model>_<task>_<corruption>_<modality>.{png,svg,html}.
    """
    check_columns(
        module_effects_df,
        ["model", "task", "corruption", "modality", "site", "layer", "position", "token", "mean", "n"],
        "module effects",
    )
    paths: list[Path] = []
    for (model, task, corruption, modality), df in module_effects_df.groupby(
        ["model", "task", "corruption", "modality"], sort=True
    ):
        df = _with_labels(df)
        chart = _module_panels(df, _diverging("mean", df["mean"], _metric_title(df))).properties(
            title=alt.TitleParams(
                f"{model} · {task}: module-wise activation patching, {modality} corrupted ({corruption})",
                subtitle=f"Mean over {_samples(df['n'])} samples of the effect of patching one module's clean "
                "output at one token and layer into the corrupt run. Red: restores the correct answer.",
                anchor="start",
            )
        )
        paths += save_chart(chart, Path(out_dir) / safe_stem("module", model, task, corruption, modality))
    return paths


def _condition(df: pd.DataFrame) -> pd.Series:
    return df["modality"] + " corrupted (" + df["corruption"] + ")"


def head_heatmaps(
    effects_df: pd.DataFrame, universal_df: pd.DataFrame, out_dir: str | Path, k: float = 2.0
) -> list[Path]:
    """Paper Fig. 5: layer × head heatmaps of the mean head effect, per task × corruption.

    Universal heads carry a letter (V vision, T text, M multimodal) in every panel; when
    `effects_df` has a `significant` column (from `significant_heads`), the heads significant in a
    panel are outlined. Files: heads_<model>_<site>.{png,svg,html}.
    """
    check_columns(
        effects_df, ["model", "task", "corruption", "modality", "site", "layer", "head", "mean"], "head effects"
    )
    paths: list[Path] = []
    for (model, site), df in effects_df.groupby(["model", "site"], sort=True):
        df = df.copy()
        df["condition"] = _condition(df)
        kinds = universal_df[(universal_df["model"] == model) & (universal_df["site"] == site)]
        df = df.merge(kinds[["layer", "head", "kind"]], on=["layer", "head"], how="left")
        df["mark"] = df["kind"].map(KIND_MARKS).fillna("")
        df["label"] = [head_label(layer, head) for layer, head in zip(df["layer"], df["head"])]
        df["outlined"] = df["significant"].astype(bool) if "significant" in df else False
        colour = _diverging("mean", df["mean"], _metric_title(df))
        # letters in white on the darkest cells, black elsewhere
        df["dark"] = df["mean"].abs() > 0.5 * _bound(df["mean"])
        df = df[["task", "condition", "layer", "head", "label", "mean", "kind", "mark", "outlined", "dark"]]
        cell = _cell(max(df["layer"].nunique(), df["head"].nunique()), span=300)
        base = (
            alt.Chart()
            .encode(
                x=alt.X("head:O", title="Head", axis=alt.Axis(labelAngle=0, labelOverlap="parity")),
                y=alt.Y("layer:O", title="Layer", axis=alt.Axis(labelOverlap="parity")),
            )
            .properties(width=cell * df["head"].nunique(), height=cell * df["layer"].nunique())
        )
        heat = base.mark_rect().encode(
            color=colour,
            tooltip=["label:N", "task:N", "condition:N", alt.Tooltip("mean:Q", format=".4f"), "kind:N"],
        )
        outline = base.mark_rect(filled=False, stroke="black", strokeWidth=1.5).transform_filter("datum.outlined")
        letters = (
            base.mark_text(fontWeight="bold", fontSize=max(8, cell - 6))
            .encode(text="mark:N", color=alt.condition("datum.dark", alt.value("white"), alt.value("black")))
            .transform_filter("datum.mark != ''")
        )
        chart = (
            alt.layer(heat, outline, letters, data=df)
            .facet(
                row=alt.Row("condition:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left")),
                column=alt.Column("task:N", title="Task"),
            )
            .properties(
                title=alt.TitleParams(
                    f"{model}: patching single {SITE_TITLES.get(site, site)} (mean over samples)",
                    subtitle=[
                        "Letters mark universal heads: V vision, T text, M multimodal.",
                        f"Outlined: significant in that panel (mean above the mean of all heads + {k:g} SD).",
                    ],
                    anchor="start",
                )
            )
        )
        paths += save_chart(chart, Path(out_dir) / safe_stem("heads", model, site))
    return paths


def _corruption_key(name: str) -> tuple[bool, str]:
    return (not name.lower().startswith("sip"), name)  # SIP first, the baselines after it


def corruption_comparison(module_effects_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Paper Fig. 4/10: module-wise heatmaps of every corruption of one modality, one row each.

    Only (model, task, modality) with at least two corruptions get a figure. Each row has its own
    colour scale (noise and semantic corruptions differ in magnitude; the figure compares where the
    effect sits). Files: corruptions_<model>_<task>_<modality>.{png,svg,html}.
    """
    check_columns(
        module_effects_df,
        ["model", "task", "corruption", "modality", "site", "layer", "position", "token", "mean"],
        "module effects",
    )
    paths: list[Path] = []
    for (model, task, modality), df in module_effects_df.groupby(["model", "task", "modality"], sort=True):
        corruptions = sorted(df["corruption"].unique(), key=_corruption_key)
        if len(corruptions) < 2:
            continue
        rows = []
        for corruption in corruptions:
            sub = _with_labels(df[df["corruption"] == corruption])
            colour = _diverging("mean", sub["mean"], _metric_title(sub))
            rows.append(_module_panels(sub, colour).properties(title=f"Corruption: {corruption}"))
        chart = (
            alt.vconcat(*rows)
            .resolve_scale(color="independent")
            .properties(
                title=alt.TitleParams(
                    f"{model} · {task}: where the patching effect sits under each {modality} corruption",
                    subtitle="Module-wise patching, mean over samples; colour scales differ per row.",
                    anchor="start",
                )
            )
        )
        paths += save_chart(chart, Path(out_dir) / safe_stem("corruptions", model, task, modality))
    return paths


def bootstrap_stability(universal_table: pd.DataFrame, out_dir: str | Path, top: int = 12) -> list[Path]:
    """Bootstrap stability of the universal heads (and frequent candidates), per (model, site).

    Left: fraction of resamples in which the head is universal (of its own kind; any kind for
    candidates). Middle: fraction in which it is significant per condition. Right: mean effect
    with its 95% percentile interval per condition. The `top` heads by universal fraction.
    Files: bootstrap_<model>_<site>.{png,svg,html}.
    """
    check_columns(
        universal_table,
        [
            "model",
            "site",
            "label",
            "kind",
            "task",
            "corruption",
            "modality",
            "mean",
            "frac_significant",
            "ci_low",
            "ci_high",
            "frac_universal",
            "frac_universal_kind",
            "n_draws",
        ],
        "universal heads table",
    )
    paths: list[Path] = []
    for (model, site), df in universal_table.groupby(["model", "site"], sort=True):
        df = df.copy()
        df["stability"] = df["frac_universal_kind"].fillna(df["frac_universal"])
        df["condition"] = df["task"] + " · " + _condition(df)
        ranked = df.groupby("label")["stability"].first().sort_values(ascending=False, kind="stable")
        order = list(ranked.index[:top])
        df = df[df["label"].isin(order)]
        y = alt.Y("label:N", sort=order, title="Head")
        height = max(22, 8 * df["condition"].nunique()) * len(order)
        heads = df.drop_duplicates("label")
        bars = (
            alt.Chart(heads)
            .mark_bar()
            .encode(
                x=alt.X("stability:Q", title="Fraction of resamples universal", scale=alt.Scale(domain=[0, 1])),
                y=y,
                color=alt.Color(
                    "kind:N",
                    title="Kind (full data)",
                    sort=list(KINDS) + ["none"],
                    scale=alt.Scale(domain=list(KIND_COLOURS), range=list(KIND_COLOURS.values())),
                ),
                tooltip=["label:N", "kind:N", alt.Tooltip("stability:Q", format=".3f")],
            )
            .properties(width=180, height=height)
        )
        condition = alt.Color("condition:N", title="Task · corruption")
        significance = (
            alt.Chart(df)
            .mark_point(filled=True, size=50)
            .encode(
                x=alt.X(
                    "frac_significant:Q", title="Fraction of resamples significant", scale=alt.Scale(domain=[0, 1])
                ),
                y=y,
                yOffset="condition:N",
                color=condition,
                shape=alt.Shape("modality:N", title="Corrupted modality"),
                tooltip=["label:N", "condition:N", alt.Tooltip("frac_significant:Q", format=".3f")],
            )
            .properties(width=180, height=height)
        )
        effect_base = alt.Chart(df).encode(y=y, color=condition, yOffset="condition:N")
        effect = alt.layer(
            effect_base.mark_rule().encode(
                x=alt.X("ci_low:Q", title=["Mean effect with 95% interval", _metric_title(df)]), x2="ci_high:Q"
            ),
            effect_base.mark_point(filled=True).encode(
                x="mean:Q",
                tooltip=[
                    "label:N",
                    "condition:N",
                    alt.Tooltip("mean:Q", format=".4f"),
                    alt.Tooltip("ci_low:Q", format=".4f"),
                    alt.Tooltip("ci_high:Q", format=".4f"),
                ],
            ),
        ).properties(width=260, height=height)
        # kinds colour the bars; conditions colour the two right panels, which share one legend
        per_condition = alt.hconcat(significance, effect).resolve_scale(color="shared", shape="shared")
        chart = (
            alt.hconcat(bars, per_condition)
            .resolve_scale(color="independent", shape="independent")
            .properties(
                title=alt.TitleParams(
                    f"{model}: how stable are the universal {SITE_TITLES.get(site, site)}?",
                    subtitle=f"{int(df['n_draws'].max())} bootstrap resamples of the samples of every task and "
                    "corruption; grey: universal in many resamples but not on the full data.",
                    anchor="start",
                )
            )
        )
        paths += save_chart(chart, Path(out_dir) / safe_stem("bootstrap", model, site))
    return paths


def accuracy_chart(accuracy_df: pd.DataFrame, out_dir: str | Path, model: str | None = None) -> list[Path]:
    """Paper Table 2 as a chart: one model's accuracy per category, a panel per task, the total highlighted.

    The total is the row whose category is "all" or "(all)".

    Files: accuracy[_<model>].{png,svg,html}.
    """
    check_columns(accuracy_df, ["task", "category", "n", "n_correct", "accuracy"], "accuracy table")
    df = accuracy_df.copy()
    title = "Clean accuracy per task and category" + (f" of {model}" if model else "")
    total = df["category"].isin(TOTAL_CATEGORIES)
    df["scope"] = np.where(total, "all categories", "one category")
    df["count"] = df["n_correct"].astype(int).astype(str) + "/" + df["n"].astype(int).astype(str)
    # the task total last in every panel
    order = sorted(df.loc[~total, "category"].unique()) + sorted(df.loc[total, "category"].unique())
    base = alt.Chart().encode(
        x=alt.X("category:N", title="Category", sort=order),
        y=alt.Y(
            "accuracy:Q", title="Accuracy (exact match)", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")
        ),
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "scope:N",
            title=None,
            scale=alt.Scale(domain=["one category", "all categories"], range=["#9ecae1", "#08519c"]),
        ),
        tooltip=["task:N", "category:N", "count:N", alt.Tooltip("accuracy:Q", format=".1%")],
    )
    counts = base.mark_text(dy=-6, fontSize=9).encode(text="count:N")
    chart = (
        alt.layer(bars, counts, data=df)
        .properties(width=max(120, 28 * df["category"].nunique()), height=200)
        .facet(column=alt.Column("task:N", title="Task"))
        .resolve_scale(x="independent")
        .properties(
            title=alt.TitleParams(
                title,
                subtitle="Labels: correct / asked. Only correctly answered samples are patched.",
                anchor="start",
            )
        )
    )
    return save_chart(chart, Path(out_dir) / (safe_stem("accuracy", model) if model else "accuracy"))


# "inferno"-like ramp (dark → bright) for attention overlays; written out so no plotting library is needed
OVERLAY_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)
MASK_EDGE_COLOUR = np.array([0, 255, 255], dtype=float)
OVERLAY_PIXELS = 160


def _ramp(values: np.ndarray) -> np.ndarray:
    """Colours [..., 3] of values in [0, 1] on OVERLAY_RAMP."""
    stops = np.linspace(0, 1, len(OVERLAY_RAMP))
    return np.stack([np.interp(values, stops, OVERLAY_RAMP[:, c]) for c in range(3)], axis=-1)


def overlay_image(
    image: np.ndarray,
    attention: np.ndarray,
    grid: tuple[int, int],
    mask: np.ndarray | None = None,
    size: int = OVERLAY_PIXELS,
) -> Image.Image:
    """The image (greyed) with the per-patch attention as a heatmap on top, the mask's edge in cyan.

    `attention` [rows · cols] (row-major patches) is scaled to its maximum, so each panel shows where
    its own head looks; the numbers are in the panel's label. `image` is uint8 [H, W, 3] at the
    model's input resolution, `mask` [H, W] in [0, 1] on the same pixels (or None / empty).
    """
    rows, cols = grid
    height, width = image.shape[:2]
    if height % rows or width % cols:
        raise ValueError(f"image {height}×{width} does not tile into a {rows}×{cols} patch grid")
    peak = float(attention.max())
    heat = np.asarray(attention, dtype=float).reshape(rows, cols) / (peak if peak > 0 else 1.0)
    heat = np.repeat(np.repeat(heat, height // rows, axis=0), width // cols, axis=1)
    grey = np.repeat(image.astype(float).mean(axis=-1, keepdims=True), 3, axis=-1)
    alpha = 0.8 * heat[..., None]
    out = (1 - alpha) * grey + alpha * _ramp(heat)
    if mask is not None and np.size(mask):
        inside = np.asarray(mask) > 0.5
        padded = np.pad(inside, 1)  # outside the image counts as background: a border object is outlined
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out[inside & ~interior] = MASK_EDGE_COLOUR
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    return picture.resize((size, size * height // width), Image.Resampling.NEAREST)


def _data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _query_index(record: dict, query: str) -> int | None:
    labels = [str(label) for label in record["query_labels"]]
    return labels.index(query) if query in labels else None


def attention_overlays(
    records: list[dict], panels: pd.DataFrame, out_stem: str | Path, title: str, subtitle: str = ""
) -> list[Path]:
    """Paper Fig. 6/7: attention of chosen heads vs the average head, overlaid on sample images.

    One row per record (`notice.method.attention.attention_record`); columns: the image with the object's
    mask outlined, the average over all fusion heads at the head-patching position, then one per
    row of `panels` (columns layer, head, query, title: the head's attention from the query with
    that label; a sample without that query leaves the cell empty). Each cell's label gives the
    share of patch attention on the object (×uniform = share / object area) where a mask exists.
    """
    check_columns(panels, ["layer", "head", "query", "title"], "overlay panels")
    cells = []
    for number, record in enumerate(records):
        grid = (int(record["grid"][0]), int(record["grid"][1]))
        mask = np.asarray(record["mask"])
        frac = object_fraction(mask, grid) if mask.size else None
        row = f"{number + 1}. {record['sample_id']} ({record['task']})"
        head_query = int(record["head_query_index"])
        maps = [
            ("image", None, ""),
            ("average head", record["all_heads_average"][head_query], f"from {record['query_labels'][head_query]}"),
        ]
        layers, heads = list(record["layers"]), list(record["heads"])
        for panel in panels.itertuples():
            q = _query_index(record, str(panel.query))
            attention = None if q is None else record["weights"][layers.index(panel.layer), heads.index(panel.head), q]
            maps.append((panel.title, attention, f"from {panel.query}"))
        for column, (name, attention, note) in enumerate(maps):
            if name != "image" and attention is None:
                continue
            shown = np.zeros(grid[0] * grid[1]) if attention is None else attention
            label = note
            if attention is not None and frac is not None and frac.mean() > 0:
                share = float(attention @ frac)
                label = f"{note}: {share:.0%} on object ({share / frac.mean():.1f}× uniform)"
            elif attention is None:
                label = "object outlined" if frac is not None else "no object mask"
            cells.append(
                {
                    "row": row,
                    "column": name,
                    "order": column,
                    "label": label,
                    "url": _data_uri(overlay_image(record["image"], shown, grid, mask)),
                }
            )
    if not cells:
        raise ValueError(f"{out_stem}: no attention records to draw")
    return overlay_grid(cells, out_stem, alt.TitleParams(title, subtitle=subtitle, anchor="start"))


def overlay_grid(cells: list[dict], out_stem: str | Path, title: alt.TitleParams) -> list[Path]:
    """Image panels in a grid: `cells` have row, column, order (of the columns), label and url (a data URI);
    rows in the order they first appear."""
    df = pd.DataFrame(cells).assign(x=0.5, y=0.5)
    order = list(df.sort_values("order")["column"].drop_duplicates())
    axis: dict[str, Any] = dict(scale=alt.Scale(domain=[0, 1]), axis=None)
    base = alt.Chart().properties(width=OVERLAY_PIXELS, height=OVERLAY_PIXELS + 14)
    images = base.mark_image(width=OVERLAY_PIXELS, height=OVERLAY_PIXELS).encode(
        x=alt.X("x:Q", **axis), y=alt.Y("y:Q", **axis), url="url:N", tooltip=["row:N", "column:N", "label:N"]
    )
    labels = base.mark_text(fontSize=9, baseline="top", dy=OVERLAY_PIXELS / 2 + 2).encode(
        x=alt.X("x:Q", **axis), y=alt.Y("y:Q", **axis), text="label:N"
    )
    chart = (
        alt.layer(images, labels, data=df)
        .facet(
            row=alt.Row(
                "row:N",
                title=None,
                sort=list(df["row"].drop_duplicates()),
                header=alt.Header(labelAngle=0, labelAlign="left"),
            ),
            column=alt.Column("column:N", title=None, sort=order),
        )
        .properties(title=title)
    )
    return save_chart(chart, out_stem)


def overlay_panels(universal_df: pd.DataFrame, scores: pd.DataFrame, max_heads: int = 4) -> pd.DataFrame:
    """Heads to overlay for one (model, site, dataset): its universal heads, then the best detector.

    `universal_df` (model, site, layer, head, kind) and `scores` (`head_function_scores`) are already
    restricted to that model, site and dataset. Universal heads (at most `max_heads`, vision / text /
    multimodal order) are shown at the head-patching query with their function there; the head with
    the highest detection score (any query) is added as "best detector", so the figure answers the
    grounding question even when no head is universal. Columns: layer, head, query, title.
    """
    check_columns(
        scores,
        ["layer", "head", "label", "query", "is_head_position", "detection_score", "function"],
        "head function scores",
    )
    heads = scores[scores["head"] >= 0]
    at_head = heads[heads["is_head_position"]]
    head_query = at_head["query"].mode().iloc[0] if len(at_head) else None
    rank = {kind: i for i, kind in enumerate(KINDS)}
    chosen = universal_df[["layer", "head", "kind"]].drop_duplicates(["layer", "head"])
    chosen = chosen.assign(rank=chosen["kind"].map(rank)).sort_values(["rank", "layer", "head"]).head(max_heads)
    rows = []
    if head_query is not None:
        for head in chosen.itertuples():
            found = at_head[(at_head["layer"] == head.layer) & (at_head["head"] == head.head)]
            function = found["function"].iloc[0] if len(found) else "not scored"
            rows.append(
                {
                    "layer": head.layer,
                    "head": head.head,
                    "query": head_query,
                    "title": f"{head_label(head.layer, head.head)} {head.kind}: {function}",
                }
            )
    scored = heads.dropna(subset=["detection_score"])
    if len(scored):
        best = scored.loc[scored["detection_score"].idxmax()]
        rows.append(
            {
                "layer": int(best["layer"]),
                "head": int(best["head"]),
                "query": best["query"],
                "title": f"{best['label']} best detector: {best['function']}",
            }
        )
    return pd.DataFrame(rows, columns=["layer", "head", "query", "title"])


def screen_scatter(paired: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    """The screen's estimate against the exact effect of the same site (`notice.method.screen.paired_effects`
    rows of one model, dataset and corruption), one panel per site kind; the dashed line is y = x.
    GradDrop's unsigned scores (`notice.method.screen.is_unsigned`) are drawn against |exact|."""
    check_columns(paired, ["site", "estimate", "exact", "method", "layer", "head", "position", "token"], "screen pairs")
    if paired.empty:
        raise ValueError(f"{out_stem}: no site has both a screen estimate and an exact effect")
    df = paired[["site", "layer", "head", "position", "token", "estimate", "exact", "method"]].copy()
    unsigned = df["method"].map(is_unsigned)
    df["exact"] = df["exact"].where(~unsigned, df["exact"].abs())
    df["site"] = df["site"].map(lambda s: SITE_TITLES.get(s, s))
    low = float(min(df["estimate"].min(), df["exact"].min()))
    high = float(max(df["estimate"].max(), df["exact"].max()))
    scale = alt.Scale(domain=[low, high])
    points = (
        alt.Chart()
        .mark_circle(size=14, opacity=0.5)
        .encode(
            x=alt.X("estimate:Q", title="screen estimate", scale=scale),
            y=alt.Y("exact:Q", title="|exact effect|" if unsigned.all() else "exact effect (LD)", scale=scale),
            tooltip=["site:N", "layer:Q", "head:Q", "position:Q", "token:N", "estimate:Q", "exact:Q"],
        )
    )
    diagonal = (
        alt.Chart(pd.DataFrame({"x": [low, high]}))
        .mark_line(strokeDash=[4, 3], color="#888")
        .encode(x=alt.X("x:Q", scale=scale), y=alt.Y("x:Q", scale=scale))
    )
    chart = (
        alt.layer(points, diagonal, data=df)
        .properties(width=200, height=200)
        .facet(column=alt.Column("site:N", title=None))
        .properties(title=alt.TitleParams(title, anchor="start"))
    )
    return save_chart(chart, out_stem)


def screen_image_maps(records: list[dict], out_stem: str | Path, title: str, n_samples: int = 4) -> list[Path]:
    """ "Where in the image": per sample (rows, the first `n_samples`), the image with the object outlined,
    the screen's image-token effect summed over layers (|Σ|) and its maximum over layers, as heat maps; a
    last row averages each map (scaled to its own maximum) over every record. Labels give the share of the
    summed effect on the object and the object's share of the image (`notice.method.screen.object_share`)."""
    if not records:
        raise ValueError(f"{out_stem}: no image maps to draw")
    grid = (int(records[0]["grid"][0]), int(records[0]["grid"][1]))
    cells = []

    def add(
        row: str, order: int, column: str, image: np.ndarray, values: np.ndarray, mask: np.ndarray | None, label: str
    ):
        cells.append(
            {
                "row": row,
                "column": column,
                "order": order,
                "label": label,
                "url": _data_uri(overlay_image(image, values, grid, mask)),
            }
        )

    for number, record in enumerate(records[:n_samples]):
        effects, mask = np.asarray(record["effects"]), np.asarray(record["mask"])
        summed, peak = layer_maps(effects)
        row = f"{number + 1}. {record['sample_id']} ({record['task']})"
        share = ""
        if mask.size:
            on_object, area = object_share(effects, mask, grid)
            share = f"{on_object:.0%} on object (area {area:.0%})"
        add(row, 0, "image", record["image"], np.zeros(grid[0] * grid[1]), mask, "object outlined" if mask.size else "")
        add(row, 1, "|Σ over layers|", record["image"], summed, mask, share)
        add(row, 2, "max over layers", record["image"], peak, mask, f"{effects.shape[0]} layer(s)")
    same_grid = [r for r in records if (int(r["grid"][0]), int(r["grid"][1])) == grid]
    unit = [layer_maps(np.asarray(r["effects"])) for r in same_grid]
    mean_sum = np.mean([s / s.max() if s.max() > 0 else s for s, _ in unit], axis=0)
    mean_max = np.mean([m / m.max() if m.max() > 0 else m for _, m in unit], axis=0)
    first = same_grid[0]
    average = f"average of {len(same_grid)}"
    add(average, 0, "image", first["image"], np.zeros(grid[0] * grid[1]), None, "on sample 1's image")
    add(average, 1, "|Σ over layers|", first["image"], mean_sum, None, "each sample scaled to its maximum")
    add(average, 2, "max over layers", first["image"], mean_max, None, "")
    return overlay_grid(cells, out_stem, alt.TitleParams(title, anchor="start"))
