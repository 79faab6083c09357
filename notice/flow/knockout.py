"""Attention knockout between token groups (docs/method.md, §10).

An edge "source:target" blocks every attention edge from a query in `target` to a key in `source` (all heads):
information cannot flow from source to target through attention there. A knocked-out run blocks one edge in a
window of consecutive layers; its scores are compared with the unblocked (base) run's. Image and object keys of
a cross-attention family are the cross-attention's keys; every other edge acts on the stream's self-attention.

Engines: "reference" runs the model's own forward once per row with the blocks in its attention; "fast" gives
the same numbers from the adapter's fast knockout engine: "suffix" (decoders, notice.flow.knockout_suffix) or
"batched" (the rows of a chunk in one forward of `adapter.batched_answer_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import pandas as pd
import torch

from notice.adapters.base import ModelInput, VLMAdapter
from notice.adapters.decoder import DecoderVLMAdapter
from notice.flow.groups import GROUPS, TokenGroups
from notice.flow.knockout_suffix import Knockout, SuffixKnockout
from notice.patching.scores import answer_prob, logit_diff

DEFAULT_EDGES: tuple[str, ...] = (
    "image:question",
    "image:last",
    "question:last",
    "object:question",
    "object:last",
    "text:last",
)
KNOCKOUT_COLUMNS: tuple[str, ...] = (
    "source",
    "target",
    "layer_start",
    "window",
    "p_base",
    "p_knock",
    "ld_base",
    "ld_knock",
    "relative_change",
)
ENGINES: tuple[str, ...] = ("fast", "reference")


def default_window(n_layers: int) -> int:
    """About a quarter of the layers, at least 1."""
    return max(1, round(n_layers / 4))


def parse_edges(text: str | Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Edges from "image:question,image:last" (or a sequence of "source:target"); ValueError naming a bad one."""
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else [str(i).strip() for i in text]
    edges = []
    for item in items:
        source, colon, target = item.partition(":")
        if not colon or source not in GROUPS or target not in GROUPS:
            raise ValueError(f"edge {item!r} is not source:target with groups from {', '.join(GROUPS)}")
        edges.append((source, target))
    if not edges:
        raise ValueError("no edges given")
    return tuple(edges)


