"""Fast exact patching for Llama 3.2 Vision: a decoder whose cross-attention layers read the image.

The decoder engine (notice.patching.fast_decoder) runs the self-attention layers. A cross-attention layer
computes each text position from that position's own input and the image keys/values alone (its queries
attend to the image, never to other text positions), so a patched row's suffix positions through it are
exact given the corrupt run's image keys/values (projected once by the model in the captured run and read
from its cache) and the corrupt run's `cross_attention_mask` and `full_text_row_masked_out_mask` sliced to
the suffix rows. Its attention is transformers' eager attention (the rows broadcast against the one copy of
the image keys/values); the tanh gates and the row mask are the model's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from notice.adapters.attention_taps import attention_switched
from notice.adapters.base import ModelInput, Patch, pre_hook_while_active
from notice.patching.fast_core import Run, main_output
from notice.patching.fast_decoder import DecoderFast, SharedPrefix
from notice.patching.hooks import ImageFn


class MllamaFast(DecoderFast):
    stages: ClassVar[tuple[str, ...]] = ("self_attn", "cross_attn", "mlp", "layer")

    @property
    def cross_attention_layers(self) -> list[int]:
        return [int(layer) for layer in self.adapter.text_config.cross_attention_layers]

    def _capture(self, run: Run, inp: ModelInput, image_fn: ImageFn | None) -> torch.Tensor:
        """The decoder engine's capture, also recording the masks the cross-attention layers were given."""
        seen: dict[str, Any] = {}

        def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            seen.update(mask=kwargs["cross_attention_mask"], rows=kwargs["full_text_row_masked_out_mask"])
            return args, kwargs

        with pre_hook_while_active(self.layers[self.cross_attention_layers[0]], record):
            logits = super()._capture(run, inp, image_fn)
        # [1, 1, T, K] additive and [1, 1, T, 1]; the same for every cross-attention layer.
        self.cross_attention_mask, self.text_row_mask = seen["mask"], seen["rows"]
        return logits

    def row_bytes(self, patch: Patch) -> int:
        keys = int(self.prefix.keys[self.cross_attention_layers[0]].shape[2])  # the image keys
        scores = 3 * self.adapter.n_heads * (self.seq_len - patch.position) * keys * 4  # float32 softmax
        return super().row_bytes(patch) + scores

    def run_layer(
        self,
        layer: int,
        h: torch.Tensor,
        entering: Sequence[Patch],
        first_row: int,
        cos_sin: tuple[torch.Tensor, ...] | None,
        prefix: SharedPrefix,
    ) -> torch.Tensor:
        if layer not in self.cross_attention_layers:
            return super().run_layer(layer, h, entering, first_row, cos_sin, prefix)
        block: Any = self.layers[layer]
        start = prefix.start
        # The text config is shared with the self-attention modules, switched to the shared-prefix attention.
        with self.clean_value_hooks(layer, entering, first_row, start), attention_switched([block.cross_attn], "eager"):
            output = block(
                h,
                cross_attention_states=None,  # the keys/values are read from the captured run's cache
                cross_attention_mask=self.cross_attention_mask[:, :, start:],
                attention_mask=None,
                full_text_row_masked_out_mask=self.text_row_mask[:, :, start:],
                past_key_values=self.cache,
            )
        return main_output(output)
