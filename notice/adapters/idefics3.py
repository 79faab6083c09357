"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

Written for `HuggingFaceTB/SmolVLM-Instruct`, `HuggingFaceTB/SmolVLM-256M-Instruct` and
`HuggingFaceM4/Idefics3-8B-Llama3` (model type `idefics3`), and the SmolVLM2 checkpoints (model type
`smolvlm`, same architecture). The processor resizes the image to a longest edge (`size`), then to
whole tiles of `max_image_size` pixels, and cuts it into rows × cols tiles, row-major, followed by the
global image (the whole image squashed to one tile); an image no larger than one tile is the global
image alone. pixel_values are [1, tiles + 1, C, tile, tile] with a `pixel_attention_mask`. A SigLIP-style
tower encodes every tile and the connector pixel-shuffles scale × scale neighbouring patches into one
token and projects them into the Llama decoder. In the prompt each tile is
`<fake_token_around_image><row_i_col_j>` and its `<image>` tokens (row-major over its shuffled grid),
rows end with a newline, and the global image is `<fake_token_around_image><global-img>` and its
`<image>` tokens, closed by `<fake_token_around_image>`; these markers are text positions and are
patched like the rest of the prompt. The prompt is the processor's chat template. Gaussian noise is
applied to the connector's output: exactly the tokens spliced into the prompt, tiles and global image.

The image grid that the head-function stage scores is the tiles assembled into one grid: tile (i, j)'s
shuffled tokens sit at rows i·side.., cols j·side.. of a (rows·side) × (cols·side) grid, which covers the
image at the resolution the model reads it (`model_view` is the tiles stitched back together, the
resized image). The global image repeats the same content at a lower resolution and is left out; an
image that is not split is scored on its only view.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration
from transformers.processing_utils import ProcessorMixin

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter

_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


def stitch_tiles(views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The tiles of views [tiles + 1, C, t, t] (the global image last) as one image [C, rows·t, cols·t];
    an unsplit image (rows = cols = 0) is its only view."""
    if rows == 0:
        return views[0]
    tiles = views[: rows * cols]
    channels, side = tiles.shape[1], tiles.shape[-1]
    return tiles.reshape(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4).reshape(channels, rows * side, -1)


class _Idefics3FamilyAdapter(DecoderVLMAdapter):
    default_prompt_template: ClassVar[str | None] = None

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.connector

    @property
    def _tokens_side(self) -> int:
        """Shuffled tokens per side of one tile."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size // self.model.config.scale_factor

    @staticmethod
    def tile_layout(inp: ModelInput) -> tuple[int, int]:
        """(rows, cols) of the image's tiles, read off the `<row_i_col_j>` markers; (0, 0): not split."""
        found = [tuple(int(x) for x in m.groups()) for t in inp.tokens if (m := _ROW_COL.fullmatch(t))]
        return (max(r for r, _ in found), max(c for _, c in found)) if found else (0, 0)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        rows, cols = self.tile_layout(inp)
        side = self._tokens_side
        keys = self.image_positions(inp)
        per_tile = side * side
        if len(keys) != (rows * cols + 1) * per_tile:
            raise ValueError(
                f"{self.family}: {len(keys)} image tokens for {rows}×{cols} tiles + the global image of {per_tile}"
            )
        if rows == 0:
            return ImageGrid(tuple(keys), side, side)
        grid = [
            keys[((r // side) * cols + c // side) * per_tile + (r % side) * side + c % side]
            for r in range(rows * side)
            for c in range(cols * side)
        ]
        return ImageGrid(tuple(grid), rows * side, cols * side)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The tiles stitched together: the image resized as the model reads it."""
        return self.pixels_view(stitch_tiles(inp.pixel_values[0], *self.tile_layout(inp)))

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        """The mask through the same resize and tiling as the image, its tiles stitched as in `model_view`."""
        out = self.processor.image_processor(
            images=mask.convert("RGB"), return_tensors="pt", do_normalize=False, return_row_col_info=True
        )
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        views = stitch_tiles(out["pixel_values"][0].float(), rows, cols)
        return (views.mean(0) > 0.5).float().numpy()


class Idefics3Adapter(_Idefics3FamilyAdapter):
    model_class: ClassVar[type] = Idefics3ForConditionalGeneration


class SmolVLMAdapter(_Idefics3FamilyAdapter):
    model_class: ClassVar[type] = SmolVLMForConditionalGeneration

    def rendered_chat_template(self) -> str:
        # SmolVLMProcessor.apply_chat_template reads its video processor's defaults, which a processor
        # loaded without torchvision lacks; the template itself is rendered by the base class's method.
        # transformers types a message's content as str; a list of parts is what the template takes.
        conversation: Any = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
        return ProcessorMixin.apply_chat_template(
            self.processor, conversation, add_generation_prompt=True, tokenize=False
        )
