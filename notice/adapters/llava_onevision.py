"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): any-resolution tiles and a Qwen2 decoder.

Written for `llava-hf/llava-onevision-qwen2-7b-ov-hf` (and the 0.5b / 72b variants). As LLaVA-NeXT: the image is
seen as a base view (the whole image resized to the tower's square) plus the tiles of the best-fitting grid
pinpoint, each through the SigLIP tower (no [CLS]: every patch is a feature) and the projector; the tile features
are unpadded to the image's aspect ratio (and shrunk when they exceed `vision_aspect_ratio`'s tile budget) with an
`image_newline` embedding after every row. All of it sits at `<image>` token positions, base view first. The
processor passes `image_sizes` and `batch_num_images` (images per prompt: one image is tiled, several are not),
which the model's forward needs. The prompt is the processor's chat template. Gaussian noise is applied to the
projector's output (base view and tiles, before the newline embeddings are added).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class LlavaOnevisionAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = LlavaOnevisionForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = None

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """The base view: the first side² image tokens (the tiles and newlines follow)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        keys = self.image_positions(inp)
        if len(keys) < side * side:
            raise ValueError(f"{self.family}: {len(keys)} image tokens, fewer than the {side}×{side} base view")
        return ImageGrid(tuple(keys[: side * side]), side, side)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The base view (tile 0 of pixel_values [1, tiles, C, H, W])."""
        base = ModelInput(inp.input_ids, inp.attention_mask, inp.pixel_values[:, 0], inp.tokens)
        return super().model_view(base)

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        out = self.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
        return (out["pixel_values"][0, 0].float().mean(0) > 0.5).float().numpy()
