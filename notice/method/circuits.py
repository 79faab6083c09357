"""Circuits in the workflow: one (model, dataset, corruption)'s edge scores, faithfulness curves, smallest faithful
circuit and validation against exact single-edge ablation; then, per model, the overlap of its circuits
(docs/method.md, §12).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import HEAD_SITE_PARENT, VLMAdapter
from notice.circuits.ablation import Pair, record_pair
from notice.circuits.attribution import METHODS, edge_scores
from notice.circuits.faithfulness import (
    circuit_lds,
    curve_summary,
    edge_table,
    faithfulness_curve,
    smallest_faithful,
    top_edges,
)
from notice.files.tables import check_columns, stable_seed
from notice.flow.groups import token_groups
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.experiment import pair_inputs

LABELS = ("model", "dataset", "corruption")
EDGE_COLUMNS: tuple[str, ...] = (
    *LABELS,
    "edge",
    "upstream",
    "upstream_kind",
    "upstream_layer",
    "upstream_head",
    "reader",
    "reader_kind",
    "reader_layer",
    "reader_head",
    "downstream",
    "group",
    *(f"score_{method}" for method in METHODS),
    "in_circuit",  # in the smallest circuit reaching the target faithfulness (by EAP-IG)
)
FAITHFULNESS_COLUMNS: tuple[str, ...] = (*LABELS, "method", "level", "n", "fraction", "faithfulness")
SUMMARY_COLUMNS: tuple[str, ...] = (
    *LABELS,
    "method",
    "n_pairs",
    "n_edges",
    "ld_clean",
    "ld_corrupt",
    "cpr",
    "cmd",
    "target",
    "smallest_n",
    "smallest_faithfulness",
)
VALIDATION_COLUMNS: tuple[str, ...] = (
    *LABELS,
    "sample_id",
    "method",
    "n_edges",
    "sampled",
    "spearman",
    "top_k",
    "recall_top_k",
    "max_abs_exact",
)
SKIPPED_COLUMNS: tuple[str, ...] = (*LABELS, "sample_id", "reason")
OVERLAP_COLUMNS: tuple[str, ...] = (
    "model",
    "circuit_a",
    "circuit_b",
    "edges_a",
    "edges_b",
    "edge_iou",
    "edge_overlap",
    "nodes_a",
    "nodes_b",
    "node_iou",
    "node_overlap",
)
MAIN_METHOD = "eap_ig"


@dataclass(frozen=True)
class CircuitSettings:
    """The config's `circuits` section."""

    ig_steps: int = 5
    target_faithfulness: float = 0.8
    curve_points: int = 10
    validation_edges: int = 24
    validation_top_k: int = 5
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping) -> CircuitSettings:
        fields = cls.__dataclass_fields__
        return cls(**{key: type(getattr(cls, key))(section[key]) for key in fields if key in section})


@dataclass
class CircuitTables:
    edges: pd.DataFrame
    faithfulness: pd.DataFrame
    summary: pd.DataFrame
    validation: pd.DataFrame
    skipped: pd.DataFrame


def validation_rows(pair: Pair, scores: Mapping[str, np.ndarray], settings: CircuitSettings, seed: int) -> list[dict]:
    """Per method, the scores of a seeded sample of the pair's edges against their exact single-edge ablation
    effects (LD without the edge − LD clean): Spearman, and the share of the sample's exact top k among the
    method's top k."""
    n = pair.graph.n_edges
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(settings.validation_edges, n), replace=False))
    circuits = []
    for edge in sample:
        kept = np.ones(n, dtype=bool)
        kept[edge] = False
        circuits.append(kept)
    exact_arr = np.asarray(circuit_lds(pair, circuits)) - pair.ld_clean
    k = min(settings.validation_top_k, len(sample))
    top_exact = set(np.argsort(-np.abs(exact_arr), kind="stable")[:k])
    rows = []
    for method, values in scores.items():
        estimate = values[sample]
        top = set(np.argsort(-np.abs(estimate), kind="stable")[:k])
        rho = pd.Series(estimate).corr(pd.Series(exact_arr), method="spearman") if len(sample) > 2 else float("nan")
        rows.append(
            {
                "method": method,
                "n_edges": n,
                "sampled": len(sample),
                "spearman": float(rho),
                "top_k": k,
                "recall_top_k": len(top & top_exact) / k if k else float("nan"),
                "max_abs_exact": float(np.abs(exact_arr).max()) if len(sample) else float("nan"),
            }
        )
    return rows


