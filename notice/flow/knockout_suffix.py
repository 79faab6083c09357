"""The fast knockout engine of decoder families ("suffix"): knocked-out runs as rows of one batched forward.

Blocking edges whose queries are at positions ≥ q leaves every position that cannot reach them through the
layers' masks unchanged: under causal attention, every position before q; under prefix-LM attention, those the
closure of the masks from the window's first layer on does not reach. So a row enters at its window's first
layer from the clean run's residual stream and recomputes only the positions from the chunk's first changed one
(`start`) on, with the model's own decoder layers (projections, RoPE, norms, MLPs); its attention is
`blocked_attention` over the clean run's keys/values of positions < start (held once for every row) and its own
keys/values, under the mask the model built for the layer (sliding windows and prefix-LM kept) and the row's
blocks in its window's layers; what the model adds between layers (DeepStack) is the clean run's, added as the
model adds it. Positions before a row's own first changed position keep the clean values
bit-identical. The score is the next-token logits at the last position, through the adapter's score head.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, cast

import torch

from notice.adapters.attention_blocks import KeyValueRecord, SuffixRun, interface_attention_blocks
from notice.adapters.base import ModelInput
from notice.adapters.decoder import DecoderVLMAdapter, ResidualAddition, residual_added
from notice.patching.fast_core import main_output, rows_by_index
from notice.patching.fast_decoder import allowed_keys, layer_inputs_recorded


@dataclass(frozen=True)
class Knockout:
    """One knocked-out run: edges blocked in layers layer_start..layer_start+window-1. `own` bool [T, T] (the
    stream's self-attention, query × key over its positions), `fusion` bool [T, K] (the cross-attention's image
    keys; None for token fusion, whose image keys are positions)."""

    layer_start: int
    window: int
    own: torch.Tensor
    fusion: torch.Tensor | None = None

    def in_window(self, layer: int) -> bool:
        return self.layer_start <= layer < self.layer_start + self.window

    @property
    def empty(self) -> bool:
        """True when nothing is blocked."""
        return not bool(self.own.any()) and (self.fusion is None or not bool(self.fusion.any()))


class SuffixKnockout:
    """The clean run of one sample, cached for its knocked-out rows."""

    def __init__(self, adapter: DecoderVLMAdapter, inp: ModelInput):
        if not bool(inp.attention_mask.all()):
            raise ValueError("the fast knockout engine takes unpadded prompts (attention mask all ones)")
        self.adapter = adapter
        self.layers = adapter.layers
        self.seq_len = inp.input_ids.shape[1]
        n = len(self.layers)
        resid: list[torch.Tensor | None] = [None] * (n + 1)
        masks: list[Any] = [None] * n
        embeddings: list[Any] = [None] * n

        def last_output(_module, _args, output):
            resid[n] = main_output(output)[0].detach()

        record = KeyValueRecord()
        additions: list[ResidualAddition] = []
        with ExitStack() as stack, torch.no_grad():
            stack.enter_context(layer_inputs_recorded(self.layers, resid, masks, embeddings))
            stack.enter_context(adapter.residual_additions_recorded(additions))
            handle = self.layers[n - 1].register_forward_hook(last_output)
            stack.callback(handle.remove)
            stack.enter_context(interface_attention_blocks(adapter.self_attentions, {}, record=record))
            # The base run: the adapter's own scoring of this forward (`answer_logits`).
            self.base_logits = adapter.answer_logits_of(lambda: adapter.forward(inp).logits[0, -1])
        self.additions = {addition.layer: addition for addition in additions}
        resid[n] = residual_added(self.additions, n - 1, cast(torch.Tensor, resid[n])[None])[0]
        self.resid = cast(list[torch.Tensor], resid)
        self.allowed = [allowed_keys(mask) for mask in masks]
        self.position_embeddings = embeddings  # per layer
        self.keys = [record.keys[layer] for layer in range(n)]
        self.values = [record.values[layer] for layer in range(n)]

    def first_changed(self, knockout: Knockout) -> int:
        """The first position whose states the knockout can change: the closure, through the masks of the
        layers from its window on, of the positions from its first blocked query on."""
        queries = torch.nonzero(knockout.own.any(-1)).flatten()
        changed = torch.arange(self.seq_len, device=queries.device) >= int(queries.min())
        for layer in range(knockout.layer_start, len(self.layers) - 1):
            changed = changed | (self.allowed[layer].float() @ changed.float() > 0)
        return int(torch.nonzero(changed).flatten().min())

    @torch.no_grad()
    def run_rows(self, knockouts: Sequence[Knockout]) -> torch.Tensor:
        """Answer logits [n, V] (float32) of token-fusion knockouts that each block at least one edge, one batched
        run."""
        firsts = [self.first_changed(k) for k in knockouts]
        start = min(firsts)
        device = self.adapter.device
        h: torch.Tensor | None = None
        order: list[int] = []
        for layer in range(min(k.layer_start for k in knockouts), len(self.layers)):
            entering = [i for i, k in enumerate(knockouts) if k.layer_start == layer]
            if entering:
                new = self.resid[layer][start:].expand(len(entering), -1, -1)
                h = new if h is None else torch.cat([h, new])
                order += entering
            assert h is not None
            rows = [knockouts[i] for i in order]
            blocks = {}
            if any(k.in_window(layer) for k in rows):
                blocks[layer] = torch.stack([k.own if k.in_window(layer) else torch.zeros_like(k.own) for k in rows])
            suffix = SuffixRun(start, self.keys, self.values, self.allowed)
            embeddings = self.position_embeddings[layer]
            cos_sin = None if embeddings is None else tuple(x[..., start:, :] for x in embeddings)
            with interface_attention_blocks(self.adapter.self_attentions, blocks, suffix=suffix):
                h = main_output(self.layers[layer](h, attention_mask=None, position_embeddings=cos_sin))
            h = residual_added(self.additions, layer, h, start)  # the clean run's (DeepStack); most families: none
            positions = torch.arange(start, self.seq_len, device=device)[None]
            frozen = positions < torch.tensor([firsts[i] for i in order], device=device)[:, None]
            h = torch.where(frozen[..., None], self.resid[layer + 1][start:], h)
        assert h is not None, "no knockout at a layer of the model"
        return self.adapter.final_logits(h[:, -1])[rows_by_index(order, h.device)]
