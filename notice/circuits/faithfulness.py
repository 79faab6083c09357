"""Circuits from scores, their exact faithfulness over a task's pairs, and the curves' summaries (docs/method.md, §12
"Faithfulness").

A circuit is a set of edges kept by name (upstream node -> reader [group]), so one circuit applies to every pair of a
task. Faithfulness over the pairs is (Σ m(circuit) − Σ m(corrupt)) / (Σ m(clean) − Σ m(corrupt)). A node circuit keeps
every edge leaving its nodes: a node outside it gives every reader its corrupt output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from notice.circuits.ablation import Pair, circuit_ld, faithfulness
from notice.circuits.additive import supported
from notice.circuits.additive_runs import circuits_logits
from notice.circuits.graph import EDGE_GROUPS
from notice.patching.scores import logit_diff

CURVE_COLUMNS = ("level", "n", "fraction", "faithfulness")
Circuit = tuple[set[str] | None, set[str] | None]  # (edges by name, or None; nodes by name, or None)
CIRCUITS_PER_FORWARD = 4  # circuit runs batched in one forward where the model is a residual sum


def edge_names(pair: Pair) -> list[str]:
    return [pair.graph.edge_name(e) for e in range(pair.graph.n_edges)]


def edge_table(pairs: Sequence[Pair], scores: Mapping[str, Sequence[np.ndarray]]) -> pd.DataFrame:
    """One row per edge of the task (the union of the pairs' graphs): its parts, and per method in `scores` (method
    -> one score array per pair) the mean score over the pairs that have the edge."""
    rows: dict[str, dict] = {}
    sums: dict[str, dict[str, list[float]]] = {}
    for p, pair in enumerate(pairs):
        graph = pair.graph
        for e, name in enumerate(edge_names(pair)):
            if name not in rows:
                node, reader = graph.nodes[graph.edge_node[e]], graph.readers[graph.edge_reader[e]]
                rows[name] = {
                    "edge": name,
                    "upstream": node.name,
                    "upstream_kind": node.kind,
                    "upstream_layer": node.layer,
                    "upstream_head": node.head,
                    "reader": reader.name,
                    "reader_kind": reader.kind,
                    "reader_layer": reader.layer,
                    "reader_head": reader.head,
                    "downstream": reader.node_name,
                    "group": EDGE_GROUPS[graph.edge_group[e]],
                }
            for method, per_pair in scores.items():
                sums.setdefault(method, {}).setdefault(name, []).append(float(per_pair[p][e]))
    table = pd.DataFrame(list(rows.values()))
    for method, by_edge in sums.items():
        table[f"score_{method}"] = [float(np.mean(by_edge[name])) for name in table["edge"]]
    return table


def top_edges(table: pd.DataFrame, score: str, n: int) -> set[str]:
    """The `n` edges of largest |score| (ties: table order)."""
    order = np.argsort(-np.abs(table[score].to_numpy()), kind="stable")
    return set(table["edge"].to_numpy()[order[:n]])


def node_scores(table: pd.DataFrame, score: str) -> pd.Series:
    """Per upstream node, the sum of its edges' scores (first order: the effect of cutting all of them)."""
    return table.groupby("upstream", sort=False)[score].sum()


def top_nodes(table: pd.DataFrame, score: str, n: int) -> set[str]:
    nodes = node_scores(table, score)
    order = np.argsort(-np.abs(nodes.to_numpy()), kind="stable")
    return set(nodes.index.to_numpy()[order[:n]])


def kept_mask(pair: Pair, edges: set[str] | None = None, nodes: set[str] | None = None) -> np.ndarray:
    """The pair's edges kept by an edge circuit (`edges`, by name) or a node circuit (`nodes`, upstream names)."""
    graph = pair.graph
    if nodes is not None:
        return np.array([graph.nodes[n].name in nodes for n in graph.edge_node], dtype=bool)
    return np.array([name in (edges or set()) for name in edge_names(pair)], dtype=bool)


def circuit_lds(pair: Pair, circuits: Sequence[np.ndarray], per_forward: int = CIRCUITS_PER_FORWARD) -> list[float]:
    """LD of each circuit run (bool [edges] kept): `per_forward` at a time in one forward where the model is a
    residual sum (notice.circuits.additive_runs), else one by one (notice.circuits.ablation)."""
    if not supported(pair):
        return [circuit_ld(pair, kept) for kept in circuits]
    lds: list[float] = []
    for start in range(0, len(circuits), per_forward):
        logits = circuits_logits(pair, circuits[start : start + per_forward])
        lds += [float(logit_diff(row, pair.tau, pair.tau_p)) for row in logits]
    return lds


def task_faithfulness(
    pairs: Sequence[Pair], circuits: Sequence[tuple[set[str] | None, set[str] | None]]
) -> list[float]:
    """Faithfulness of each circuit (edges by name, or nodes by name) over the task: the summed metric of its circuit
    runs against the summed clean and corrupt metrics."""
    totals = np.zeros(len(circuits))
    for pair in pairs:
        totals += circuit_lds(pair, [kept_mask(pair, edges, nodes) for edges, nodes in circuits])
    clean, corrupt = sum(p.ld_clean for p in pairs), sum(p.ld_corrupt for p in pairs)
    return [faithfulness(float(total), clean, corrupt) for total in totals]


def log_grid(total: int, points: int) -> list[int]:
    """0, then `points` sizes spaced evenly on a log scale from 1 to `total`, whole and distinct."""
    if total < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, np.log10(total), max(points, 2))).astype(int))
    return [0, *[int(n) for n in grid]]


def faithfulness_curve(pairs: Sequence[Pair], table: pd.DataFrame, score: str, points: int) -> pd.DataFrame:
    """Faithfulness of the top-n edge circuits and top-n node circuits, n on a log grid (columns CURVE_COLUMNS)."""
    n_nodes = table["upstream"].nunique()
    grid = [("edges", n, len(table)) for n in log_grid(len(table), points)]
    grid += [("nodes", n, n_nodes) for n in log_grid(n_nodes, points)]
    circuits = [
        (top_edges(table, score, n), None) if level == "edges" else (None, top_nodes(table, score, n))
        for level, n, _ in grid
    ]
    values = task_faithfulness(pairs, circuits)
    rows = [
        {"level": level, "n": n, "fraction": n / max(total, 1), "faithfulness": value}
        for (level, n, total), value in zip(grid, values)
    ]
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def smallest_faithful(
    pairs: Sequence[Pair], table: pd.DataFrame, score: str, curve: pd.DataFrame, target: float
) -> tuple[int, float]:
    """(n, faithfulness) of the smallest top-n edge circuit reaching `target`: the curve's first grid point that does,
    refined by bisection down to the grid point before it. (len(table), 1-or-less) when none does below all edges."""
    edges = curve[curve["level"] == "edges"].sort_values("n")
    passing = edges[edges["faithfulness"] >= target]
    if passing.empty:
        n = len(table)
        return n, float(edges[edges["n"] == n]["faithfulness"].iloc[0]) if (edges["n"] == n).any() else float("nan")
    hi = int(passing["n"].iloc[0])
    hi_value = float(passing["faithfulness"].iloc[0])
    below = edges[edges["n"] < hi]
    lo = int(below["n"].iloc[-1]) if not below.empty else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (value,) = task_faithfulness(pairs, [(top_edges(table, score, mid), None)])
        if value >= target:
            hi, hi_value = mid, value
        else:
            lo = mid
    return hi, hi_value


def curve_summary(curve: pd.DataFrame) -> dict[str, float]:
    """MIB's summaries of the edge curve over the fraction of edges kept: CPR, the area under the faithfulness curve
    (higher: better), and CMD, the area between the curve and 1 (lower: better); trapezoids between grid points."""
    edges = curve[curve["level"] == "edges"].sort_values("fraction")
    x, y = edges["fraction"].to_numpy(), edges["faithfulness"].to_numpy()
    return {"cpr": float(np.trapezoid(y, x)), "cmd": float(np.trapezoid(np.abs(1 - y), x))}