def circuit_tables(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    questions: Mapping[str, str],
    load_image: Callable[[str], Image.Image],
    settings: CircuitSettings,
    corruption_settings: Mapping,
    labels: Mapping[str, str],
) -> CircuitTables:
    """The circuit tables of one (model, dataset, corruption): `pairs` PAIR_COLUMNS rows, `questions` sample_id ->
    the question (token groups), `labels` model, dataset and corruption."""
    recorded: list[Pair] = []
    scores: dict[str, list[np.ndarray]] = {method: [] for method in METHODS}
    validation, skipped = [], []
    for row in tqdm(pairs.itertuples(index=False), total=len(pairs), desc="circuits", mininterval=5):
        clean_inp, corrupt_inp = pair_inputs(adapter, row, load_image)
        image_fn = corrupt_image_fn(row.corruption, corruption_settings, int(row.noise_seed))
        groups = token_groups(adapter, clean_inp, questions[str(row.sample_id)])
        pair = record_pair(
            adapter, clean_inp, corrupt_inp, groups, int(row.answer_token_id), int(row.distractor_token_id), image_fn
        )
        if recorded and pair.graph.n_edges != recorded[0].graph.n_edges:
            skipped.append(
                {
                    "sample_id": str(row.sample_id),
                    "reason": f"its graph has {pair.graph.n_edges} edges, the task's first pair's "
                    f"{recorded[0].graph.n_edges} (token groups differ): one circuit cannot serve both",
                }
            )
            continue
        if pair.ld_clean == pair.ld_corrupt:
            skipped.append({"sample_id": str(row.sample_id), "reason": "the corruption leaves LD unchanged"})
            continue
        per_method = {
            method: edge_scores(pair, method, settings.ig_steps if method == "eap_ig" else 1) for method in METHODS
        }
        for method, values in per_method.items():
            scores[method].append(values)
        seed = stable_seed(settings.seed, "circuit validation", row.sample_id)
        checked = validation_rows(pair, per_method, settings, seed)
        validation += [{"sample_id": str(row.sample_id), **r} for r in checked]
        recorded.append(pair)
    if not recorded:
        empty = {name: pd.DataFrame(columns=list(cols)) for name, cols in _COLUMNS.items()}
        return CircuitTables(**empty, skipped=_labelled(skipped, labels, SKIPPED_COLUMNS))
    edges = edge_table(recorded, scores)
    curves, summary = [], []
    for method in METHODS:
        score = f"score_{method}"
        curve = faithfulness_curve(recorded, edges, score, settings.curve_points)
        n, value = smallest_faithful(recorded, edges, score, curve, settings.target_faithfulness)
        if method == MAIN_METHOD:
            edges["in_circuit"] = edges["edge"].isin(top_edges(edges, score, n))
        curves.append(curve.assign(method=method))
        summary.append(
            {
                "method": method,
                "n_pairs": len(recorded),
                "n_edges": len(edges),
                "ld_clean": float(np.mean([p.ld_clean for p in recorded])),
                "ld_corrupt": float(np.mean([p.ld_corrupt for p in recorded])),
                **curve_summary(curve),
                "target": settings.target_faithfulness,
                "smallest_n": n,
                "smallest_faithfulness": value,
            }
        )
    return CircuitTables(
        edges=_labelled(edges.to_dict("records"), labels, EDGE_COLUMNS),
        faithfulness=_labelled(pd.concat(curves).to_dict("records"), labels, FAITHFULNESS_COLUMNS),
        summary=_labelled(summary, labels, SUMMARY_COLUMNS),
        validation=_labelled(validation, labels, VALIDATION_COLUMNS),
        skipped=_labelled(skipped, labels, SKIPPED_COLUMNS),
    )


_COLUMNS = {
    "edges": EDGE_COLUMNS,
    "faithfulness": FAITHFULNESS_COLUMNS,
    "summary": SUMMARY_COLUMNS,
    "validation": VALIDATION_COLUMNS,
}


