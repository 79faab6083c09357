"""Taps inside the fusion attention: its queries, keys and probabilities, as the attention computes them.

The attribution screen's AtP* query/key fix (notice.patching.attribution) recomputes attention softmaxes
with one query or key swapped, so it needs each fusion-attention layer's queries and keys after any
position encoding, its score scaling, mask and soft-cap, and the gradient of the answer with respect to
its probabilities. An `AttentionTap` receives them and may return modified tensors (a zero leaf added,
to read a gradient). Two ways in, by how the family computes attention:

- modules that dispatch to transformers' `AttentionInterface` (decoder language models, the Q-Former):
  `tapped_attention` is registered there and switched on while the tap is active
  (`interface_attention_taps`); modules sharing their config but not tapped run plain eager attention;
- BERT-style attention modules that compute it in their own forward (a text encoder's cross-attention):
  forward hooks on their `query` / `key` projections and a pre-hook on the `dropout` the probabilities go
  through (`bert_attention_taps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

TAPPED_ATTENTION = "notice_tapped"


class AttentionTap(Protocol):
    """What one forward's fusion attention reports; shapes are [B, heads, positions, head_dim] / [B, H, T, K]."""

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor: ...

    def key(self, layer: int, key: torch.Tensor) -> torch.Tensor: ...

    def probs(
        self, layer: int, probs: torch.Tensor, scaling: float, mask: torch.Tensor | None, softcap: float | None
    ) -> torch.Tensor:
        """`mask` is additive [T, K] (None: every key visible); the scores were
        softcap·tanh(q·k·scaling / softcap) (no soft-cap: q·k·scaling), plus the mask."""
        ...


_active: list[tuple[AttentionTap, dict[int, int]]] = []  # (tap, id of a tapped module -> its layer)


def additive_mask(mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """A layer's materialised mask ([B, 1, T, ≥K], bool or additive) as additive float32 [T, K]."""
    if mask is None:
        return None
    mask = mask[0, 0, :, :keys]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float().masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))


def eager_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention up to the softmax: (scores [B, H, T, K] — q·k·scale, soft-capped, plus the
    mask — and the values per query head [B, H, K, d]); query head h reads key/value head h // n_rep (repeat_kv)."""
    n_rep = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(n_rep, dim=1)
    values = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : keys.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return scores, values


def tapped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (grouped keys/values, soft-cap, mask), reporting to the active tap
    when `module` is one of its layers."""
    if not _active:
        raise RuntimeError(f"{TAPPED_ATTENTION} attention runs only while an attention tap is active")
    tap, layers = _active[-1]
    layer = layers.get(id(module))
    if layer is not None:
        query, key = tap.query(layer, query), tap.key(layer, key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    scores, values = eager_scores(query, key, value, attention_mask, scale, softcap)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if layer is not None:
        probs = tap.probs(layer, probs, scale, additive_mask(attention_mask, values.shape[-2]), softcap)
    out = torch.matmul(probs, values)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(TAPPED_ATTENTION, tapped_attention)
# The model builds its masks for the attention it dispatches to: eager's, materialised (an unknown name would
# get sdpa's, which may be None for a plain causal mask).
AttentionMaskInterface.register(TAPPED_ATTENTION, eager_mask)


@contextmanager
def attention_switched(modules: Iterable[torch.nn.Module], name: str) -> Iterator[None]:
    """While active, the attention modules (and every module sharing their configs) dispatch to the
    registered attention `name`."""
    attentions: list[Any] = list(modules)  # a family's attention modules: fields by name
    configs = list({id(attention.config): attention.config for attention in attentions}.values())
    saved = [config._attn_implementation_internal for config in configs]
    for config in configs:
        config._attn_implementation_internal = name
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config._attn_implementation_internal = value


def layers_of(modules: Sequence[torch.nn.Module] | Mapping[int, torch.nn.Module]) -> dict[int, int]:
    """id of each attention module -> its layer: module i is layer i, or the layer a mapping gives it (a family
    whose fusion attention is in some layers only)."""
    by_layer = modules if isinstance(modules, Mapping) else dict(enumerate(modules))
    return {id(module): layer for layer, module in by_layer.items()}


@contextmanager
def interface_attention_taps(
    modules: Sequence[torch.nn.Module] | Mapping[int, torch.nn.Module], tap: AttentionTap
) -> Iterator[None]:
    """Taps on attention modules that dispatch to transformers' attention interface: module i is layer i (or
    layer -> module)."""
    _active.append((tap, layers_of(modules)))
    try:
        with attention_switched(modules.values() if isinstance(modules, Mapping) else modules, TAPPED_ATTENTION):
            yield
    finally:
        _active.pop()


@contextmanager
def bert_attention_taps(modules: Sequence[torch.nn.Module], tap: AttentionTap) -> Iterator[None]:
    """Taps on BERT-style attention modules (`query`, `key`, `dropout` submodules; scores q·k/√d): module i
    is layer i. Cross-attention to image embeddings: every key is visible (no mask)."""

    def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n_heads, -1).transpose(1, 2)

    def merged(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    with ExitStack() as stack:
        for layer, module in enumerate(modules):
            attention: Any = module  # a BERT-style attention module: fields by name
            n, d = int(attention.num_attention_heads), int(attention.attention_head_size)

            def on_query(_m, _a, out, layer=layer, n=n):
                return merged(tap.query(layer, heads(out, n)))

            def on_key(_m, _a, out, layer=layer, n=n):
                return merged(tap.key(layer, heads(out, n)))

            def on_probs(_m, args, layer=layer, d=d):
                return (tap.probs(layer, args[0], d**-0.5, None, None),)

            stack.enter_context(_hook(attention.query.register_forward_hook(on_query)))
            stack.enter_context(_hook(attention.key.register_forward_hook(on_key)))
            stack.enter_context(_hook(attention.dropout.register_forward_pre_hook(on_probs)))
        yield


@contextmanager
def _hook(handle: Any) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()
