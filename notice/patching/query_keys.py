"""Exact patching of the fusion attention's queries and keys, through the adapters' attention taps.

A query site is one head's query at one position, a key site one key/value head's key at one key position
(for cross-attention: an image token), both after position encoding, as the attention reads them. No
module's input or output holds them, so the hook engines cannot patch them: here each patched run is one
forward of the corrupt input in which the tap gives that query (key) its clean value. `get_engine` routes
query and key sites here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.patching.hooks import ImageFn, image_embeddings_replaced
from notice.patching.scores import result_row, scores


def qk_sites(adapter: VLMAdapter) -> tuple[str, str]:
    """The fusion attention's query and key sites, e.g. ("self_attn_query", "self_attn_key"): per head (a key
    site: per key/value head) and per position (a key site: per key, i.e. image token for cross-attention)."""
    parent = HEAD_SITE_PARENT[adapter.head_site]
    return f"{parent}_query", f"{parent}_key"


def has_attention_taps(adapter: VLMAdapter) -> bool:
    return type(adapter).attention_taps is not VLMAdapter.attention_taps


class AttentionRecord:
    """An AttentionTap that keeps each layer's queries [H, T, d], keys [H_kv, K, d], probabilities [H, T, K]
    and score settings; with `leaves`, it adds a zero leaf to each so their gradients can be read."""

    def __init__(self, leaves: bool):
        self.leaves = leaves
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}
        self.leaf: dict[tuple[str, int], torch.Tensor] = {}
        self.settings: dict[int, tuple[float, torch.Tensor | None, float | None]] = {}

    def _keep(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.tensors[(kind, layer)] = x[0].detach()
        if not self.leaves:
            return x
        self.leaf[(kind, layer)] = torch.zeros_like(x, requires_grad=True)
        return x + self.leaf[(kind, layer)]

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        return self._keep("q", layer, query)

    def key(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        return self._keep("k", layer, key)

    def probs(
        self, layer: int, probs: torch.Tensor, scaling: float, mask: torch.Tensor | None, softcap: float | None
    ) -> torch.Tensor:
        self.settings[layer] = (scaling, mask, softcap)
        return self._keep("p", layer, probs)


class _QueryKeyOverwrite:
    """An AttentionTap that gives one head's query or key at one position its clean value."""

    def __init__(self, clean: AttentionRecord, patch: Patch, kind: str):
        self.clean, self.patch, self.kind = clean, patch, kind

    def _set(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if kind != self.kind or layer != self.patch.layer:
            return x
        x = x.clone()
        x[0, self.patch.head, self.patch.position] = self.clean.tensors[(kind, layer)][
            self.patch.head, self.patch.position
        ]
        return x

    def query(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        return self._set("q", layer, query)

    def key(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        return self._set("k", layer, key)

    def probs(
        self, layer: int, probs: torch.Tensor, scaling: float, mask: torch.Tensor | None, softcap: float | None
    ) -> torch.Tensor:
        return probs


@torch.no_grad()
def patch_queries_keys(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
) -> list[dict]:
    """Exact patching of query / key sites (`qk_sites`), one result row (scores.ROW_COLUMNS) per patch: one
    forward of the corrupt input per patch, in which the attention tap gives that head's query (key) at
    that position its clean value (after position encoding, as the attention reads it)."""
    query_site, key_site = qk_sites(adapter)
    clean = AttentionRecord(False)
    with adapter.attention_taps(clean):
        clean_scores = scores(adapter.answer_logits(clean_inp), tau, tau_p)
    with image_embeddings_replaced(adapter, corrupt_image_fn):
        corrupt_scores = scores(adapter.answer_logits(corrupt_inp), tau, tau_p)
    rows = []
    for patch in patches:
        if patch.site not in (query_site, key_site):
            raise ValueError(f"{patch}: not a query or key site of {adapter.family} ({query_site}, {key_site})")
        kind = "q" if patch.site == query_site else "k"
        if (kind, patch.layer) not in clean.tensors:
            layers = adapter.fusion_layers()
            raise ValueError(f"{patch}: layer {patch.layer} has no fusion attention (the layers that have: {layers})")
        heads, positions = clean.tensors[(kind, patch.layer)].shape[:2]
        if not (0 <= patch.head < heads and 0 <= patch.position < positions):
            raise ValueError(f"{patch}: head must be in [0, {heads}) and position in [0, {positions})")
        with (
            image_embeddings_replaced(adapter, corrupt_image_fn),
            adapter.attention_taps(_QueryKeyOverwrite(clean, patch, kind)),
        ):
            patched = scores(adapter.answer_logits(corrupt_inp), tau, tau_p)
        token = f"<image row {patch.position}>" if patch.site == "cross_attn_key" else clean_inp.tokens[patch.position]
        rows.append(
            result_row(
                patch.site, patch.layer, patch.head, patch.position, token, clean_scores, corrupt_scores, patched
            )
        )
    return rows
