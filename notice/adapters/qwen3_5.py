"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`).

Written for `Qwen/Qwen3.5-27B` (the checkpoint transformers' config documents; the other Qwen3.5 sizes share
the layout) and, as `qwen3_5_moe`, `Qwen/Qwen3.5-35B-A3B` (MoE MLPs). The vision side is Qwen3-VL's tower
without DeepStack (16-pixel patches at the image's own resolution, learned position embeddings resampled to
the grid, a merger joining 2×2 patches into one `<|image_pad|>` token between `<|vision_start|>` and
`<|vision_end|>`; the merged tokens are spliced into the prompt and reach the language model only there). The
language model is hybrid: its `layer_types` alternate linear-attention layers (a gated delta rule with a short
causal convolution, `linear_attn`, whose recurrent and convolution states carry every earlier position) and
full-attention layers (gated grouped-query attention, `self_attn`, with interleaved multimodal RoPE on part of
each head). Sites: `mlp` in every layer, `self_attn` and its heads in the full-attention layers only
(`layer_sites`); a linear-attention layer mixes positions through its recurrent state, so it has no heads and
no attention edges to read or block.

The prompt is the processor's chat template with the generation prompt's thinking block closed
(`enable_thinking=False`, the real template's non-thinking answer prompt), so the first generated token is
the answer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, cast

import torch
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from notice.adapters.attention_taps import AttentionTap, interface_attention_taps
from notice.adapters.base import HEAD_SITE_PARENT
from notice.adapters.qwen2_vl import QwenVLAdapter

FULL_ATTENTION = "full_attention"


class Qwen35Adapter(QwenVLAdapter):
    model_class: ClassVar[type] = Qwen3_5ForConditionalGeneration
    # Knockout runs through `attention_blocks` (refused below) on either knockout engine, not the suffix engine.
    knockout_engine: ClassVar[Literal["suffix", "batched"]] = "batched"

    def rendered_chat_template(self) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
        return self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False, enable_thinking=False
        )

    # -- the two kinds of layer ----------------------------------------------------------------
    @property
    def full_attention_layers(self) -> list[int]:
        """The layers with (softmax) self-attention; the others are linear attention."""
        return [i for i, kind in enumerate(self.text_config.layer_types) if kind == FULL_ATTENTION]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.text_config.layer_types) if kind != FULL_ATTENTION]

    def layer_sites(self, layer: int) -> tuple[str, ...]:
        return self.module_sites if layer in self.full_attention_layers else ("mlp",)

    @property
    def head_dim(self) -> int:
        attention: Any = self.layers[self.full_attention_layers[0]].self_attn
        return int(attention.head_dim)

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        if HEAD_SITE_PARENT.get(site, site) == "self_attn" and layer not in self.full_attention_layers:
            raise ValueError(
                f"{self.family}: layer {layer} is a linear-attention layer (no self-attention heads); "
                f"self_attn sites are in layers {self.full_attention_layers}"
            )
        return super().site_module(site, layer)

    @property
    def self_attentions(self) -> list[torch.nn.Module]:
        """The full-attention layers' self-attention modules, in layer order (not one per layer)."""
        return [cast(torch.nn.Module, self.layers[i].self_attn) for i in self.full_attention_layers]

    # -- stages that read attention per layer --------------------------------------------------
    # The attention stage (patterns, head functions) and the screen's query/key taps read the heads where they
    # are: the full-attention layers (`fusion_layers`). Knockout is refused: a block in those layers alone would
    # leave every linear-attention layer carrying the blocked information on.
    def fusion_layers(self) -> list[int]:
        return self.full_attention_layers

    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        return self.self_attentions

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        return interface_attention_taps(dict(zip(self.full_attention_layers, self.self_attentions)), tap)

    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        raise NotImplementedError(
            f"{self.family}: attention knockout needs every layer's attention to block an edge, but layers "
            f"{self.linear_attention_layers} are linear attention (a gated delta rule: positions mix through a "
            "recurrent state, there is no query-key edge to block)"
        )


class Qwen35MoeAdapter(Qwen35Adapter):
    """Qwen3.5-MoE (`Qwen/Qwen3.5-35B-A3B`): the same layers, each MLP a mixture of experts (top-k routed per
    position, plus a gated shared expert): the `mlp` site is the mixture's output."""

    model_class: ClassVar[type] = Qwen3_5MoeForConditionalGeneration
