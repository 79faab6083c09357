"""Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

Written for `Qwen/Qwen3-VL-8B-Instruct` (MoE: `Qwen/Qwen3-VL-30B-A3B-Instruct`). The image enters as Qwen2-VL's
does (patches of 16 px, `image_grid_thw`, 2×2 patches merged into one `<|image_pad|>` token between
`<|vision_start|>` and `<|vision_end|>`; interleaved multimodal RoPE from the model's own `get_rope_index`, whose
position embeddings the decoder layers receive and the fast engine reuses), and a second time by DeepStack: the
tower's features at a few of its layers (8, 16 and 24 of 27), merged the same way, are added to the decoder's
residual stream at the image positions after each of its first layers (one layer per tap). The fast engines add
them as the model does (`residual_additions_recorded`). Gaussian noise is applied to the merger's output: the
tokens spliced into the prompt; the DeepStack features are the image's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from notice.adapters.base import pre_hook_while_active
from notice.adapters.decoder import ResidualAddition
from notice.adapters.qwen2_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    model_class: ClassVar[type] = Qwen3VLForConditionalGeneration

    @contextmanager
    def residual_additions_recorded(self, additions: list[ResidualAddition]) -> Iterator[None]:
        """DeepStack: feature k [N, D] is added at the image positions after decoder layer k (the language model's
        `deepstack_visual_embeds` and `visual_pos_masks`)."""

        def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            features = kwargs.get("deepstack_visual_embeds")
            if features is not None:
                mask = kwargs["visual_pos_masks"]
                if mask.shape[0] != 1:
                    raise ValueError(f"{self.family}: DeepStack additions are recorded for one prompt, not {len(mask)}")
                positions = torch.nonzero(mask[0]).flatten()
                additions.extend(ResidualAddition(layer, positions, x.detach()) for layer, x in enumerate(features))
            return args, kwargs

        with pre_hook_while_active(self.language_model, pre_hook):
            yield

    def residual_norms(self, layer: int) -> None:
        return None  # DeepStack adds image features to the stream between layers: not the plain residual sum

    def circuit_input_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The image: the merger's output and DeepStack's features (added to the stream after the first layers)."""
        visual: Any = self.model.model.visual  # the vision model: submodules by name
        return {**super().circuit_input_modules(), "image": [visual.merger, *visual.deepstack_merger_list]}


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_class: ClassVar[type] = Qwen3VLMoeForConditionalGeneration
