"""Figures and summaries of the circuits (`notice.method.circuits`): faithfulness curves, the smallest faithful circuit
drawn as a graph, the overlap of a model's circuits as a heat map, and the validation and skipped pairs per circuit."""

from __future__ import annotations

import re
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.circuits.graph import EDGE_GROUPS
from notice.files.tables import check_columns
from notice.present.charts import save_chart

CONDITION_KEYS: tuple[str, ...] = ("model", "dataset", "corruption")
CURVE_KEYS: tuple[str, ...] = (*CONDITION_KEYS, "method", "level", "n", "faithfulness")
GRAPH_KEYS: tuple[str, ...] = ("upstream", "downstream", "group", "in_circuit")
OVERLAP_KEYS: tuple[str, ...] = ("circuit_a", "circuit_b", "edge_iou", "edges_a", "edges_b")
VALIDATION_KEYS: tuple[str, ...] = (*CONDITION_KEYS, "sample_id", "method", "spearman", "recall_top_k", "top_k")
SKIPPED_KEYS: tuple[str, ...] = (*CONDITION_KEYS, "sample_id", "reason")
SCORE = "score_eap_ig"  # the score that chose the circuit (`in_circuit`)
# Where a layer's nodes sit, top to bottom: the attention sites in the order the layers compute them, then modules.
ATTENTION_ORDER: tuple[str, ...] = ("self_attn", "cross_attn")
_NODE = re.compile(r"^L(?P<layer>\d+)\.(?P<site>\w+?)(?:\.H(?P<head>\d+))?$")


def circuit_name(dataset: str, corruption: str) -> str:
    """The name of one (dataset, corruption)'s circuit in the overlap tables and figures."""
    return f"{dataset}/{corruption}"


def faithfulness_chart(faithfulness: pd.DataFrame, target: float, title: str) -> alt.TopLevelMixin:
    """Faithfulness of the top-n edge circuits against n (log scale; n = 0 has no place on it), one line per
    (dataset, corruption) and method, and the target as a dashed line."""
    check_columns(faithfulness, CURVE_KEYS, "faithfulness table")
    df = faithfulness[(faithfulness["level"] == "edges") & (faithfulness["n"] >= 1)].copy()
    if df.empty:
        raise ValueError(f"{title}: no edge circuit with at least one edge to draw")
    df["circuit"] = [circuit_name(d, c) for d, c in zip(df["dataset"], df["corruption"])]
    lines = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("n:Q", title="edges kept (top n by score)", scale=alt.Scale(type="log")),
            y=alt.Y("faithfulness:Q", title="faithfulness"),
            color=alt.Color("circuit:N", title="dataset/corruption"),
            strokeDash=alt.StrokeDash("method:N", title="scored by", legend=alt.Legend(symbolType="stroke")),
            tooltip=["circuit:N", "method:N", "n:Q", "faithfulness:Q"],
        )
    )
    goal = alt.Chart().mark_rule(color="#888", strokeDash=[4, 3]).encode(y=alt.datum(target))
    return alt.layer(lines, goal).properties(width=360, height=240, title=alt.TitleParams(title, anchor="start"))


def faithfulness_figure(faithfulness: pd.DataFrame, target: float, out_stem: str | Path, title: str) -> list[Path]:
    return save_chart(faithfulness_chart(faithfulness, target, title), out_stem)


def node_place(name: str, n_layers: int) -> tuple[float, int, str]:
    """(row, head, label) of a node: the inputs on row -1, a layer's attention sites (ATTENTION_ORDER, then any
    other) and its modules below them within [layer, layer + 1), the logits on row `n_layers`; head -1 for
    non-heads."""
    if name in ("image", "text"):
        return -1.0, -1, name
    if name == "logits":
        return float(n_layers), -1, name
    match = _NODE.match(name)
    if match is None:
        raise ValueError(f"circuit node {name!r} is not an input, the logits or L<layer>.<site>[.H<head>]")
    layer, site, head = int(match["layer"]), match["site"], match["head"]
    if head is None:
        return layer + 0.75, -1, site
    rank = ATTENTION_ORDER.index(site) if site in ATTENTION_ORDER else len(ATTENTION_ORDER)
    return layer + 0.5 * rank / (len(ATTENTION_ORDER) + 1), int(head), f"H{head}"


