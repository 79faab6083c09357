"""Edge attribution: EAP and EAP-IG scores of every edge of a pair's graph (docs/method.md, §12 "Scores").

The score of edge (u, r, g) estimates LD(circuit without the edge) − LD(clean) to first order:
Σ over the group's positions of (u_corrupt − u_clean) · ∂LD/∂(u as r receives it). EAP takes the gradient in the
clean run; EAP-IG averages it over `ig_steps` runs whose inputs (the image and text nodes) are interpolated between
corrupt and clean, α = k/ig_steps, k = 1..ig_steps (the last is the clean run).

The gradient through one reader only: one backward gives ∂LD/∂(each reader's value); a forward in which every node
before the reader outputs its value plus a zero leaf (no other path to the reader) maps it back to every node, one
vector-Jacobian product per reader. Scores are float32 sums over each group's positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from notice.circuits.ablation import Pair
from notice.circuits.additive import additive_scores, supported
from notice.circuits.graph import EDGE_GROUPS, Node
from notice.circuits.runs import Slot, forward
from notice.patching.attribution import frozen_parameters
from notice.patching.scores import logit_diff

METHODS = ("eap", "eap_ig")


def _group_sums(pair: Pair, slot: Slot, product: torch.Tensor) -> dict[int, np.ndarray]:
    """Node index -> [groups] sums of `product` (a tensor shaped like `slot`'s value) over each node's columns and
    each group's rows."""
    graph = pair.graph
    index = {node: i for i, node in enumerate(graph.nodes)}
    kind, site, layer, _ = slot
    n_groups = len(EDGE_GROUPS)
    product = product.double()
    if kind == "input":
        node = index[Node("input", site)]
        rows = product.shape[-2] if product.dim() >= 2 else 1
        if site == "image" or rows != len(graph.row_groups):
            out = np.zeros(n_groups)
            out[EDGE_GROUPS.index("image" if site == "image" else "text")] = float(product.sum())
            return {node: out}
    groups = torch.as_tensor(graph.groups_of_rows(product.shape[-2]), device=product.device)
    per_row = product.reshape(-1, product.shape[-2], product.shape[-1]).sum(0)  # [rows, W]
    if kind == "heads":
        heads = pair.adapter.n_heads
        per_head = per_row.view(per_row.shape[0], heads, -1).sum(-1)  # [rows, H]
        sums = torch.zeros(n_groups, heads, dtype=torch.float64, device=product.device).index_add_(0, groups, per_head)
        first = index[Node("head", site, layer, 0)]
        return {first + h: sums[:, h].cpu().numpy() for h in range(heads)}
    sums = torch.zeros(n_groups, dtype=torch.float64, device=product.device).index_add_(0, groups, per_row.sum(-1))
    node = index[Node("input", site)] if kind == "input" else index[Node("module", site, layer)]
    return {node: sums.cpu().numpy()}


def _node_slots(pair: Pair) -> list[Slot]:
    return [s for s in pair.graph.order if s[0] in ("input", "heads", "module")]


def edge_scores(pair: Pair, method: str = "eap_ig", ig_steps: int = 5, *, per_reader: bool = False) -> np.ndarray:
    """Score of every edge of `pair.graph` (float64 [edges]) by `method` (eap, or eap_ig with `ig_steps`): in one
    backward pass per step where the model is a residual sum (notice.circuits.additive), else (or with `per_reader`,
    the reference) with one forward per reader slot."""
    if method not in METHODS:
        raise ValueError(f"circuit scores: method {method!r}, expected one of {METHODS}")
    if method == "eap_ig" and ig_steps < 1:
        raise ValueError(f"circuits.ig_steps must be at least 1, got {ig_steps}")
    graph = pair.graph
    alphas = [1.0] if method == "eap" else [k / ig_steps for k in range(1, ig_steps + 1)]
    totals = torch.zeros(len(graph.readers), len(graph.nodes), len(EDGE_GROUPS), dtype=torch.float64)
    with frozen_parameters(pair.adapter.model):
        if supported(pair) and not per_reader:
            additive_scores(pair, alphas, totals)
        else:
            reader_scores(pair, alphas, totals)
    return (totals / len(alphas)).numpy()[graph.edge_reader, graph.edge_node, graph.edge_group]


def reader_scores(pair: Pair, alphas: list[float], totals: torch.Tensor) -> None:
    """Add Σ over `alphas` of every (reader, node, group) score to `totals` [readers, nodes, groups]: per step one
    backward to every reader's value, then per reader slot one forward from the nodes' values (with zero leaves)
    and one vector-Jacobian product per reader."""
    graph, adapter = pair.graph, pair.adapter
    node_slots = _node_slots(pair)
    inputs = [s for s in node_slots if s[0] == "input"]
    deltas = {s: (pair.corrupt.values[s].double() - pair.clean.values[s].double()) for s in node_slots}
    readers_of: dict[Slot, list[int]] = {}
    for r, reader in enumerate(graph.readers):
        if reader.slot is not None:
            readers_of.setdefault(reader.slot, []).append(r)

    def accumulate(r: int, grads: Mapping[Slot, torch.Tensor | None]) -> None:
        for slot, grad in grads.items():
            if grad is not None:
                for node, sums in _group_sums(pair, slot, deltas[slot] * grad.double()).items():
                    totals[r, node] += torch.from_numpy(sums)

    with torch.enable_grad():
        for alpha in alphas:
            mix = {s: pair.corrupt.values[s] + alpha * (pair.clean.values[s] - pair.corrupt.values[s]) for s in inputs}
            with torch.no_grad():
                point = pair.clean if alpha == 1.0 else forward(adapter, pair.inp, mix, record=True)
            values = {s: point.values[s].detach() for s in node_slots}
            # ∂LD/∂(every reader's value), all in one backward
            reader_leaves = {s: torch.zeros_like(point.values[s], requires_grad=True) for s in readers_of}
            run = forward(adapter, pair.inp, {s: values[s] for s in inputs}, leaves=reader_leaves)
            ld = logit_diff(run.logits, pair.tau, pair.tau_p)  # type: ignore[arg-type]
            reader_grads = dict(zip(reader_leaves, torch.autograd.grad(ld, list(reader_leaves.values()))))
            # the logits read every node directly
            leaves = {s: torch.zeros_like(values[s], requires_grad=True) for s in node_slots}
            run = forward(adapter, pair.inp, values, leaves=leaves)
            ld = logit_diff(run.logits, pair.tau, pair.tau_p)  # type: ignore[arg-type]
            grads = torch.autograd.grad(ld, list(leaves.values()), allow_unused=True)
            accumulate(len(graph.readers) - 1, dict(zip(leaves, grads)))
            for slot, readers in readers_of.items():
                at = graph.order.index(slot)
                before = [s for s in node_slots if graph.order.index(s) < at]
                leaves = {s: torch.zeros_like(values[s], requires_grad=True) for s in before}
                run = forward(adapter, pair.inp, {s: values[s] for s in before}, leaves=leaves, stop=slot)
                value = run.values[slot]
                width = graph.reader_widths.get(slot, value.shape[-1])
                for h, r in enumerate(readers):
                    out = torch.zeros_like(value)
                    block = slice(h * width, (h + 1) * width)
                    out[..., block] = reader_grads[slot][..., block]
                    grads = torch.autograd.grad(value, list(leaves.values()), out, retain_graph=True, allow_unused=True)
                    accumulate(r, dict(zip(leaves, grads)))
