"""Circuit runs of a residual-sum model in one forward, several circuits at once (docs/method.md, §12
"Faithfulness").

Where the stream is the sum of the nodes' own outputs (`VLMAdapter.residual_norms`), a reader's input in a circuit
run is the run's stream plus Δ = Σ over its cut edges of (corrupt − circuit-run output) of the edge's node at the
edge's group; equivalently the corrupt run's stream minus the run's, minus the same sum over its kept edges (the
shorter of the two sums is taken). One forward carries a batch of circuits (rows from the first layer on, the image
encoder once): each layer's queries, keys and values are projected per head from its readers' own inputs, each MLP
reads its own, and the logits are read from the final norm's input. `notice.circuits.ablation` is the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch

from notice.circuits.ablation import Pair, keep_table
from notice.circuits.additive import supported
from notice.circuits.graph import EDGE_GROUPS, QKV, Node, Reader
from notice.circuits.runs import STREAM, forward
from notice.patching.hooks import hooked

Point = tuple[str, int]  # ("self_attn" | "mlp", layer) or ("logits", -1): where readers read the stream


class _HeadReached(Exception):
    """Raised once the score head's input is known: the batch's logits are computed from it."""


def _norm_points(pair: Pair) -> list[tuple[Point, torch.nn.Module]]:
    adapter = pair.adapter
    points: list[tuple[Point, torch.nn.Module]] = []
    for layer in range(adapter.n_layers):
        norms = adapter.residual_norms(layer)
        if norms is None:
            raise ValueError(f"{adapter.family}: layer {layer} is not a residual-sum layer")
        points += [(("self_attn", layer), norms[0]), (("mlp", layer), norms[1])]
    return [*points, (("logits", -1), adapter.head_input_module())]


def corrupt_streams(pair: Pair) -> dict[Point, torch.Tensor]:
    """The corrupt run's stream [T, D] at every point (every node forced to its corrupt output: the corrupt run)."""
    if "corrupt_streams" not in pair.cache:
        seen: dict[Point, torch.Tensor] = {}
        forced = {s: pair.corrupt.values[s] for s in pair.graph.order if s[0] in ("input", "heads", "module")}
        with ExitStack() as stack, torch.no_grad():
            for point, norm in _norm_points(pair):
                stack.enter_context(hooked(norm, "input", _recorder(seen, point)))
            forward(pair.adapter, pair.inp, forced)
        pair.cache["corrupt_streams"] = seen
    return pair.cache["corrupt_streams"]


def _recorder(store: dict, key: Point):
    def record(x: torch.Tensor) -> torch.Tensor:
        store[key] = x.detach()[0]
        return x

    return record