def count_layers(edges: pd.DataFrame) -> int:
    """Layers of the graph: one more than the last layer any edge's node is in."""
    matches = [_NODE.match(name) for name in [*edges["upstream"], *edges["downstream"]]]
    return max((int(m["layer"]) for m in matches if m is not None), default=-1) + 1


def graph_layout(edges: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where the circuit's nodes and edges (its `in_circuit` rows) are drawn: token groups as columns (EDGE_GROUPS
    order, those the circuit has), rows as `node_place`, a head at its index across its column. A node is drawn in
    every column it has an edge in; an edge joins its ends in its group's column.

    Returns (nodes: node, group, x, y, label; segments: edge columns and group, x, y, x2, y2, score, weight)."""
    check_columns(edges, [*GRAPH_KEYS, SCORE], "circuit edges")
    circuit = edges[edges["in_circuit"].astype(bool)]
    groups = [g for g in EDGE_GROUPS if g in set(circuit["group"])]
    column = {g: i for i, g in enumerate(groups)}
    n_layers = count_layers(edges)
    names = [*edges["upstream"], *edges["downstream"]]
    heads = [int(m["head"]) for m in map(_NODE.match, names) if m is not None and m["head"] is not None]
    width = max(heads, default=0) + 1

    def place(name: str, group: str) -> tuple[float, float, str]:
        row, head, label = node_place(name, n_layers)
        offset = 0.5 if head < 0 else 0.1 + 0.8 * (head + 0.5) / width
        return column[group] + offset, row, label

    nodes: dict[tuple[str, str], tuple[float, float, str]] = {}
    segments = []
    for row in circuit.itertuples(index=False):
        start, end = place(row.upstream, row.group), place(row.downstream, row.group)
        nodes[(row.upstream, row.group)], nodes[(row.downstream, row.group)] = start, end
        score = float(getattr(row, SCORE))
        segments.append(
            {
                "upstream": row.upstream,
                "downstream": row.downstream,
                "group": row.group,
                "x": start[0],
                "y": start[1],
                "x2": end[0],
                "y2": end[1],
                "score": score,
            }
        )
    node_df = pd.DataFrame(
        [{"node": n, "group": g, "x": x, "y": y, "label": label} for (n, g), (x, y, label) in nodes.items()],
        columns=["node", "group", "x", "y", "label"],
    )
    segment_df = pd.DataFrame(segments, columns=["upstream", "downstream", "group", "x", "y", "x2", "y2", "score"])
    largest = float(segment_df["score"].abs().max()) if len(segment_df) else 0.0
    segment_df["weight"] = 0.5 + 5.5 * segment_df["score"].abs() / largest if largest > 0 else 1.0
    return node_df, segment_df


def circuit_graph_chart(edges: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """The circuit as a graph: layers top to bottom (inputs at the top, the logits at the bottom), token groups as
    columns; an edge's width is its |EAP-IG score| (scaled to the largest), its colour the score's sign."""
    nodes, segments = graph_layout(edges)
    if segments.empty:
        raise ValueError(f"{title}: the circuit has no edges to draw")
    groups = [g for g in EDGE_GROUPS if g in set(segments["group"])]
    n_layers = count_layers(edges)
    segments = segments.assign(sign=np.where(segments["score"] >= 0, "positive", "negative"))
    y = alt.Y(
        "y:Q",
        scale=alt.Scale(domain=[-1.8, n_layers + 0.3], reverse=True),
        axis=alt.Axis(
            values=list(range(-1, n_layers + 1)),
            labelExpr=f"datum.value < 0 ? 'inputs' : datum.value >= {n_layers} ? 'logits' : 'layer ' + datum.value",
            grid=False,
        ),
        title=None,
    )
    x = alt.X("x:Q", scale=alt.Scale(domain=[0, len(groups)]), axis=None)
    lines = (
        alt.Chart(segments)
        .mark_rule(opacity=0.7)
        .encode(
            x=x,
            y=y,
            x2="x2:Q",
            y2="y2:Q",
            strokeWidth=alt.StrokeWidth("weight:Q", legend=None, scale=None),
            color=alt.Color(
                "sign:N",
                title="EAP-IG score",
                scale=alt.Scale(domain=["positive", "negative"], range=["#1f77b4", "#d62728"]),
            ),
            tooltip=["upstream:N", "downstream:N", "group:N", alt.Tooltip("score:Q", format=".4g")],
        )
    )
    points = alt.Chart(nodes).mark_circle(size=60, color="#333").encode(x=x, y=y, tooltip=["node:N", "group:N"])
    labels = alt.Chart(nodes).mark_text(dx=7, align="left", fontSize=9, color="#333").encode(x=x, y=y, text="label:N")
    header = pd.DataFrame({"x": [i + 0.5 for i in range(len(groups))], "y": -1.6, "group": groups})
    heads = alt.Chart(header).mark_text(fontWeight="bold").encode(x=x, y=y, text="group:N")
    borders = pd.DataFrame({"x": list(range(1, len(groups)))})
    columns = alt.Chart(borders).mark_rule(color="#ddd").encode(x=x)
    return alt.layer(columns, lines, points, labels, heads).properties(
        width=170 * len(groups), height=70 * (n_layers + 2), title=alt.TitleParams(title, anchor="start")
    )


def circuit_graph_figure(edges: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    return save_chart(circuit_graph_chart(edges, title), out_stem)


def overlap_matrix(overlap: pd.DataFrame) -> pd.DataFrame:
    """Both orders of every pair of circuits (the overlap table has each unordered pair once, with itself)."""
    check_columns(overlap, OVERLAP_KEYS, "circuit overlap")
    mirrored = overlap.rename(
        columns={"circuit_a": "circuit_b", "circuit_b": "circuit_a", "edges_a": "edges_b", "edges_b": "edges_a"}
    )
    mirrored = mirrored[mirrored["circuit_a"] != mirrored["circuit_b"]]
    return pd.concat([overlap, mirrored[overlap.columns]], ignore_index=True)


def overlap_chart(overlap: pd.DataFrame, title: str) -> alt.TopLevelMixin:
    """The edge intersection over union of every pair of a model's circuits, as a heat map with its values."""
    df = overlap_matrix(overlap)
    if df.empty:
        raise ValueError(f"{title}: no circuits to compare")
    order = sorted(set(df["circuit_a"]))
    base = alt.Chart(df).encode(
        x=alt.X("circuit_a:N", sort=order, title=None), y=alt.Y("circuit_b:N", sort=order, title=None)
    )
    cells = base.mark_rect().encode(
        color=alt.Color("edge_iou:Q", title="edge IoU", scale=alt.Scale(domain=[0, 1], scheme="blues")),
        tooltip=["circuit_a:N", "circuit_b:N", "edges_a:Q", "edges_b:Q", alt.Tooltip("edge_iou:Q", format=".2f")],
    )
    values = base.mark_text(fontSize=10).encode(
        text=alt.Text("edge_iou:Q", format=".2f"),
        color=alt.condition("datum.edge_iou > 0.5", alt.value("white"), alt.value("black")),
    )
    side = 40 * len(order)
    return alt.layer(cells, values).properties(width=side, height=side, title=alt.TitleParams(title, anchor="start"))


