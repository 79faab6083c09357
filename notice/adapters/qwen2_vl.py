"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Written for `Qwen/Qwen2-VL-7B-Instruct` / `Qwen/Qwen2-VL-2B-Instruct` and `Qwen/Qwen2.5-VL-7B-Instruct`
/ `-3B-Instruct`. A ViT at the image's own resolution (patches of 14 px, `image_grid_thw` = (t, h, w)
in patches) whose merger joins 2×2 patches into one `<|image_pad|>` token between
`<|vision_start|>` and `<|vision_end|>`; a Qwen2 decoder with multimodal RoPE (3-row position ids
from the model's own `get_rope_index`; the decoder layers receive the position embeddings, which the
fast engine reuses). The prompt is the processor's chat template. Gaussian noise is applied to the
merger's output: exactly the tokens spliced into the prompt (Qwen2.5-VL reorders them back from its
window order afterwards; the noise is seeded per element either way).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class QwenVLAdapter(DecoderVLMAdapter):
    default_prompt_template: ClassVar[str | None] = None

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    @property
    def _merge(self) -> int:
        return int(self.model.model.visual.spatial_merge_size)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        t, h, w = (int(x) for x in inp.extra["image_grid_thw"][0])
        rows, cols = h // self._merge, w // self._merge
        keys = self.image_positions(inp)
        if t != 1 or len(keys) != rows * cols:
            raise ValueError(f"{self.family}: {len(keys)} image tokens for a {rows}×{cols} merged grid (t={t})")
        return ImageGrid(tuple(keys), rows, cols)

    def _unpatchify(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The processor's flattened patches [t·h·w, C·T·P·P] back to the first frame [C, h·P, w·P]."""
        _, h, w = (int(x) for x in grid_thw[0])
        processor = self.processor.image_processor
        m, tp, p = self._merge, int(processor.temporal_patch_size), int(processor.patch_size)
        x = patches.float().cpu().reshape(h // m, w // m, m, m, -1, tp, p, p)[:, :, :, :, :, 0]
        return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, h * p, w * p)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        return self.pixels_view(self._unpatchify(inp.pixel_values, inp.extra["image_grid_thw"]))

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        # The processor sizes an image by its own resolution: resize the mask to the image's first.
        height, width = self.model_view(inp).shape[:2]
        out = self.processor.image_processor(
            images=mask.convert("RGB").resize((width, height)), return_tensors="pt", do_normalize=False, do_resize=False
        )
        return (self._unpatchify(out["pixel_values"], out["image_grid_thw"]).mean(0) > 0.5).float().numpy()


class Qwen2VLAdapter(QwenVLAdapter):
    model_class: ClassVar[type] = Qwen2VLForConditionalGeneration


class Qwen25VLAdapter(QwenVLAdapter):
    model_class: ClassVar[type] = Qwen2_5_VLForConditionalGeneration
