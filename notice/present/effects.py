"""Figures of the patching effects (Altair): module and head heatmaps, corruptions compared, bootstrap stability.

Every figure function takes a tidy table from `notice.method.heads`, writes its files under `out_dir`
(`notice.present.charts.save_chart`) and returns their paths. Effects use a diverging colour scale centred
at 0: red = patching the clean activation restores the correct answer, blue = it pushes towards the
incorrect one.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.method.heads import DEFAULT_K_SIGMA, KINDS, head_label
from notice.present.charts import SITE_TITLES, safe_stem, save_chart

METRIC_TITLES: dict[str, str] = {
    "logit_diff": "Logit difference (patched − corrupt)",
    "prob_restoration": "Restoration probability (P patched − P corrupt)",
}
KIND_MARKS: dict[str, str] = {"vision": "V", "text": "T", "multimodal": "M"}
KIND_COLOURS: dict[str, str] = {"vision": "#4c78a8", "text": "#f58518", "multimodal": "#54a24b", "none": "#9d9d9d"}


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
    effects_df: pd.DataFrame, universal_df: pd.DataFrame, out_dir: str | Path, k: float = DEFAULT_K_SIGMA
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
