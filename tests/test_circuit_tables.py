"""The circuits' workflow tables and figures on small hand-made tables: the first pairs and the skipped rest, the
overlap of circuits, the heads shared by every circuit against the universal heads, the graph layout, the summaries
and the figure files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from notice.method.circuits import (
    OVERLAP_COLUMNS,
    SHARED_HEAD_COLUMNS,
    SKIPPED_COLUMNS,
    circuit_overlap,
    first_pairs,
    shared_heads_table,
)
from notice.present.circuits import (
    circuit_graph_figure,
    faithfulness_figure,
    graph_layout,
    node_place,
    overlap_figure,
    overlap_matrix,
    skipped_summary,
    validation_summary,
)
from notice.present.report import CircuitResults, circuits_section

LABELS = {"model": "m", "dataset": "d", "corruption": "sip"}


def edges(rows: list[tuple[str, str, str, float, bool]]) -> pd.DataFrame:
    """An edges table: (upstream, downstream, group, EAP-IG score, in_circuit) per edge."""
    return pd.DataFrame(
        [
            {
                "edge": f"{up}->{down}[{group}]",
                "upstream": up,
                "downstream": down,
                "group": group,
                "score_eap": score,
                "score_eap_ig": score,
                "in_circuit": kept,
            }
            for up, down, group, score, kept in rows
        ]
    )


# Circuit A: image -> L0.self_attn.H1 -> L1.mlp -> logits; B shares the first edge and the head, then goes to the
# logits directly; both have an edge outside their circuit.
A = edges(
    [
        ("image", "L0.self_attn.H1", "image", -2.0, True),
        ("L0.self_attn.H1", "L1.mlp", "last", 1.0, True),
        ("L1.mlp", "logits", "last", -4.0, True),
        ("text", "L0.self_attn.H0", "question", 0.1, False),
    ]
)
B = edges(
    [
        ("image", "L0.self_attn.H1", "image", -3.0, True),
        ("L0.self_attn.H1", "logits", "last", 2.0, True),
        ("L1.mlp", "logits", "last", 0.01, False),
    ]
)


def test_first_pairs_takes_the_tasks_in_turn_and_records_every_other_pair():
    pairs = pd.DataFrame(
        {"sample_id": ["s3", "s1", "s2", "s4", "s5"], "task": ["a", "a", "a", "b", "b"], "noise_seed": [0, 1, 2, 3, 4]}
    )
    kept, skipped = first_pairs(pairs, 3, LABELS)
    # a's first, b's first, a's second; in the table's order
    assert kept["sample_id"].tolist() == ["s3", "s1", "s4"] and kept["noise_seed"].tolist() == [0, 1, 3]
    assert list(skipped.columns) == list(SKIPPED_COLUMNS)
    assert skipped["sample_id"].tolist() == ["s2", "s5"]
    assert all(reason.startswith("beyond circuits.max_pairs = 3") for reason in skipped["reason"])
    assert (skipped[["model", "dataset", "corruption"]] == ["m", "d", "sip"]).all().all()
    for limit in (None, 5, 9):
        kept, skipped = first_pairs(pairs, limit, LABELS)
        assert kept.equals(pairs) and skipped.empty and list(skipped.columns) == list(SKIPPED_COLUMNS)


def test_overlap_of_two_hand_made_circuits():
    table = circuit_overlap("m", {"d/sip": A, "d/str": B})
    assert list(table.columns) == list(OVERLAP_COLUMNS) and set(table["model"]) == {"m"}
    overlap = table.set_index(["circuit_a", "circuit_b"])
    assert list(overlap.index) == [("d/sip", "d/sip"), ("d/sip", "d/str"), ("d/str", "d/str")]
    both = overlap.loc[("d/sip", "d/str")]
    # edges: 3 and 2, one shared; nodes: {image, H1, L1.mlp, logits} and {image, H1, logits}
    assert (both["edges_a"], both["edges_b"]) == (3, 2)
    assert both["edge_iou"] == pytest.approx(1 / 4) and both["edge_overlap"] == pytest.approx(1 / 2)
    assert (both["nodes_a"], both["nodes_b"]) == (4, 3)
    assert both["node_iou"] == pytest.approx(3 / 4) and both["node_overlap"] == pytest.approx(1.0)
    assert (overlap.loc[("d/sip", "d/sip"), ["edge_iou", "node_iou"]] == 1.0).all()
    matrix = overlap_matrix(table)
    assert len(matrix) == 4
    mirrored = matrix[(matrix["circuit_a"] == "d/str") & (matrix["circuit_b"] == "d/sip")].iloc[0]
    assert (mirrored["edges_a"], mirrored["edges_b"], mirrored["edge_iou"]) == (2, 3, pytest.approx(1 / 4))


def test_shared_heads_are_marked_universal_by_site_layer_and_head():
    universal = pd.DataFrame(
        {
            "site": ["self_attn_head", "self_attn_head", "self_attn_head", "cross_attn_head"],
            "layer": [0, 0, 1, 0],
            "head": [1, 1, 1, 1],
            "kind": ["vision", "vision", "none", "text"],  # rows per condition; "none": a bootstrap candidate
        }
    )
    table = shared_heads_table("m", {"d/sip": A, "d/str": B}, universal)
    assert list(table.columns) == list(SHARED_HEAD_COLUMNS)
    assert table.to_dict("records") == [
        {
            "model": "m",
            "node": "L0.self_attn.H1",
            "site": "self_attn",
            "layer": 0,
            "head": 1,
            "n_circuits": 2,
            "universal": True,
            "kind": "vision",
        }
    ]
    other = shared_heads_table("m", {"d/sip": A, "d/str": B}, universal.iloc[2:])  # a candidate and another site
    assert other["universal"].tolist() == [False] and other["kind"].tolist() == [""]
    assert shared_heads_table("m", {"d/sip": A, "d/x": edges([("text", "logits", "last", 1.0, True)])}, universal).empty


def test_the_graph_puts_inputs_on_top_logits_at_the_bottom_and_groups_in_columns():
    assert node_place("image", 2) == (-1.0, -1, "image") and node_place("logits", 2) == (2.0, -1, "logits")
    assert node_place("L1.mlp", 2) == (1.75, -1, "mlp")
    self_head, cross_head = node_place("L0.self_attn.H3", 2), node_place("L0.cross_attn.H3", 2)
    assert self_head[:2] == (0.0, 3) and 0 < cross_head[0] < node_place("L0.mlp", 2)[0]
    with pytest.raises(ValueError, match="'L0.attn_out.H'"):
        node_place("L0.attn_out.H", 2)
    nodes, segments = graph_layout(A)
    assert len(segments) == 3  # the edge outside the circuit is not drawn
    assert set(nodes["group"]) == {"image", "last"}  # columns: the circuit's groups only, image first
    by_node = nodes.set_index(["node", "group"])
    assert by_node.loc[("image", "image"), "y"] == -1 and by_node.loc[("logits", "last"), "y"] == 2
    assert 0 <= by_node.loc[("L0.self_attn.H1", "image"), "x"] < 1 <= by_node.loc[("L0.self_attn.H1", "last"), "x"]
    heaviest = segments.loc[segments["score"].abs().idxmax()]
    assert heaviest["weight"] == pytest.approx(6.0) and segments["weight"].min() == pytest.approx(0.5 + 5.5 / 4)
    first = segments.iloc[0]
    assert (first["x"], first["y"]) == tuple(by_node.loc[("image", "image"), ["x", "y"]])
    assert (first["x2"], first["y2"]) == tuple(by_node.loc[("L0.self_attn.H1", "image"), ["x", "y"]])


def test_validation_and_skipped_summaries():
    validation = pd.DataFrame(
        {
            **{key: [value] * 4 for key, value in LABELS.items()},
            "sample_id": ["a", "b", "a", "b"],
            "method": ["eap", "eap", "eap_ig", "eap_ig"],
            "spearman": [0.2, 0.6, math.nan, 1.0],
            "top_k": [5, 5, 5, 5],
            "recall_top_k": [0.4, 0.8, 1.0, 0.6],
        }
    )
    summary = validation_summary(validation).set_index("method")
    assert summary.loc["eap", ["spearman", "recall_top_k"]].tolist() == pytest.approx([0.4, 0.6])
    assert summary.loc["eap_ig", "spearman"] == 1.0 and summary.loc["eap_ig", "n_spearman_undefined"] == 1
    assert summary["n_pairs"].tolist() == [2, 2]
    skipped = pd.DataFrame(
        {**{key: [value] * 3 for key, value in LABELS.items()}, "sample_id": ["a", "b", "c"], "reason": list("xxy")}
    )
    assert skipped_summary(skipped)[["reason", "n_pairs"]].values.tolist() == [["x", 2], ["y", 1]]


def test_figures_are_written_and_the_report_section_holds_the_tables(tmp_path):
    curves = pd.DataFrame(
        [
            {**LABELS, "method": method, "level": level, "n": n, "fraction": n / 8, "faithfulness": n / 8}
            for method in ("eap", "eap_ig")
            for level in ("edges", "nodes")
            for n in (0, 1, 3, 8)
        ]
    )
    written = faithfulness_figure(curves, 0.8, tmp_path / "circuitcurve_m", "curves")
    written += circuit_graph_figure(A, tmp_path / "circuitgraph_m_d_sip", "graph")
    overlap = circuit_overlap("m", {"d/sip": A, "d/str": B})
    written += overlap_figure(overlap, tmp_path / "circuitoverlap_m", "overlap")
    assert {path.name for path in written} == {
        f"{stem}.{fmt}"
        for stem in ("circuitcurve_m", "circuitgraph_m_d_sip", "circuitoverlap_m")
        for fmt in ("png", "svg", "html")
    }
    assert all(path.stat().st_size > 0 for path in written)
    with pytest.raises(ValueError, match="no edges to draw"):
        circuit_graph_figure(A.assign(in_circuit=False), tmp_path / "empty", "empty")
    summary = pd.DataFrame(
        [
            {
                **LABELS,
                "method": "eap_ig",
                "n_pairs": 2,
                "n_edges": 4,
                "ld_clean": 1.0,
                "ld_corrupt": -1.0,
                "cpr": 0.9,
                "cmd": 0.1,
                "target": 0.8,
                "smallest_n": 3,
                "smallest_faithfulness": 0.85,
            }
        ]
    )
    empty = pd.DataFrame(columns=[*LABELS, "sample_id", "method", "spearman", "top_k", "recall_top_k", "reason"])
    section = circuits_section(
        CircuitResults(summary, empty, empty, overlap, pd.DataFrame(columns=list(SHARED_HEAD_COLUMNS)), {})
    )
    assert section.title == "Circuits" and "docs/method.md, §12" in section.html
    assert "ld_clean" not in section.tables[0].df.columns and section.tables[0].df["smallest_n"].tolist() == [3]
    assert section.tables[1].df.empty and section.tables[4].df.empty and section.tables[2].df.equals(overlap)
