"""Exact circuit runs: the clean input with every edge outside the circuit given its corrupt value (docs/method.md,
§12 "Faithfulness").

A reader's input is recomputed by a forward in which every node computed before it outputs, at each token group,
its value in the circuit run where the edge is kept and its corrupt-run value where it is not (the model's own
residual connections, norms and any computation that is no node carry them to the reader). A head's output in the
circuit run is its attention recomputed from its own query, key and value readers. Shortcuts that change no number:
a reader whose edges are all cut reads the corrupt run's value; one whose edges are all kept from nodes still at
their clean values reads the clean run's; readers with the same inputs share one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from notice.adapters.base import ModelInput, VLMAdapter
from notice.circuits.graph import EDGE_GROUPS, Graph, Node, build_graph
from notice.circuits.runs import Run, Slot, forward
from notice.flow.groups import TokenGroups
from notice.patching.hooks import ImageFn
from notice.patching.scores import logit_diff
from notice.patching.sites import check_aligned


@dataclass
class Pair:
    """A (clean, corrupt) sample on the graph: both runs recorded, the metric's tokens."""

    adapter: VLMAdapter
    inp: ModelInput
    graph: Graph
    clean: Run
    corrupt: Run
    tau: int
    tau_p: int
    cache: dict = field(default_factory=dict)  # what faster runs derive from the two runs once

    @property
    def ld_clean(self) -> float:
        return float(logit_diff(self.clean.logits, self.tau, self.tau_p))  # type: ignore[arg-type]

    @property
    def ld_corrupt(self) -> float:
        return float(logit_diff(self.corrupt.logits, self.tau, self.tau_p))  # type: ignore[arg-type]


@torch.no_grad()
def record_pair(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    groups: TokenGroups,
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
) -> Pair:
    """Both runs of a sample recorded at every slot, and its graph."""
    check_aligned(clean_inp, corrupt_inp)
    clean = forward(adapter, clean_inp, record=True)
    corrupt = forward(adapter, corrupt_inp, record=True, image_fn=corrupt_image_fn)
    for slot, value in clean.values.items():
        other = corrupt.values.get(slot)
        if other is None or other.shape != value.shape:
            raise ValueError(
                f"{adapter.family}: {slot} has shape {tuple(value.shape)} in the clean run and "
                f"{None if other is None else tuple(other.shape)} in the corrupt run: the runs do not line up"
            )
    return Pair(adapter, clean_inp, build_graph(adapter, clean, groups), clean, corrupt, tau, tau_p)


def keep_table(graph: Graph, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, exists) bool [readers, nodes, groups]: an edge outside the graph counts as kept (it carries nothing)."""
    shape = (len(graph.readers), len(graph.nodes), len(EDGE_GROUPS))
    keep, exists = np.ones(shape, dtype=bool), np.zeros(shape, dtype=bool)
    keep[graph.edge_reader, graph.edge_node, graph.edge_group] = kept
    exists[graph.edge_reader, graph.edge_node, graph.edge_group] = True
    return keep, exists


def _node_index(graph: Graph) -> dict[Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def mixed(pair: Pair, slot: Slot, keep: np.ndarray, cur: dict[Slot, torch.Tensor]) -> torch.Tensor:
    """`slot`'s value as one reader receives it: the circuit run's (`cur`) where `keep` [nodes, groups] keeps the
    edge, the corrupt run's elsewhere."""
    graph, index = pair.graph, _node_index(pair.graph)
    here, there = cur[slot], pair.corrupt.values[slot]
    kind, site, layer, _ = slot
    rows = here.shape[-2] if here.dim() >= 2 else 1
    groups = torch.as_tensor(graph.groups_of_rows(rows))
    if kind == "input":
        node = index[Node("input", site)]
        if site == "image" or rows != len(graph.row_groups):
            group = EDGE_GROUPS.index("image" if site == "image" else "text")
            return here if keep[node, group] else there
        take = torch.as_tensor(keep[node])[groups][:, None]
    elif kind == "heads":
        first = index[Node("head", site, layer, 0)]
        per_head = torch.as_tensor(keep[first : first + pair.adapter.n_heads])  # [H, G]
        take = per_head[:, groups].T.repeat_interleave(graph.head_widths[(site, layer)], dim=1)  # [rows, H·w]
    else:
        take = torch.as_tensor(keep[index[Node("module", site, layer)]])[groups][:, None]
    return torch.where(take.to(here.device), here, there)


