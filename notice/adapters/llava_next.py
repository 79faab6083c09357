"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "LLaVA-1.6"): any-resolution tiles.

Written for `llava-hf/llava-v1.6-mistral-7b-hf` (and the vicuna / 34b variants). The image is seen as
a base view (the whole image resized to the tower's square) plus the tiles of the best-fitting grid
pinpoint, each through CLIP and the projector; the tile features are unpadded to the image's aspect
ratio with an `image_newline` embedding after every row. All of it sits at `<image>` token positions
(their count depends on the image size: the processor passes `image_sizes`). The prompt is the
processor's chat template. Gaussian noise is applied to the projector's output (base view and tiles,
before the newline embeddings are added).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class LlavaNextAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = LlavaNextForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = None

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """The base view: the first side² image tokens (the tiles and newlines follow)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        keys = self.image_positions(inp)[self.leading_image_tokens() :]
        if len(keys) < side * side:
            raise ValueError(f"{self.family}: {len(keys)} image tokens, fewer than the {side}×{side} base view")
        return ImageGrid(tuple(keys[: side * side]), side, side)

    def leading_image_tokens(self) -> int:
        """Image tokens before the base view's patches: CLIP's [CLS] when the model keeps every feature."""
        return 1 if self.model.config.vision_feature_select_strategy == "full" else 0

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The base view (tile 0 of pixel_values [1, tiles, C, H, W])."""
        base = ModelInput(inp.input_ids, inp.attention_mask, inp.pixel_values[:, 0], inp.tokens)
        return super().model_view(base)

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        out = self.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
        return (out["pixel_values"][0, 0].float().mean(0) > 0.5).float().numpy()
