"""Blocked attention edges: chosen (query, key) scores set to −inf before the softmax, in the model's own attention.

Attention knockout (notice.flow.knockout) blocks edges per layer. A block is a bool tensor [B, Tq, Tk] (True:
blocked), B rows of the batch (or 1 for every row); a block smaller than the scores is padded with False (keys
past it, e.g. an instruction's tokens after a Q-Former's queries, stay visible). The rest of the attention is
the model's: its mask (causal, sliding window, prefix-LM), scaling and soft-cap. Two ways in, as for the taps
(notice.adapters.attention_taps):

- modules that dispatch to transformers' `AttentionInterface`: `blocked_attention` (eager attention with the
  blocks added) is registered there and switched on while `interface_attention_blocks` is active; it can also
  run a suffix of the positions against a shared prefix of keys/values (`SuffixRun`), and record each layer's
  keys/values (`KeyValueRecord`), which the fast knockout engine uses;
- BERT-style attention modules (`attention_mask` an additive mask of their own forward): a forward pre-hook
  adds −inf at the blocked edges to the mask they are given (`bert_attention_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from notice.adapters.attention_taps import attention_switched, eager_scores, layers_of

BLOCKED_ATTENTION = "notice_blocked"


@dataclass
class SuffixRun:
    """Queries and keys of positions `start`..T-1 only: they also attend to the shared keys/values of positions
    < start ([1, H_kv, ≥start, d] per layer), under the layer's mask `allowed[layer]` (bool [T, T], True where
    query q may attend to key k)."""

    start: int
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    allowed: Sequence[torch.Tensor]


@dataclass
class KeyValueRecord:
    """Filled by a run: each layer's keys/values [B, H_kv, T, d] as its attention computed them (after RoPE)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Active:
    layers: dict[int, int]  # id of a blocked module -> its layer
    blocks: Mapping[int, torch.Tensor]  # layer -> bool [B | 1, Tq, Tk]
    suffix: SuffixRun | None
    record: KeyValueRecord | None


_active: list[_Active] = []


def padded_block(block: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """`block` [B, ≤queries, ≤keys] padded with False to [B, queries, keys]."""
    if block.shape[-2] > queries or block.shape[-1] > keys:
        raise ValueError(f"a block of {tuple(block.shape[-2:])} edges for attention of {queries} queries × {keys} keys")
    return torch.nn.functional.pad(block, (0, keys - block.shape[-1], 0, queries - block.shape[-2]), value=False)


def blocked_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (grouped keys/values, soft-cap, mask) with the active blocks of `module`'s
    layer: their scores are −inf before the softmax, so the remaining keys renormalise."""
    if not _active:
        raise RuntimeError(f"{BLOCKED_ATTENTION} attention runs only while attention blocks are active")
    state = next((s for s in reversed(_active) if id(module) in s.layers), _active[-1])
    layer = state.layers.get(id(module))
    if layer is not None and state.record is not None:
        state.record.keys[layer], state.record.values[layer] = key, value
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    block = state.blocks.get(layer) if layer is not None else None
    if state.suffix is not None and layer is not None:
        return _suffix_attention(query, key, value, state.suffix, layer, block, scale, softcap)
    scores, values = eager_scores(query, key, value, attention_mask, scale, softcap)
    if block is not None:
        scores = scores.masked_fill(padded_block(block, *scores.shape[-2:])[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values)
    return out.transpose(1, 2).contiguous(), probs


def _suffix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    suffix: SuffixRun,
    layer: int,
    block: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`blocked_attention` of the positions start..T-1 (query [B, H, S, d], key/value [B, H_kv, S, d]) over the
    shared prefix and their own keys. Rows and the query heads of a key/value head are stacked into one matrix
    against the prefix ([H_kv, start, d]), so the prefix is never copied per row (as the patching engine's
    `shared_prefix_attention` does)."""
    B, H, S, d = query.shape
    n_kv, start = key.shape[1], suffix.start
    n_rep = H // n_kv
    grouped = query.reshape(B, n_kv, n_rep * S, d)  # query head h = kv · n_rep + r reads key/value head kv
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    if start:
        prefix_k = suffix.keys[layer][0, :, :start]
        stacked = grouped.transpose(0, 1).reshape(n_kv, B * n_rep * S, d)
        prefix = torch.matmul(stacked, prefix_k.transpose(-1, -2)).view(n_kv, B, n_rep * S, start).transpose(0, 1)
        scores = torch.cat([prefix, scores], dim=-1)
    scores = scores.view(B, H, S, start + S) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = suffix.allowed[layer][start:, : start + S]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if block is not None:
        scores = scores.masked_fill(padded_block(block[:, start:], S, start + S)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    grouped_probs = probs.view(B, n_kv, n_rep * S, start + S)
    out = torch.matmul(grouped_probs[..., start:], value)
    if start:
        stacked = grouped_probs[..., :start].transpose(0, 1).reshape(n_kv, B * n_rep * S, start)
        prefix_v = suffix.values[layer][0, :, :start]
        out = out + torch.matmul(stacked, prefix_v).view(n_kv, B, n_rep * S, d).transpose(0, 1)
    return out.reshape(B, H, S, d).transpose(1, 2).contiguous(), probs


AttentionInterface.register(BLOCKED_ATTENTION, blocked_attention)
# The model builds its masks for the attention it dispatches to: eager's, materialised.
AttentionMaskInterface.register(BLOCKED_ATTENTION, eager_mask)


@contextmanager
def interface_attention_blocks(
    modules: Sequence[torch.nn.Module] | Mapping[int, torch.nn.Module],
    blocks: Mapping[int, torch.Tensor],
    suffix: SuffixRun | None = None,
    record: KeyValueRecord | None = None,
) -> Iterator[None]:
    """Blocks on attention modules that dispatch to transformers' attention interface: module i is layer i (or
    layer -> module); `blocks[i]` its blocked edges (a layer without an entry runs unblocked). Nested, each module
    takes the blocks of the innermost context that names it (a stream's self- and cross-attention blocked
    together)."""
    _active.append(_Active(layers_of(modules), blocks, suffix, record))
    try:
        with attention_switched(modules.values() if isinstance(modules, Mapping) else modules, BLOCKED_ATTENTION):
            yield
    finally:
        _active.pop()


@contextmanager
def bert_attention_blocks(modules: Sequence[torch.nn.Module], blocks: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Blocks on BERT-style attention modules (additive `attention_mask`, or `encoder_attention_mask` for a
    cross-attention, which is then the only mask it applies): module i is layer i."""
    with ExitStack() as stack:
        for layer, block in blocks.items():

            def add_block(_module, args, kwargs, block=block):
                states = kwargs.get("encoder_hidden_states")
                cross = states is not None
                name = "encoder_attention_mask" if cross else "attention_mask"
                hidden = args[0] if args else kwargs["hidden_states"]
                keys = (states if cross else hidden).shape[1]
                additive = torch.zeros(
                    block.shape[0], 1, hidden.shape[1], keys, dtype=hidden.dtype, device=hidden.device
                )
                additive = additive.masked_fill(padded_block(block, hidden.shape[1], keys)[:, None], float("-inf"))
                mask = kwargs.get(name)
                return args, {**kwargs, name: additive if mask is None else mask + additive}

            handle = modules[layer].register_forward_pre_hook(add_block, with_kwargs=True)
            stack.callback(handle.remove)
        yield


@contextmanager
def together(*managers: AbstractContextManager[None]) -> Iterator[None]:
    """The context managers entered in order and left in reverse (a stream's self- and cross-attention blocks)."""
    with ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield
