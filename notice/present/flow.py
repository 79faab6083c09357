"""Figures and summaries of how the image reaches the answer (`notice.flow`): knockout curves per edge over the window
start (one panel per task), the logit lens on image tokens (per layer, and as maps over the image grid), the
object-token ablation against random image tokens."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.flow.logit_lens import lens_shares
from notice.present.charts import save_chart

KNOCKOUT_KEYS: tuple[str, ...] = ("task", "sample_id", "source", "target", "layer_start", "window", "relative_change")
LENS_KEYS: tuple[str, ...] = ("task", "sample_id", "layer", "row", "col", "top_tokens", "answer_rank")
ABLATION_KEYS: tuple[str, ...] = ("model", "dataset", "task", "sample_id", "ablated", "draw", "n_tokens", "ld_change")
SKIPPED_KEYS: tuple[str, ...] = ("model", "dataset", "analysis", "item", "reason", "sample_id")
MAP_SAMPLES = 4  # samples drawn in a logit-lens map
MAP_LAYERS = 4  # layers drawn per sample, evenly spaced from the first to the last


def mean_and_sem(values: pd.Series) -> pd.Series:
    """Mean, standard error (0 for a single value) and count of `values`."""
    n = int(values.count())
    sem = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return pd.Series({"mean": float(values.mean()), "sem": sem, "n_samples": n})


def knockout_curves(knockout: pd.DataFrame) -> pd.DataFrame:
    """Per task, edge ("source:target") and window start: the mean relative change of p_answer over the samples
    and its standard error (one knockout table, KNOCKOUT_COLUMNS with the labels)."""
    check_columns(knockout, KNOCKOUT_KEYS, "knockout table")
    df = knockout.assign(edge=knockout["source"].astype(str) + ":" + knockout["target"].astype(str))
    keys = ["task", "edge", "layer_start", "window"]
    curves = df.groupby(keys, sort=False)["relative_change"].apply(mean_and_sem).unstack().reset_index()
    return curves.astype({"n_samples": int}).sort_values(["task", "edge", "layer_start"], ignore_index=True)


def knockout_chart(curves: pd.DataFrame, title: str) -> alt.FacetChart:
    """Relative change of p_answer (%) against the first layer of the blocked window, a line per edge with a band
    of ± one standard error, one panel per task (as Zhang et al.'s knockout figures)."""
    df = curves.assign(
        change=100 * curves["mean"],
        low=100 * (curves["mean"] - curves["sem"]),
        high=100 * (curves["mean"] + curves["sem"]),
    )
    windows = sorted(df["window"].unique())
    size = f"{', '.join(map(str, windows))} layer{'' if windows == [1] else 's'}"
    starts = list(range(int(df["layer_start"].min()), int(df["layer_start"].max()) + 1))
    x = alt.X(
        "layer_start:Q", title=f"first layer of the blocked window ({size})", axis=alt.Axis(values=starts, format="d")
    )
    colour = alt.Color("edge:N", title="blocked edge (source:target)", sort=list(df["edge"].drop_duplicates()))
    band = alt.Chart().mark_area(opacity=0.2).encode(x=x, y="low:Q", y2="high:Q", color=colour)
    line = (
        alt.Chart()
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("change:Q", title="relative change of p(answer) (%)"),
            color=colour,
            tooltip=["edge:N", "layer_start:Q", "window:Q", "change:Q", "sem:Q", "n_samples:Q"],
        )
    )
    zero = alt.Chart().mark_rule(color="#888", strokeDash=[4, 3]).encode(y=alt.datum(0))
    return (
        alt.layer(band, line, zero, data=df)
        .properties(width=260, height=200)
        .facet(column=alt.Column("task:N", title=None))
        .properties(title=alt.TitleParams(title, anchor="start"))
        .configure_legend(symbolOpacity=1)
    )