def edge_blocks(
    adapter: VLMAdapter, inp: ModelInput, groups: TokenGroups, edges: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(own [T, T], fusion [T, K] or None) blocking `edges`; ValueError for a target that is not a position of the
    stream, or a block that leaves a query no key (its own key blocked, or every cross-attention key)."""
    device = inp.input_ids.device
    stream = adapter.stream_positions(inp)
    T = max(stream) + 1
    own = torch.zeros(T, T, dtype=torch.bool, device=device)
    fusion = (
        None
        if groups.image_keys_are_positions
        else torch.zeros(T, max(groups.positions["image"]) + 1, dtype=torch.bool, device=device)
    )
    for source, target in edges:
        if not groups.keys_in_stream(target):
            raise ValueError(
                f"{adapter.family}: target {target!r} is not a position of the stream (its image keys are "
                "cross-attention keys)"
            )
        queries = torch.tensor(groups.positions[target], dtype=torch.long, device=device)
        keys = torch.tensor(groups.positions[source], dtype=torch.long, device=device)
        matrix = own if groups.keys_in_stream(source) else fusion
        assert matrix is not None
        matrix[queries[:, None], keys[None, :]] = True
    selfish = torch.nonzero(own.diagonal()).flatten().tolist()
    if selfish:
        raise ValueError(
            f"blocking {', '.join(f'{s}:{t}' for s, t in edges)} blocks the own key of query positions {selfish}: "
            "a query may be left no key (softmax of nothing); knock out edges between different groups"
        )
    if fusion is not None and bool(fusion.all(-1).any()):
        blind = torch.nonzero(fusion.all(-1)).flatten().tolist()
        raise ValueError(
            f"{adapter.family}: blocking {', '.join(f'{s}:{t}' for s, t in edges)} blocks every cross-attention key "
            f"of query positions {blind} (softmax of nothing); block a part of the image (e.g. 'object') instead"
        )
    return own, fusion


def edges_without_rows(
    adapter: VLMAdapter, inp: ModelInput, groups: TokenGroups, edges: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """Why each edge of `edges` that cannot be knocked out gives no rows: an empty group, or `edge_blocks`'
    refusal; the other edges are not listed."""
    reasons = {}
    for source, target in edges:
        empty = [group for group in (source, target) if not groups.positions[group]]
        if empty:
            reasons[(source, target)] = f"{adapter.family} has no {' and no '.join(dict.fromkeys(empty))} tokens here"
            continue
        try:
            edge_blocks(adapter, inp, groups, [(source, target)])
        except ValueError as refusal:
            reasons[(source, target)] = str(refusal)
    return reasons


def knocked_logits(
    adapter: VLMAdapter, inp: ModelInput, rows: Sequence[Knockout], engine: str = "fast", batch_size: int = 64
) -> torch.Tensor:
    """Answer logits [n, V] (float32) of the knocked-out runs; a row that blocks nothing is the base run
    (`adapter.answer_logits`) bit for bit."""
    return base_and_knocked_logits(adapter, inp, rows, engine, batch_size)[1]


def base_and_knocked_logits(
    adapter: VLMAdapter, inp: ModelInput, rows: Sequence[Knockout], engine: str = "fast", batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base run's answer logits [V] and `knocked_logits`. The suffix engine's clean-state capture is the base
    run (the model's forward with its attention in `blocked_attention`, which blocks nothing there: eager
    attention's own arithmetic), so the base is not run twice."""
    if engine not in ENGINES:
        raise ValueError(f"unknown knockout engine {engine!r}; engines: {', '.join(ENGINES)}")
    for row in rows:
        if not (0 <= row.layer_start and row.window >= 1 and row.layer_start + row.window <= adapter.n_layers):
            raise ValueError(
                f"window {row.layer_start}..{row.layer_start + row.window - 1} is outside the layers "
                f"0..{adapter.n_layers - 1}"
            )
    live = [i for i, row in enumerate(rows) if not row.empty]
    if engine == "fast" and adapter.knockout_engine == "suffix" and live:
        if not isinstance(adapter, DecoderVLMAdapter) or rows[live[0]].fusion is not None:
            raise TypeError(f"{adapter.family}: the suffix knockout engine runs token-fusion decoders only")
        suffix = SuffixKnockout(adapter, inp)
        out = suffix.base_logits.expand(len(rows), -1).clone()
        # A chunk recomputes from its rows' first changed position: rows that change the same positions run
        # together (edges into the last position recompute it alone).
        first = {i: suffix.first_changed(rows[i]) for i in live}
        for _, same in groupby(sorted(live, key=lambda i: (first[i], rows[i].layer_start)), key=first.__getitem__):
            for chunk in _chunks(list(same), batch_size):
                out[chunk] = suffix.run_rows([rows[i] for i in chunk])
        return suffix.base_logits, out
    base = adapter.answer_logits(inp)
    out = base.expand(len(rows), -1).clone()
    if engine == "reference":
        for i in live:
            out[i] = reference_logits(adapter, inp, rows[i])
        return base, out
    for chunk in _chunks(live, batch_size):
        out[chunk] = _batched(adapter, inp, [rows[i] for i in chunk])
    return base, out


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _layer_blocks(rows: Sequence[Knockout], layers: int, fusion: bool) -> dict[int, torch.Tensor]:
    """layer -> bool [n, T, ·]: each row's blocks in its window's layers (nothing blocked in the others)."""
    blocks = {}
    for layer in range(layers):
        if any(row.in_window(layer) for row in rows):
            parts = [row.fusion if fusion else row.own for row in rows]
            assert all(part is not None for part in parts)
            blocks[layer] = torch.stack(
                [p if row.in_window(layer) else torch.zeros_like(p) for p, row in zip(parts, rows) if p is not None]
            )
    return blocks


@torch.no_grad()
def reference_logits(adapter: VLMAdapter, inp: ModelInput, row: Knockout) -> torch.Tensor:
    """Answer logits [V] (float32) of one knocked-out run: the model's own forward with the row's blocks."""
    own = _layer_blocks([row], adapter.n_layers, fusion=False)
    fusion = _layer_blocks([row], adapter.n_layers, fusion=True) if row.fusion is not None else {}
    with adapter.attention_blocks(own, fusion):
        return adapter.answer_logits(inp)


@torch.no_grad()
def _batched(adapter: VLMAdapter, inp: ModelInput, rows: Sequence[Knockout]) -> torch.Tensor:
    own = _layer_blocks(rows, adapter.n_layers, fusion=False)
    fusion = _layer_blocks(rows, adapter.n_layers, fusion=True) if rows[0].fusion is not None else {}
    with adapter.attention_blocks(own, fusion):
        return adapter.batched_answer_logits(inp, len(rows))


def knockout_rows(
    adapter: VLMAdapter,
    inp: ModelInput,
    tau: int,
    tau_p: int,
    groups: TokenGroups,
    edges: Sequence[tuple[str, str]] | str,
    window: int,
    engine: str = "fast",
    batch_size: int = 64,
) -> pd.DataFrame:
    """KNOCKOUT_COLUMNS, one row per (edge, window start 0..n_layers-window), edges in the order given; an edge
    whose source or target group is empty gives no rows."""
    pairs = parse_edges(edges) if isinstance(edges, str) else tuple(edges)
    if not 1 <= window <= adapter.n_layers:
        raise ValueError(f"window {window} is not between 1 and the model's {adapter.n_layers} layers")
    keys: list[tuple[str, str, int]] = []
    rows: list[Knockout] = []
    for source, target in pairs:
        if not groups.positions[source] or not groups.positions[target]:
            continue
        own, fusion = edge_blocks(adapter, inp, groups, [(source, target)])
        for start in range(adapter.n_layers - window + 1):
            keys.append((source, target, start))
            rows.append(Knockout(start, window, own, fusion))
    base, logits = base_and_knocked_logits(adapter, inp, rows, engine, batch_size)
    p_base, ld_base = float(answer_prob(base, tau)), float(logit_diff(base, tau, tau_p))
    p_knock = answer_prob(logits, tau).tolist()
    ld_knock = logit_diff(logits, tau, tau_p).tolist()
    records = [
        {
            "source": source,
            "target": target,
            "layer_start": start,
            "window": window,
            "p_base": p_base,
            "p_knock": p,
            "ld_base": ld_base,
            "ld_knock": ld,
            "relative_change": (p - p_base) / p_base,
        }
        for (source, target, start), p, ld in zip(keys, p_knock, ld_knock)
    ]
    return pd.DataFrame(records, columns=list(KNOCKOUT_COLUMNS))
