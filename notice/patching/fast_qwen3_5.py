"""Fast exact patching for Qwen3.5's hybrid language model: the decoder engine plus recurrent states.

Full-attention layers run as in `DecoderFast`: a chunk of rows with smallest patched position s recomputes
positions s..T-1 against the corrupt run's cached keys/values before s. A linear-attention layer (gated delta
rule after a causal convolution of width 4) reads every earlier position through its recurrent state and
convolution window instead, so a row must start it from the corrupt run's states before the positions it
recomputes; a row started from zero (or the clean run's) states is wrong from there on.

The model's delta rule runs in chunks of `DELTA_RULE_CHUNK` positions counted from position 0, and its
numerics depend on where a chunk starts. So a linear-attention layer recomputes from c, the chunk boundary at
or before s: its input at positions c..s-1 is the corrupt run's (a patch at s or later cannot change it), its
recurrent state and convolution window are the corrupt run's after positions 0..c-1 (computed once per
boundary by the layer's own mixer on the corrupt run's layer input), and it goes through the model's own
`linear_attn` forward with a cache holding those states, which continues the chunked rule and the
convolution from them exactly as the full forward goes on past c. The outputs at c..s-1 are the corrupt
run's and are dropped. For c = 0 the layer runs from the start, as the full forward does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from notice.adapters.base import ModelInput, Patch
from notice.adapters.qwen3_5 import Qwen35Adapter
from notice.patching.fast_core import main_output
from notice.patching.fast_decoder import DecoderFast, SharedPrefix
from notice.patching.hooks import ImageFn

# transformers' `torch_chunk_gated_delta_rule` default, which the model's linear attention uses (the
# flash-linear-attention kernel's chunk is 64 as well).
DELTA_RULE_CHUNK = 64


class RowStates:
    """The cache calls `linear_attn` makes, answered with one linear-attention layer's states for every row:
    the convolution window [n, C, k] and the recurrent state [n, H, d_k, d_v] the rows continue from."""

    def __init__(self, conv: torch.Tensor, recurrent: torch.Tensor, rows: int):
        self.conv = conv.expand(rows, *conv.shape[1:])
        self.recurrent = recurrent.expand(rows, *recurrent.shape[1:])

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.recurrent

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # never the single-token decode step, which updates the window in place

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, **kwargs: Any) -> torch.Tensor:
        return torch.cat([self.conv.to(conv_states.dtype), conv_states], dim=-1)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, **kwargs: Any) -> torch.Tensor:
        return recurrent_states


class Qwen35Fast(DecoderFast):
    adapter: Qwen35Adapter

    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        super().capture_runs(clean_inp, corrupt_inp, image_fn)
        self.linear_layers = set(self.adapter.linear_attention_layers)
        self.states: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # boundary -> layer -> states

    def state_start(self, start: int) -> int:
        """The delta rule's chunk boundary at or before `start` where linear-attention layers resume; never the
        last position alone (one position would take the model's single-step recurrent rule)."""
        boundary = start - start % DELTA_RULE_CHUNK
        return boundary - DELTA_RULE_CHUNK if boundary and boundary == self.seq_len - 1 else boundary

    def states_at(self, boundary: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per linear-attention layer, its (convolution window, recurrent state) after the corrupt run's positions
        0..boundary-1: the layer's own mixer on the corrupt run's layer input, with a cache to keep them."""
        if boundary not in self.states:
            cache = DynamicCache(config=self.adapter.model.config)
            for layer in sorted(self.linear_layers):
                block: Any = self.layers[layer]  # a Qwen3.5 decoder layer: submodules by name
                normed = block.input_layernorm(self.resid[layer][None, :boundary])
                block.linear_attn(normed, cache_params=cache)
            cached: list[Any] = cache.layers  # linear-attention cache layers at these indices
            self.states[boundary] = {
                layer: (cached[layer].conv_states[0], cached[layer].recurrent_states[0]) for layer in self.linear_layers
            }
        return self.states[boundary]

    def row_bytes(self, patch: Patch) -> int:
        extra = patch.position - self.state_start(patch.position)  # positions linear layers recompute as well
        return super().row_bytes(patch) * (self.seq_len - patch.position + extra) // (self.seq_len - patch.position)

    def run_layer(
        self,
        layer: int,
        h: torch.Tensor,
        entering: Sequence[Patch],
        first_row: int,
        cos_sin: tuple[torch.Tensor, ...] | None,
        prefix: SharedPrefix,
    ) -> torch.Tensor:
        if layer not in self.linear_layers:
            return super().run_layer(layer, h, entering, first_row, cos_sin, prefix)
        start = prefix.start
        boundary = self.state_start(start)
        rows = h.shape[0]
        if boundary < start:
            h = torch.cat([self.resid[layer][boundary:start].expand(rows, -1, -1), h], dim=1)
        states = None
        if boundary:
            conv, recurrent = self.states_at(boundary)[layer]
            states = RowStates(conv, recurrent, rows)
        with self.clean_value_hooks(layer, entering, first_row, boundary):
            # Linear attention reads no position embeddings; the layer's signature takes them.
            out = main_output(self.layers[layer](h, position_embeddings=cos_sin, past_key_values=states))
        return out[:, start - boundary :]