def _labelled(rows: Sequence[dict], labels: Mapping[str, str], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame([{**labels, **row} for row in rows], columns=list(columns))


def circuit_nodes(edges: pd.DataFrame) -> set[str]:
    """The nodes of an edge circuit: every edge's upstream node and the node it feeds (the logits included)."""
    return set(edges["upstream"]) | set(edges["downstream"])


def circuit_overlap(model: str, circuits: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every pair of a model's circuits (name -> its edges table, `in_circuit` rows taken): intersection over union
    and over the smaller, of edges and of nodes (columns OVERLAP_COLUMNS)."""
    chosen = {name: table[table["in_circuit"].astype(bool)] for name, table in circuits.items()}
    rows = []
    for a, b in itertools.combinations_with_replacement(sorted(chosen), 2):
        edges_a, edges_b = set(chosen[a]["edge"]), set(chosen[b]["edge"])
        nodes_a, nodes_b = circuit_nodes(chosen[a]), circuit_nodes(chosen[b])
        rows.append(
            {
                "model": model,
                "circuit_a": a,
                "circuit_b": b,
                "edges_a": len(edges_a),
                "edges_b": len(edges_b),
                "edge_iou": _ratio(len(edges_a & edges_b), len(edges_a | edges_b)),
                "edge_overlap": _ratio(len(edges_a & edges_b), min(len(edges_a), len(edges_b))),
                "nodes_a": len(nodes_a),
                "nodes_b": len(nodes_b),
                "node_iou": _ratio(len(nodes_a & nodes_b), len(nodes_a | nodes_b)),
                "node_overlap": _ratio(len(nodes_a & nodes_b), min(len(nodes_a), len(nodes_b))),
            }
        )
    return pd.DataFrame(rows, columns=list(OVERLAP_COLUMNS))


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def shared_heads(circuits: Mapping[str, pd.DataFrame]) -> list[str]:
    """The heads (upstream or downstream) that belong to every circuit's `in_circuit` edges."""
    sets = [
        {n for n in circuit_nodes(t[t["in_circuit"].astype(bool)]) if ".H" in n} for t in circuits.values() if len(t)
    ]
    return sorted(set.intersection(*sets)) if sets else []


def first_pairs(
    pairs: pd.DataFrame, max_pairs: int | None, labels: Mapping[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`max_pairs` pairs taken from the tasks in turn (each task's in the table's order), every pair when None, and
    the others as skipped rows (SKIPPED_COLUMNS): each exact curve point runs every pair once, so the config may
    bound them, and every task stays represented."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs, _labelled([], labels, SKIPPED_COLUMNS)
    turn = pairs.groupby("task", sort=False).cumcount()  # a pair's place within its task
    order = sorted(range(len(pairs)), key=lambda i: (int(turn.iloc[i]), i))
    taken, rest = order[:max_pairs], sorted(order[max_pairs:])
    reason = f"beyond circuits.max_pairs = {max_pairs}: pairs are taken from the tasks in turn, table order within each"
    skipped = [{"sample_id": str(pairs["sample_id"].iloc[i]), "reason": reason} for i in rest]
    return pairs.iloc[sorted(taken)].reset_index(drop=True), _labelled(skipped, labels, SKIPPED_COLUMNS)


SHARED_HEAD_COLUMNS: tuple[str, ...] = ("model", "node", "site", "layer", "head", "n_circuits", "universal", "kind")
_HEAD_NODE = re.compile(r"^L(?P<layer>\d+)\.(?P<site>\w+)\.H(?P<head>\d+)$")


def shared_heads_table(model: str, circuits: Mapping[str, pd.DataFrame], universal: pd.DataFrame) -> pd.DataFrame:
    """The heads in every circuit of `model` (`shared_heads`), each marked as one of its universal heads or not:
    `universal` is `universal_heads.csv` (site `self_attn_head` / `cross_attn_head`, layer, head, kind; a head's
    rows of kind "none" are bootstrap candidates, not universal). Columns SHARED_HEAD_COLUMNS; `kind` the
    universal kind(s), "" for the others."""
    check_columns(universal, ["site", "layer", "head", "kind"], "universal heads")
    universal = universal[universal["kind"] != "none"]
    kinds: dict[tuple[str, int, int], set[str]] = {}
    for site, layer, head, kind in zip(universal["site"], universal["layer"], universal["head"], universal["kind"]):
        kinds.setdefault((HEAD_SITE_PARENT.get(site, site), int(layer), int(head)), set()).add(str(kind))
    rows = []
    for node in shared_heads(circuits):
        match = _HEAD_NODE.match(node)
        if match is None:
            raise ValueError(f"circuit node {node!r} is not a head's name (L<layer>.<site>.H<head>)")
        key = (match["site"], int(match["layer"]), int(match["head"]))
        rows.append(
            {
                "model": model,
                "node": node,
                "site": key[0],
                "layer": key[1],
                "head": key[2],
                "n_circuits": sum(1 for table in circuits.values() if len(table)),
                "universal": key in kinds,
                "kind": ", ".join(sorted(kinds.get(key, set()))),
            }
        )
    return pd.DataFrame(rows, columns=list(SHARED_HEAD_COLUMNS))