def circuits_logits(pair: Pair, circuits: Sequence[np.ndarray]) -> torch.Tensor:
    """Answer logits [len(circuits), V] (float32) of the circuit runs of `circuits` (bool [edges] each, kept)."""
    if not supported(pair):
        raise ValueError(f"{pair.adapter.family}: not a residual-sum model; use notice.circuits.ablation")
    graph, adapter = pair.graph, pair.adapter
    rows = len(circuits)
    tables = [keep_table(graph, kept) for kept in circuits]
    cut = torch.as_tensor(np.stack([exists & ~keep for keep, exists in tables]))  # [B, R, N, G]
    kept = torch.as_tensor(np.stack([exists & keep for keep, exists in tables]))
    corrupt = corrupt_streams(pair)
    clean_x0, corrupt_x0 = pair.clean.values[STREAM][0], pair.corrupt.values[STREAM][0]
    n_rows = clean_x0.shape[0]
    groups = torch.as_tensor(graph.groups_of_rows(n_rows))
    image = (groups == EDGE_GROUPS.index("image"))[:, None]
    node = {n: i for i, n in enumerate(graph.nodes)}
    reader = {r: i for i, r in enumerate(graph.readers)}
    # corrupt − circuit-run output of every node computed so far, in the stream, [B, T, D] each
    differences: dict[int, torch.Tensor] = {
        node[Node("input", "image")]: torch.where(image, corrupt_x0 - clean_x0, 0).expand(rows, -1, -1),
        node[Node("input", "text")]: torch.where(~image, corrupt_x0 - clean_x0, 0).expand(rows, -1, -1),
    }

    def delta(r: int, x: torch.Tensor, point: Point) -> torch.Tensor:
        """[B, T, D]: what reader r's input adds to the run's stream `x` [B, T, D]."""
        out = torch.zeros_like(x)
        for b in range(rows):
            n_cut, n_kept = int(cut[b, r].sum()), int(kept[b, r].sum())
            if n_cut == 0:
                continue
            which, sign = (cut, 1.0) if n_cut <= n_kept else (kept, -1.0)
            chosen = [n for n in torch.nonzero(which[b, r].any(-1)).flatten().tolist()]
            if chosen:
                mask = which[b, r][chosen][:, groups].to(x.dtype)  # [n, T]
                values = torch.stack([differences[n][b] for n in chosen])
                out[b] = sign * torch.einsum("nt,ntd->td", mask, values)
            if sign < 0:
                out[b] += corrupt[point] - x[b]
        return out

    projected: dict[tuple[str, int, int], torch.Tensor] = {}

    def attention_inputs(layer: int, norm: torch.nn.Module):
        def read(x: torch.Tensor) -> torch.Tensor:
            for which in range(3):
                module: Any = adapter.attention_projections("self_attn", layer)[which]  # a projection: by name
                slot = ("proj", "self_attn", layer, which)
                width = graph.reader_widths[slot]
                heads = module.out_features // width
                mine = [reader[Reader(QKV[which], "self_attn", layer, h)] for h in range(heads)]
                stacked = torch.stack([x + delta(r, x, ("self_attn", layer)) for r in mine], dim=1)  # [B, H, T, D]
                inputs = norm.forward(stacked)  # not norm(...): this runs inside the norm's own hook
                weight = module.weight.view(heads, width, -1)
                out = torch.einsum("bhtd,hwd->bthw", inputs, weight)
                if module.bias is not None:
                    out = out + module.bias.view(heads, width)
                projected[("proj", layer, which)] = out.reshape(rows, n_rows, heads * width)
            return x

        return read

    def projection(layer: int, which: int):
        return lambda x: projected.pop(("proj", layer, which)).to(x.dtype)

    def mlp_input(layer: int):
        r = reader[Reader("module", "mlp", layer)]
        return lambda x: x + delta(r, x, ("mlp", layer))

    def heads_output(layer: int):
        o_proj: Any = adapter.site_module("self_attn", layer)[0]  # the output projection: its weight by name
        z_corrupt = pair.corrupt.values[("heads", "self_attn", layer, 0)][0]
        width = graph.head_widths[("self_attn", layer)]
        first = node[Node("head", "self_attn", layer, 0)]

        def keep(z: torch.Tensor) -> torch.Tensor:
            dz = (z_corrupt - z).view(rows, n_rows, adapter.n_heads, width)
            weight = o_proj.weight.view(-1, adapter.n_heads, width)
            for h in range(adapter.n_heads):
                differences[first + h] = torch.einsum("btw,dw->btd", dz[:, :, h], weight[:, h])
            return z

        return keep

    def mlp_output(layer: int):
        n = node[Node("module", "mlp", layer)]
        corrupt_out = pair.corrupt.values[("module", "mlp", layer, 0)][0]

        def keep(y: torch.Tensor) -> torch.Tensor:
            differences[n] = corrupt_out - y
            return y

        return keep

    final: list[torch.Tensor] = []
    logits_reader = len(graph.readers) - 1

    def head_input(x: torch.Tensor) -> torch.Tensor:
        final.append(x + delta(logits_reader, x, ("logits", -1)))
        raise _HeadReached  # the score head runs below, on every row (the model's own scores one)

    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(
            hooked(adapter.site_module("layer", 0)[0], "input", lambda x: x.expand(rows, -1, -1).clone())
        )
        for layer in range(adapter.n_layers):
            attention_norm, mlp_norm = adapter.residual_norms(layer)  # type: ignore[misc]
            stack.enter_context(hooked(attention_norm, "input", attention_inputs(layer, attention_norm)))
            for which, module in enumerate(adapter.attention_projections("self_attn", layer)):
                stack.enter_context(hooked(module, "output", projection(layer, which)))
            stack.enter_context(hooked(adapter.site_module("self_attn", layer)[0], "input", heads_output(layer)))
            stack.enter_context(hooked(mlp_norm, "input", mlp_input(layer)))
            stack.enter_context(hooked(adapter.site_module("mlp", layer)[0], "output", mlp_output(layer)))
        stack.enter_context(hooked(adapter.head_input_module(), "input", head_input))
        try:
            adapter.answer_logits(pair.inp)
        except _HeadReached:
            pass
    if not final:
        raise RuntimeError(f"{adapter.family}: the score head's input was never computed")
    answer = int(graph.row_groups.tolist().index(EDGE_GROUPS.index("last")))
    with torch.no_grad():  # after the hooks: the score head's norm is one of the hooked modules
        return adapter.final_logits(final[0][:, answer])
