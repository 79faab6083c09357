"""Edge gradients of a residual-sum model in one backward pass (docs/method.md, §12 "Scores").

Where every layer reads the stream through a pre-norm and adds its output projection's and MLP's outputs to it as
they are (`VLMAdapter.residual_norms`), a reader's input is the stream itself, so the gradient of LD with respect to
what any node sends a reader is one vector G_r per reader: for the MLP and the logits, LD's gradient at the input of
their norm (a zero added there reaches nothing else); for head h's query, key or value, the norm's vector-Jacobian
product at the stream of W_h^T ∂LD/∂(its projection block). A node's output in the stream is its own: an MLP's output,
a head's W_o,h z_h, the inputs' rows of the first layer's input (the image's at its positions, the text's at the rest).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from notice.circuits.ablation import Pair
from notice.circuits.graph import EDGE_GROUPS, QKV, Node, Reader
from notice.circuits.runs import STREAM, forward
from notice.patching.hooks import hooked
from notice.patching.scores import logit_diff


def supported(pair: Pair) -> bool:
    """True when every layer of the pair's model is a plain residual-sum layer and the first layer's input was
    recorded."""
    adapter = pair.adapter
    layers = all(adapter.residual_norms(layer) is not None for layer in range(adapter.n_layers))
    return layers and STREAM in pair.clean.values and STREAM in pair.corrupt.values


def _stream_deltas(pair: Pair, dtype: torch.dtype) -> torch.Tensor:
    """[nodes, T, D]: each node's corrupt − clean output as the stream receives it (zero where it writes nothing)."""
    graph, adapter = pair.graph, pair.adapter
    clean, corrupt = pair.clean.values, pair.corrupt.values
    x0 = (corrupt[STREAM] - clean[STREAM]).to(dtype)[0]  # [T, D]
    groups = torch.as_tensor(graph.groups_of_rows(x0.shape[0]), device=x0.device)
    image = (groups == EDGE_GROUPS.index("image"))[:, None]
    out = torch.zeros(len(graph.nodes), *x0.shape, dtype=dtype, device=x0.device)
    for n, node in enumerate(graph.nodes):
        if node.kind == "input":
            out[n] = torch.where(image if node.site == "image" else ~image, x0, 0)
        elif node.kind == "module":
            slot = ("module", node.site, node.layer, 0)
            out[n] = (corrupt[slot] - clean[slot]).to(dtype)[0]
    for (site, layer), width in graph.head_widths.items():
        slot = ("heads", site, layer, 0)
        dz = (corrupt[slot] - clean[slot]).to(dtype)[0]  # [T, H·w]
        o_proj: Any = adapter.site_module(site, layer)[0]  # the output projection: its weight by name
        weight = o_proj.weight.to(dtype)
        first = graph.nodes.index(Node("head", site, layer, 0))
        for h in range(adapter.n_heads):
            block = slice(h * width, (h + 1) * width)
            out[first + h] = dz[:, block] @ weight[:, block].T
    return out


