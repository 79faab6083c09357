"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP ViT → projector → image tokens spliced into a Llama prompt.

Written for `llava-hf/llava-1.5-7b-hf` (and -13b). The prompt is the paper's, not the processor's
chat template: the paper's results were measured with it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import LlavaForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class LlavaAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = LlavaForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = "USER: <image>\n{question} Answer with one word. ASSISTANT:"

    def image_embedding_module(self) -> torch.nn.Module:
        # The projector's output is exactly what is spliced into the image-token positions.
        return self.model.model.multi_modal_projector

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        keys = self.image_positions(inp)
        # The "full" feature strategy keeps CLIP's [CLS] as the first image token.
        keys = keys[1:] if len(keys) == side * side + 1 else keys
        if len(keys) != side * side:
            raise ValueError(f"llava: {len(keys)} image tokens for a {side}×{side} patch grid")
        return ImageGrid(tuple(keys), side, side)
