"""Llama 3.2 Vision (`MllamaForConditionalGeneration`): cross-attention layers between a decoder's layers.

Written for `meta-llama/Llama-3.2-11B-Vision-Instruct`. The image processor resizes the image onto the canvas of
at most `max_image_tiles` tiles whose aspect ratio fits it best (keeping its aspect ratio, padding the rest) and
cuts the canvas into tiles, row-major; every image is padded to `max_image_tiles` tiles (`aspect_ratio_mask`
marks the real ones, `aspect_ratio_ids` the arrangement). The vision tower encodes each tile's patches and a
[CLS], and a linear projector maps its output (the last layer and some intermediate ones, concatenated) to the
decoder's width: these are the image keys, tile after tile, [CLS] first ([tiles × (patches + 1)], padding tiles
included).

The image is not in the text sequence: the prompt holds one `<|image|>` placeholder (a text position, patched like
the rest of the prompt), and the decoder's cross-attention layers (`text_config.cross_attention_layers`; the other
layers are self-attention layers) attend from every text position to the image keys, their output scaled by
tanh of a learned gate. `cross_attention_mask` gives the tiles a position sees: from the placeholder on, the real
tiles. Positions before the placeholder see no tile, and the model then lifts their mask entirely: they attend
to every image key (padding tiles included) and only their cross-attention layers' MLP output is zeroed
(`full_text_row_masked_out_mask`), so they too depend on the image. The prompt is the processor's chat template.

Sites: `mlp` in every layer; `self_attn` (the input of `self_attn.o_proj`) and its heads in self-attention
layers; `cross_attn` (the input of `cross_attn.o_proj`) and its heads in cross-attention layers; heads at the last
position in both kinds. The fusion heads (head functions, attention taps, the knockout's image edges) are the
cross-attention heads; their image grid is the canvas's patches (each tile's [CLS] left out). There is no logit
lens: no stream position holds the image. Gaussian noise is applied to the projector's output: exactly the image
keys every cross-attention layer reads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch
from PIL import Image
from transformers import MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

from notice.adapters.attention_blocks import interface_attention_blocks
from notice.adapters.attention_taps import AttentionTap, interface_attention_taps
from notice.adapters.base import HEAD_SITE_PARENT, ImageGrid, ModelInput, VLMAdapter
from notice.adapters.decoder import DecoderVLMAdapter


class MllamaAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = MllamaForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = None
    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn", "cross_attn")
    # The fusion heads (attention to the image); the self-attention layers' heads are `self_attn_head`.
    head_site: ClassVar[str] = "cross_attn_head"
    image_keys_are_positions: ClassVar[bool] = False
    knockout_engine: ClassVar[Literal["suffix", "batched"]] = "batched"

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    @property
    def cross_attention_layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.text_config.cross_attention_layers)

    def layer_sites(self, layer: int) -> tuple[str, ...]:
        return ("mlp", "cross_attn") if layer in self.cross_attention_layers else ("mlp", "self_attn")

    def layer_head_site(self, layer: int) -> str:
        return "cross_attn_head" if layer in self.cross_attention_layers else "self_attn_head"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads  # both kinds of layer

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        block: Any = self.layers[layer]  # MllamaSelfAttentionDecoderLayer or MllamaCrossAttentionDecoderLayer
        parent = HEAD_SITE_PARENT.get(site, site)
        if parent in ("self_attn", "cross_attn") and parent not in self.layer_sites(layer):
            raise ValueError(f"{self.family}: layer {layer} has no {site} (its sites: {self.layer_sites(layer)})")
        if parent == "cross_attn":
            return block.cross_attn.o_proj, "input"
        return super().site_module(site, layer)

    @property
    def self_attentions(self) -> list[torch.nn.Module]:
        """The self-attention modules, of the self-attention layers only."""
        cross = self.cross_attention_layers
        return [cast(Any, block).self_attn for layer, block in enumerate(self.layers) if layer not in cross]

    # -- inputs -----------------------------------------------------------------------------
    def patch_positions(self, inp: ModelInput) -> list[int]:
        return list(range(inp.input_ids.shape[1]))  # the placeholder is a text position

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        """The projector's output ([B, images, tiles, patches + 1, D]) as the cross-attention's keys read it."""

        def as_keys(x: torch.Tensor) -> torch.Tensor:
            return edit(x.reshape(x.shape[0], -1, x.shape[-1])).reshape(x.shape)

        return self.edited_output(self.image_embedding_module(), as_keys)

    # -- the image as the cross-attention sees it -----------------------------------------------------
    @property
    def _tile_side(self) -> int:
        """Patches per side of one tile."""
        vision = self.model.config.vision_config
        return int(vision.image_size // vision.patch_size)

    def _tiles(self, inp: ModelInput) -> tuple[int, int]:
        """(rows, cols) of tiles the image's canvas was cut into (`aspect_ratio_ids`)."""
        ratio_id = int(inp.extra["aspect_ratio_ids"][0, 0])
        max_tiles = int(self.model.config.vision_config.max_num_tiles)
        rows, cols = get_all_supported_aspect_ratios(max_tiles)[ratio_id - 1]
        return int(rows), int(cols)

    def image_keys(self, inp: ModelInput) -> list[int]:
        vision = self.model.config.vision_config
        return list(range(int(vision.max_num_tiles) * (self._tile_side**2 + 1)))  # padding tiles included

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """Every patch of the canvas (the real tiles, row-major), row-major on the canvas's patch grid; each tile's
        keys are its [CLS] and then its patches, row-major."""
        side = self._tile_side
        rows, cols = self._tiles(inp)
        keys = [
            (tile_row * cols + tile_col) * (side * side + 1) + 1 + r * side + c
            for tile_row in range(rows)
            for r in range(side)
            for tile_col in range(cols)
            for c in range(side)
        ]
        return ImageGrid(tuple(keys), rows * side, cols * side)

    def _canvas(self, tiles: torch.Tensor, inp: ModelInput) -> torch.Tensor:
        """Tiles [tiles, C, h, w] (row-major) back into the canvas [C, rows·h, cols·w]."""
        rows, cols = self._tiles(inp)
        channels, height, width = tiles.shape[1:]
        grid = tiles[: rows * cols].reshape(rows, cols, channels, height, width)
        return grid.permute(2, 0, 3, 1, 4).reshape(channels, rows * height, cols * width)

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The canvas (pixel_values [1, images, tiles, C, H, W]): the resized image and its padding."""
        return self.pixels_view(self._canvas(inp.pixel_values[0, 0], inp))

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        out = self.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
        canvas = self._canvas(out["pixel_values"][0, 0], inp)
        return (canvas.float().mean(0) > 0.5).float().numpy()

    def stream_image_grid(self, inp: ModelInput) -> ImageGrid:
        return VLMAdapter.stream_image_grid(self, inp)  # refused: the image enters by cross-attention only

    # -- fusion attention: the cross-attention layers' attention to the image keys -------------------
    @property
    def cross_attentions(self) -> dict[int, torch.nn.Module]:
        """layer -> the cross-attention module of each cross-attention layer."""
        return {layer: cast(Any, self.layers[layer]).cross_attn for layer in self.cross_attention_layers}

    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        return list(self.cross_attentions.values())

    def fusion_layers(self) -> list[int]:
        return self.cross_attention_layers

    def attention_queries(self, inp: ModelInput) -> list[int]:
        return self.patch_positions(inp)  # every position attends to the image (see the module docstring)

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        return interface_attention_taps(self.cross_attentions, tap)

    # -- attention knockout -----------------------------------------------------------------------
    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        """Stream blocks in the self-attention layers, image-key blocks in the cross-attention layers (a window's
        layers of the other kind have no such attention: nothing to block there)."""
        cross = self.cross_attention_layers
        modules = {
            layer: cast(Any, block).cross_attn if layer in cross else cast(Any, block).self_attn
            for layer, block in enumerate(self.layers)
        }
        blocks = {
            **{layer: block for layer, block in self_blocks.items() if layer not in cross},
            **{layer: block for layer, block in fusion_blocks.items() if layer in cross},
        }
        return interface_attention_blocks(modules, blocks)

    def batched_answer_logits(self, inp: ModelInput, rows: int) -> torch.Tensor:
        """The image through the vision tower and projector once (as `MllamaModel.forward`: [tiles, patches + 1,
        D], tiles of row r at r·tiles..), then the decoder on `rows` copies of the prompt."""
        inner = self.model.model
        vision = inner.vision_model(
            pixel_values=inp.pixel_values,
            aspect_ratio_ids=inp.extra["aspect_ratio_ids"],
            aspect_ratio_mask=inp.extra["aspect_ratio_mask"],
        ).last_hidden_state
        states = inner.multi_modal_projector(vision).reshape(-1, vision.shape[-2], self.hidden_size)
        mask = inp.extra["cross_attention_mask"]

        def forward() -> torch.Tensor:
            return self.model(
                input_ids=inp.input_ids.expand(rows, -1),
                attention_mask=inp.attention_mask.expand(rows, -1),
                cross_attention_states=states.repeat(rows, 1, 1),
                cross_attention_mask=mask.expand(rows, *mask.shape[1:]),
                logits_to_keep=1,
            ).logits[:, -1]

        return self.answer_logits_of(forward).reshape(rows, -1)