def overlap_figure(overlap: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    return save_chart(overlap_chart(overlap, title), out_stem)


def validation_summary(validation: pd.DataFrame) -> pd.DataFrame:
    """Per circuit and method, over its validated pairs: the mean Spearman correlation of the scores with the exact
    single-edge ablation effects and the mean top-k recall (NaN correlations, e.g. of a pair whose sampled edges all
    have the same effect, are left out of the mean and counted)."""
    check_columns(validation, VALIDATION_KEYS, "circuit validation")
    keys = [*CONDITION_KEYS, "method"]
    grouped = validation.groupby(keys, sort=False)
    summary = grouped.agg(
        n_pairs=("sample_id", "size"),
        spearman=("spearman", "mean"),
        n_spearman_undefined=("spearman", lambda s: int(s.isna().sum())),
        top_k=("top_k", "max"),
        recall_top_k=("recall_top_k", "mean"),
    )
    return summary.reset_index()


def skipped_summary(skipped: pd.DataFrame) -> pd.DataFrame:
    """Per circuit and reason, how many pairs were skipped."""
    check_columns(skipped, SKIPPED_KEYS, "circuit skipped pairs")
    counts = skipped.groupby([*CONDITION_KEYS, "reason"], sort=False).size()
    return counts.rename("n_pairs").reset_index()
