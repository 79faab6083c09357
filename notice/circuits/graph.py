"""The circuit graph of one sample: nodes, node inputs (readers) and edges grouped by token group (docs/method.md,
§12).

Nodes are the image and the text (the graph's inputs), every attention head and every module site (an MLP).
A reader is one input of a node: a head's query, key or value (a key/value head shared by several query heads under
grouped-query attention is one reader), a module's input, or the logits. An edge (node, reader, group) is the
node's output at the positions of a token group as the reader receives it; it exists where the node is computed
before the reader reads and writes what the reader reads there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from notice.adapters.base import VLMAdapter
from notice.circuits.runs import IMAGE_READERS, Run, Slot
from notice.flow.groups import TokenGroups

EDGE_GROUPS: tuple[str, ...] = ("image", "question", "last", "text")  # a partition of the stream's positions
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    kind: str  # "input", "head" or "module"
    site: str  # "image"/"text" for inputs, the attention site of a head, the module site
    layer: int = -1
    head: int = -1

    @property
    def name(self) -> str:
        if self.kind == "input":
            return self.site
        return f"L{self.layer}.{self.site}" + (f".H{self.head}" if self.kind == "head" else "")


@dataclass(frozen=True)
class Reader:
    kind: str  # "q", "k", "v", "module" or "logits"
    site: str = ""
    layer: int = -1
    head: int = -1  # the query head (q) or key/value head (k, v)

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "module":
            return f"L{self.layer}.{self.site}"
        return f"L{self.layer}.{self.site}.H{self.head}.{self.kind}"

    @property
    def node_name(self) -> str:
        """The node whose input it is (a key/value head: the query heads sharing it are named by its index)."""
        if self.kind in QKV:
            return f"L{self.layer}.{self.site}.H{self.head}"
        return self.name

    @property
    def slot(self) -> Slot | None:
        """The slot that holds what the reader reads: its projection, or its module's output; None for the logits."""
        if self.kind == "logits":
            return None
        if self.kind == "module":
            return ("module", self.site, self.layer, 0)
        return ("proj", self.site, self.layer, QKV.index(self.kind))

    @property
    def reads_image_only(self) -> bool:
        return self.kind in ("k", "v") and self.site in IMAGE_READERS


@dataclass
class Graph:
    """Nodes, readers and edges (arrays over edges: node index, reader index, group index)."""

    nodes: list[Node]
    readers: list[Reader]
    edge_node: np.ndarray
    edge_reader: np.ndarray
    edge_group: np.ndarray
    row_groups: np.ndarray  # group index of each stream position
    head_widths: dict[tuple[str, int], int]  # columns per head of an attention's head outputs
    reader_widths: dict[Slot, int]  # columns per head of a projection (key/value heads for k and v)
    order: list[Slot]  # slots in the order a forward computes them

    @property
    def n_edges(self) -> int:
        return len(self.edge_node)

    def groups_of_rows(self, n: int) -> np.ndarray:
        """Group index of rows 0..n-1 of a slot (rows past the stream's known positions, e.g. a Q-Former's
        instruction tokens after its queries, count as text)."""
        return padded_groups(self.row_groups, n)

    def node_slots(self, node: Node) -> list[Slot]:
        if node.kind == "input":
            return [s for s in self.order if s[0] == "input" and s[1] == node.site]
        if node.kind == "head":
            return [("heads", node.site, node.layer, 0)]
        return [("module", node.site, node.layer, 0)]

    def edge_name(self, edge: int) -> str:
        node, reader = self.nodes[self.edge_node[edge]], self.readers[self.edge_reader[edge]]
        return f"{node.name}->{reader.name}[{EDGE_GROUPS[self.edge_group[edge]]}]"