def circuit_logits(pair: Pair, kept: np.ndarray) -> torch.Tensor:
    """Answer logits [V] of the clean input with every edge not `kept` (bool [edges]) at its corrupt value."""
    graph = pair.graph
    keep, exists = keep_table(graph, kept)
    index = _node_index(graph)
    node_slots = [s for s in graph.order if s[0] in ("input", "heads", "module")]
    cur: dict[Slot, torch.Tensor] = {s: pair.clean.values[s] for s in node_slots if s[0] == "input"}
    is_clean: dict[Slot, bool] = {s: True for s in cur}
    slot_nodes = {s: [index[n] for n in graph.nodes if s in graph.node_slots(n)] for s in node_slots}
    shared: dict[tuple, torch.Tensor] = {}

    def upstream(slot: Slot | None) -> list[Slot]:
        end = len(graph.order) if slot is None else graph.order.index(slot)
        return [s for s in graph.order[:end] if s in slot_nodes]

    def value(r: int, slot: Slot | None) -> torch.Tensor:
        """What reader r reads (its slot's value; the logits for the logits reader) in the circuit run."""
        edges = exists[r]
        before = upstream(slot)
        if not edges.any():
            run = pair.clean  # nothing in the graph reaches it
        elif not (keep[r] & edges).any():
            run = pair.corrupt
        elif (keep[r] | ~edges).all() and all(is_clean[s] for s in before if edges[slot_nodes[s]].any()):
            run = pair.clean
        else:
            key = (slot, keep[r].tobytes())
            if key not in shared:
                forced = {s: mixed(pair, s, keep[r], cur) for s in before}
                result = forward(pair.adapter, pair.inp, forced, stop=slot)
                shared[key] = result.logits if slot is None else result.values[slot]  # type: ignore[assignment]
            return shared[key]
        return run.logits if slot is None else run.values[slot]  # type: ignore[return-value]

    readers_of: dict[Slot, list[int]] = {}
    for r, reader in enumerate(graph.readers):
        if reader.slot is not None:
            readers_of.setdefault(reader.slot, []).append(r)
    with torch.no_grad():
        projections: dict[Slot, torch.Tensor] = {}
        for slot in graph.order:
            kind = slot[0]
            if kind == "proj":
                width = graph.reader_widths[slot]
                blocks = [value(r, slot)[..., h * width : (h + 1) * width] for h, r in enumerate(readers_of[slot])]
                projections[slot] = torch.cat(blocks, dim=-1)
            elif kind == "heads":
                mine = {p: v for p, v in projections.items() if p[1:3] == slot[1:3]}
                if all(torch.equal(v, pair.clean.values[p]) for p, v in mine.items()):
                    cur[slot] = pair.clean.values[slot]
                elif all(torch.equal(v, pair.corrupt.values[p]) for p, v in mine.items()):
                    cur[slot] = pair.corrupt.values[slot]
                else:
                    forced = {s: cur[s] for s in upstream(slot)} | mine
                    cur[slot] = forward(pair.adapter, pair.inp, forced, stop=slot).values[slot]
                is_clean[slot] = torch.equal(cur[slot], pair.clean.values[slot])
            elif kind == "module":
                (r,) = readers_of[slot]
                cur[slot] = value(r, slot)
                is_clean[slot] = torch.equal(cur[slot], pair.clean.values[slot])
        return value(len(graph.readers) - 1, None)


def circuit_ld(pair: Pair, kept: np.ndarray) -> float:
    """The metric (logit difference) of the circuit run."""
    return float(logit_diff(circuit_logits(pair, kept), pair.tau, pair.tau_p))


def faithfulness(ld_circuit: float, ld_clean: float, ld_corrupt: float) -> float:
    """(m(circuit) − m(corrupt)) / (m(clean) − m(corrupt)); NaN when the corruption changes nothing."""
    span = ld_clean - ld_corrupt
    return (ld_circuit - ld_corrupt) / span if span != 0 else float("nan")