def knockout_figure(knockout: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    if knockout.empty:
        raise ValueError(f"{out_stem}: no knockout rows to draw")
    return save_chart(knockout_chart(knockout_curves(knockout), title), out_stem)


def lens_share_chart(shares: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """Share of image positions with the answer (solid) and the object word (dashed) in their top 5, per layer
    (`shares`: `notice.flow.logit_lens.lens_shares` by task)."""
    long = shares.melt(
        id_vars=["task", "layer", "n_positions"],
        value_vars=["answer_share", "object_share"],
        var_name="word",
        value_name="share",
    ).dropna(subset=["share"])
    long["word"] = long["word"].map({"answer_share": "answer", "object_share": "object word"})
    x = alt.X("layer:Q", title="layer", axis=alt.Axis(values=sorted(long["layer"].unique().tolist()), format="d"))
    y = alt.Y("share:Q", title="share of image positions with it in the top 5", scale=alt.Scale(domain=[0, 1]))
    tooltip = ["task:N", "word:N", "layer:Q", "share:Q", "n_positions:Q"]
    lines = (
        alt.Chart()
        .mark_line()
        .encode(
            x=x,
            y=y,
            color=alt.Color("task:N"),
            strokeDash=alt.StrokeDash("word:N", sort=["answer", "object word"]),
            tooltip=tooltip,
        )
    )
    points = alt.Chart().mark_point(filled=True).encode(x=x, y=y, color=alt.Color("task:N"), tooltip=tooltip)
    return alt.layer(lines, points, data=long).properties(
        width=320, height=200, title=alt.TitleParams(title, anchor="start")
    )


def lens_share_figure(lens: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    if lens.empty:
        raise ValueError(f"{out_stem}: no logit-lens rows to draw")
    check_columns(lens, [*LENS_KEYS, "answer_in_top5", "object_in_top5"], "logit-lens table")
    return save_chart(lens_share_chart(lens_shares(lens, by=["task"]), title), out_stem)


def map_samples(lens: pd.DataFrame, n: int) -> list[str]:
    """Up to `n` sample ids of the lens table, tasks in turn, each task's in sorted order."""
    queues = [sorted(map(str, group["sample_id"].unique())) for _, group in lens.groupby("task", sort=True)]
    order = [q[depth] for depth in range(max(map(len, queues), default=0)) for q in queues if depth < len(q)]
    return order[:n]


def map_layers(layers: pd.Series, n: int) -> list[int]:
    """Up to `n` layers evenly spaced from the first to the last of `layers`."""
    known = np.sort(layers.unique())
    picks = np.unique(np.linspace(0, len(known) - 1, min(n, len(known))).round().astype(int))
    return [int(known[i]) for i in picks]


def lens_map_cells(lens: pd.DataFrame, n_samples: int = MAP_SAMPLES, n_layers: int = MAP_LAYERS) -> pd.DataFrame:
    """The cells of the logit-lens maps: the rows of the first `n_samples` samples (`map_samples`) at `n_layers`
    layers (`map_layers`), each labelled by sample and layer."""
    check_columns(lens, [*LENS_KEYS, "answer_in_top5"], "logit-lens table")
    samples = map_samples(lens, n_samples)
    layers = map_layers(lens["layer"], n_layers)
    cells = lens[lens["sample_id"].astype(str).isin(samples) & lens["layer"].isin(layers)].copy()
    cells["sample"] = cells["sample_id"].astype(str) + " (" + cells["task"].astype(str) + ")"
    cells["layer_label"] = "layer " + cells["layer"].astype(str)
    cells["in_top5"] = cells["answer_in_top5"].astype(bool)
    order = {sample: index for index, sample in enumerate(samples)}
    return cells.sort_values(["sample_id", "layer"], key=lambda s: s.map(order) if s.name == "sample_id" else s)


def lens_map_chart(cells: pd.DataFrame, title: str) -> alt.FacetChart:
    """Per sample (rows) and layer (columns), the image grid coloured by the answer's rank among the vocabulary at
    each image position (bright: near the top; outlined: in the top 5)."""
    columns = list(dict.fromkeys(cells.sort_values("layer")["layer_label"]))
    grid = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=alt.X("col:O", title=None, axis=None),
            y=alt.Y("row:O", title=None, axis=None),
            color=alt.Color(
                "answer_rank:Q",
                title="rank of the answer",
                scale=alt.Scale(type="symlog", scheme="inferno", reverse=True),
            ),
            stroke=alt.condition("datum.in_top5", alt.value("#00ffff"), alt.value(None)),
            strokeWidth=alt.value(1.5),
            tooltip=["sample:N", "layer:Q", "row:Q", "col:Q", "answer_rank:Q", "top_tokens:N"],
        )
        .properties(width=120, height=120)
    )
    return (
        alt.layer(grid, data=cells)
        .facet(
            row=alt.Row(
                "sample:N",
                title=None,
                sort=list(dict.fromkeys(cells["sample"])),
                header=alt.Header(labelAngle=0, labelAlign="left"),
            ),
            column=alt.Column("layer_label:N", title=None, sort=columns),
        )
        .properties(title=alt.TitleParams(title, anchor="start"))
    )


def lens_map_figure(lens: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    if lens.empty:
        raise ValueError(f"{out_stem}: no logit-lens rows to draw")
    return save_chart(lens_map_chart(lens_map_cells(lens), title), out_stem)


def ablation_summary(ablation: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset, task and ablated kind ("object", "random"): samples, mean number of ablated tokens, the
    mean change of the logit difference (random draws averaged within each sample first) with its standard error
    over samples, and the accuracy before and after."""
    check_columns(ablation, [*ABLATION_KEYS, "correct_base", "correct_ablated"], "ablation table")
    keys = ["model", "dataset", "task", "ablated"]
    df = ablation.assign(
        correct_base=ablation["correct_base"].astype(float), correct_ablated=ablation["correct_ablated"].astype(float)
    )
    per_sample = df.groupby([*keys, "sample_id"], sort=True)[
        ["n_tokens", "ld_change", "correct_base", "correct_ablated"]
    ].mean()
    grouped = per_sample.groupby(keys, sort=True)
    summary = grouped["ld_change"].apply(mean_and_sem).unstack()
    summary = summary.rename(columns={"mean": "ld_change", "sem": "ld_change_sem"}).astype({"n_samples": int})
    summary["n_tokens"] = grouped["n_tokens"].mean()
    summary["accuracy_base"] = grouped["correct_base"].mean()
    summary["accuracy_ablated"] = grouped["correct_ablated"].mean()
    summary["accuracy_change"] = summary["accuracy_ablated"] - summary["accuracy_base"]
    columns = ["n_samples", "n_tokens", "ld_change", "ld_change_sem", "accuracy_base", "accuracy_ablated"]
    return summary[[*columns, "accuracy_change"]].reset_index()


def ablation_chart(summary: pd.DataFrame, title: str) -> alt.FacetChart:
    """Mean change of the logit difference per task when the object's image tokens, or as many random ones, are
    replaced by the mean image token; error bars ± one standard error; one panel per dataset."""
    df = summary.assign(
        low=summary["ld_change"] - summary["ld_change_sem"], high=summary["ld_change"] + summary["ld_change_sem"]
    )
    x = alt.X("task:N", title=None)
    offset = alt.XOffset("ablated:N", sort=["object", "random"])
    colour = alt.Color("ablated:N", title="tokens ablated", sort=["object", "random"])
    bars = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=x,
            xOffset=offset,
            y=alt.Y("ld_change:Q", title="change of the logit difference"),
            color=colour,
            tooltip=["task:N", "ablated:N", "ld_change:Q", "ld_change_sem:Q", "n_samples:Q", "n_tokens:Q"],
        )
    )
    errors = alt.Chart().mark_rule(color="black").encode(x=x, xOffset=offset, y="low:Q", y2="high:Q")
    return (
        alt.layer(bars, errors, data=df)
        .properties(width=180, height=200)
        .facet(column=alt.Column("dataset:N", title=None))
        .properties(title=alt.TitleParams(title, anchor="start"))
    )


def ablation_figure(summary: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    if summary.empty:
        raise ValueError(f"{out_stem}: no ablation rows to draw")
    return save_chart(ablation_chart(summary, title), out_stem)


def skipped_summary(skipped: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset, analysis, item and reason: how many samples were skipped."""
    check_columns(skipped, SKIPPED_KEYS, "skipped table")
    keys = ["model", "dataset", "analysis", "item", "reason"]
    counts = skipped.groupby(keys, sort=True)["sample_id"].nunique()
    return counts.rename("n_samples").reset_index()
