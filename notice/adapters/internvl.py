"""InternVL (`InternVLForConditionalGeneration`, the transformers port of InternVL 2.5 / 3).

Written for `OpenGVLab/InternVL3-8B-hf`. The processor (GotOcr2's image processor, `crop_to_patches`)
resizes the image to the tile grid whose aspect ratio is closest to the image's (at most `max_patches`
tiles) and cuts it into tiles, row-major, followed by a thumbnail (the whole image squashed to one
tile) when there is more than one tile; pixel_values are [tiles (+ 1), C, tile, tile]. An InternViT
tower encodes every tile, its [CLS] is dropped, and the projector pixel-shuffles 2×2 neighbouring
patches into one token (row-major over the tile's halved grid) and projects them into the Qwen2
decoder. In the prompt the image is `<img>`, every view's `<IMG_CONTEXT>` tokens, `</img>`; the two
markers are text positions and are patched like the rest of the prompt. The prompt is the processor's
chat template. Gaussian noise is applied to the projector's output: exactly the tokens spliced into the
prompt, tiles and thumbnail.

The image grid that the head-function stage scores is the last view's tokens: the thumbnail of a tiled
image, the only tile otherwise; either covers the whole image. The prompt does not say how the tiles are
arranged (no row or column markers: a 2-tile image may be 1×2 or 2×1), so the tiles are left out, as
LLaVA-NeXT's are.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class InternVLAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = InternVLForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = None

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def _tokens_side(self) -> int:
        """Shuffled tokens per side of one view."""
        config = self.model.config
        vision = config.vision_config
        side = vision.image_size[0] // vision.patch_size[0]
        return int(side * config.downsample_ratio)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """The last view's tokens (the thumbnail, or the only tile), row-major on its side × side grid."""
        side = self._tokens_side
        keys = self.image_positions(inp)
        views = inp.pixel_values.shape[0]
        if len(keys) != views * side * side:
            raise ValueError(f"{self.family}: {len(keys)} image tokens for {views} views of {side}×{side} tokens")
        return ImageGrid(tuple(keys[-side * side :]), side, side)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The last view (pixel_values [views, C, H, W]): the whole image as one tile."""
        return self.pixels_view(inp.pixel_values[-1])

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        """The mask through the same tiling as the image, its last view as in `model_view`."""
        out = self.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
        return (out["pixel_values"][-1].float().mean(0) > 0.5).float().numpy()
