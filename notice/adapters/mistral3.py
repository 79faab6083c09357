"""Mistral 3 (`Mistral3ForConditionalGeneration`): Pixtral vision, 2×2 patch merger, Mistral decoder.

Written for `mistralai/Mistral-Small-3.1-24B-Instruct-2503` (also Mistral-Small-3.2 and the vision Magistral
checkpoints: the same model type). The processor resizes the image to at most `longest_edge` pixels a side,
keeping its aspect ratio, to whole multiples of patch × merge (28 pixels), and passes `image_sizes` (the
resized height and width) to the model. The Pixtral tower encodes the image at that size (2-D RoPE over its
patch rows and columns), the projector merges 2×2 neighbouring patches into one token (row-major over the
halved grid) and projects them into the decoder. In the prompt each row of merged tokens is a run of `[IMG]`
tokens followed by `[IMG_BREAK]`, the last row's by `[IMG_END]`; the two markers are vocabulary embeddings, not
image features, so they are text positions and patched like the rest of the prompt (as InternVL's `<img>` /
`</img>`). Gaussian noise is applied to the projector's output: exactly the tokens spliced into the `[IMG]`
positions.

The default prompt is the chat template's user turn, `[INST][IMG]{question}[/INST]` after the tokenizer's `<s>`,
without the template's default system prompt: that one holds the current date (`strftime_now`), so prompts and
every number would depend on the day a job runs, and the template writes `<s>` itself while the tokenizer adds
another. A config's `prompt_template` may add a `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]` of its own.

The image grid that the head-function stage scores is every `[IMG]` position, row-major on the merged grid
(the markers skipped): rows × cols = the resized image's size over 28 pixels, the whole image.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import Mistral3ForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class Mistral3Adapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = Mistral3ForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = "[INST][IMG]{question}[/INST]"

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one merged image token (patch size × spatial merge)."""
        config = self.model.config
        return int(config.vision_config.patch_size) * int(config.spatial_merge_size)

    def image_size(self, inp: ModelInput) -> tuple[int, int]:
        """The image's (height, width) as the processor resized it (`image_sizes`, one image)."""
        sizes = inp.extra.get("image_sizes")
        if sizes is None or sizes.shape != (1, 2):
            shape = None if sizes is None else tuple(sizes.shape)
            raise ValueError(f"{self.family}: the input needs `image_sizes` of one image, [1, 2]; it has {shape}")
        height, width = (int(v) for v in sizes[0])
        return height, width

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """Every `[IMG]` position, row-major on the merged token grid of the resized image."""
        height, width = self.image_size(inp)
        rows, cols = height // self.token_pixels, width // self.token_pixels
        keys = self.image_positions(inp)
        if len(keys) != rows * cols:
            raise ValueError(
                f"{self.family}: {len(keys)} image tokens for a {height}×{width} image ({rows}×{cols} merged tokens)"
            )
        return ImageGrid(tuple(keys), rows, cols)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The resized image (pixel_values [1, C, H, W], cut to `image_sizes` should a batch have padded it)."""
        height, width = self.image_size(inp)
        return self.pixels_view(inp.pixel_values[0, :, :height, :width])

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        """The mask through the same resize as the image: the processor rounds the size to its patch size × merge
        (not the image processor's own patch size), and so does this."""
        side = self.processor.patch_size * self.processor.spatial_merge_size
        unit = {"height": side, "width": side}
        out = self.processor.image_processor(
            images=mask.convert("RGB"), patch_size=unit, return_tensors="pt", do_normalize=False
        )
        return (out["pixel_values"][0].float().mean(0) > 0.5).float().numpy()