def row_groups(groups: TokenGroups) -> np.ndarray:
    """Group index (EDGE_GROUPS) of every stream position (the image's only where its keys are positions)."""
    present = [g for g in EDGE_GROUPS if g != "image" or groups.image_keys_are_positions]
    size = max((p for g in present for p in groups.positions[g]), default=-1) + 1
    out = np.full(size, EDGE_GROUPS.index("text"), dtype=np.int64)
    for group in present:
        out[list(groups.positions[group])] = EDGE_GROUPS.index(group)
    return out


def padded_groups(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([rows[:n], np.full(max(n - len(rows), 0), EDGE_GROUPS.index("text"), dtype=np.int64)])


def _rows(value: torch.Tensor) -> int:
    return int(value.shape[-2]) if value.dim() >= 2 else 1


def build_graph(adapter: VLMAdapter, clean: Run, groups: TokenGroups) -> Graph:
    """The graph of `adapter` on a sample: `clean` is a recorded forward of it (which slots exist, their order and
    shapes), `groups` its token groups."""
    rows = row_groups(groups)
    order = clean.order
    position = {slot: i for i, slot in enumerate(order)}
    text = EDGE_GROUPS.index("text")
    image = EDGE_GROUPS.index("image")

    def slot_groups(slot: Slot) -> set[int]:
        return set(padded_groups(rows, _rows(clean.values[slot])).tolist())

    nodes: list[Node] = [Node("input", "image"), Node("input", "text")]
    readers: list[Reader] = []
    head_widths: dict[tuple[str, int], int] = {}
    reader_widths: dict[Slot, int] = {}
    for slot in order:
        kind, site, layer, index = slot
        if kind == "heads":
            nodes += [Node("head", site, layer, h) for h in range(adapter.n_heads)]
            head_widths[(site, layer)] = clean.values[slot].shape[-1] // adapter.n_heads
        elif kind == "module":
            nodes.append(Node("module", site, layer))
            readers.append(Reader("module", site, layer))
        elif kind == "proj":
            width = clean.values[slot].shape[-1]
            heads = adapter.n_heads if index == 0 else width // adapter.head_dim
            reader_widths[slot] = width // heads
            readers += [Reader(QKV[index], site, layer, h) for h in range(heads)]
    readers.append(Reader("logits"))
    last = groups.positions["last"]  # where the logits read the stream; every position when no single one

    # What each node writes: (slot position in the order, groups)
    writes: list[tuple[int, set[int]]] = []
    for node in nodes:
        if node.kind == "input":
            slots = [s for s in order if s[0] == "input" and s[1] == node.site]
            if node.site == "image":
                writes.append((min(position[s] for s in slots), {image}))
                continue
            aligned = [s for s in slots if _rows(clean.values[s]) == len(rows)]
            written = set(rows.tolist()) - ({image} if groups.image_keys_are_positions else set())
            if len(aligned) < len(slots):
                written.add(text)
            writes.append((min(position[s] for s in slots), written))
        else:
            slot = ("heads", node.site, node.layer, 0) if node.kind == "head" else ("module", node.site, node.layer, 0)
            writes.append((position[slot], slot_groups(slot)))

    edges: list[tuple[int, int, int]] = []
    for r, reader in enumerate(readers):
        if reader.slot is None:
            read_at, reads = len(order), ({int(rows[last[0]])} if last else set(rows.tolist()))
        else:
            read_at = position[reader.slot]
            reads = {image} if reader.reads_image_only else slot_groups(reader.slot)
        for n, node in enumerate(nodes):
            at, written = writes[n]
            if at >= read_at:
                continue
            if reader.reads_image_only and node.site != "image":
                continue
            if (
                node.site == "image"
                and node.kind == "input"
                and not (reader.reads_image_only or groups.image_keys_are_positions)
            ):
                continue
            edges += [(n, r, g) for g in sorted(written & reads)]
    array = np.array(edges, dtype=np.int64).reshape(-1, 3)
    return Graph(nodes, readers, array[:, 0], array[:, 1], array[:, 2], rows, head_widths, reader_widths, order)