def _norm_vjp(norm: torch.nn.Module, x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[n, T, D]: each of `vectors` [n, T, D] (gradients at the norm's output) pulled back to its input `x` [T, D]."""
    with torch.enable_grad():
        stream = x.detach().expand(vectors.shape[0], *x.shape).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(norm(stream), stream, vectors.to(stream.dtype))
    return grad


def additive_scores(pair: Pair, alphas: list[float], totals: torch.Tensor) -> None:
    """Add Σ over `alphas` of every (reader, node, group) score to `totals` [readers, nodes, groups] (float64): the
    runs' inputs interpolated at α between corrupt and clean, one forward and one backward each."""
    graph, adapter = pair.graph, pair.adapter
    dtype = torch.float64 if adapter.dtype == torch.float64 else torch.float32
    deltas = _stream_deltas(pair, dtype)  # [N, T, D]
    n_rows = deltas.shape[1]
    groups = torch.as_tensor(graph.groups_of_rows(n_rows))
    one_hot = torch.nn.functional.one_hot(groups, len(EDGE_GROUPS)).to(dtype).to(deltas.device)  # [T, G]
    inputs = [s for s in graph.order if s[0] == "input"]
    projections = [s for s in graph.order if s[0] == "proj"]
    index = {reader: r for r, reader in enumerate(graph.readers)}
    for alpha in alphas:
        forced = {s: pair.corrupt.values[s] + alpha * (pair.clean.values[s] - pair.corrupt.values[s]) for s in inputs}
        leaves = {s: torch.zeros_like(pair.clean.values[s], requires_grad=True) for s in projections}
        streams: dict[tuple[str, int], torch.Tensor] = {}
        extra: dict[tuple[str, int], torch.Tensor] = {}
        with ExitStack() as stack, torch.enable_grad():
            for layer in range(adapter.n_layers):
                attention_norm, mlp_norm = adapter.residual_norms(layer)  # type: ignore[misc]
                stack.enter_context(hooked(attention_norm, "input", _seen(streams, ("self_attn", layer))))
                stack.enter_context(hooked(mlp_norm, "input", _leaf(extra, ("mlp", layer))))
            stack.enter_context(hooked(adapter.head_input_module(), "input", _leaf(extra, ("logits", -1))))
            run = forward(adapter, pair.inp, forced, leaves=leaves)
            ld = logit_diff(run.logits, pair.tau, pair.tau_p)  # type: ignore[arg-type]
            wrt = [*leaves.values(), *extra.values()]
            grads = dict(zip([*leaves, *extra], torch.autograd.grad(ld, wrt)))
        for (reads, layer), grad in ((key, grads[key]) for key in extra):
            reader = Reader("logits") if reads == "logits" else Reader("module", "mlp", layer)
            _add_scores(totals, [index[reader]], grad.to(dtype).reshape(1, n_rows, -1), deltas, one_hot)
        for layer in range(adapter.n_layers):
            mine = [s for s in projections if s[2] == layer]
            if not mine:
                continue
            pulled, rows = [], []
            for slot in mine:  # W_h^T ∂LD/∂(head h's block), every head of the layer's q, k and v
                _, site, _, which = slot
                module: Any = adapter.attention_projections(site, layer)[which]  # a projection: its weight by name
                width = graph.reader_widths[slot]
                g = grads[slot].to(dtype).reshape(n_rows, -1)
                heads = g.shape[1] // width
                weight = module.weight.to(dtype).view(heads, width, -1)
                pulled.append(torch.einsum("thw,hwd->htd", g.view(n_rows, heads, width), weight))
                rows += [index[Reader(QKV[which], site, layer, h)] for h in range(heads)]
            norms = adapter.residual_norms(layer)
            assert norms is not None  # `supported` checked every layer
            stream = streams[("self_attn", layer)].reshape(n_rows, -1)
            vectors = _norm_vjp(norms[0], stream, torch.cat(pulled)).to(dtype)
            _add_scores(totals, rows, vectors, deltas, one_hot)


def _add_scores(
    totals: torch.Tensor, rows: list[int], vectors: torch.Tensor, deltas: torch.Tensor, one_hot: torch.Tensor
) -> None:
    """totals[reader, node, group] += Σ over the group's positions of delta_node · vector_reader."""
    products = torch.einsum("ntd,rtd->rnt", deltas, vectors)
    totals[rows] += (products @ one_hot).double().cpu()


def _seen(store: dict, key: tuple[str, int]):
    def keep(x: torch.Tensor) -> torch.Tensor:
        store[key] = x.detach()
        return x

    return keep


def _leaf(store: dict, key: tuple[str, int]):
    def add(x: torch.Tensor) -> torch.Tensor:
        store[key] = torch.zeros_like(x, requires_grad=True)
        return x + store[key]

    return add
