"""Attention of the fusion heads from text positions to the image patches, for head-function scoring.

Fusion attention per family (registered in FUSION_ATTENTION by `adapter.family`, so callers never
branch on the family):
- BLIP: the text encoder's cross-attention. Its keys are the vision tower's output, [CLS] then the
  patch grid; the [CLS] image token is dropped because it has no place on the image.
- LLaVA: the language model's self-attention; the keys kept are the image-token positions
  (`input_ids == image_token_id`), one per patch in row-major order.

`PatchAttention.weights` is each row *renormalised over the patches* (sums to 1), so heads are
compared on where they look on the image; `PatchAttention.mass` keeps the raw fraction of the row
that went to the patches (BLIP: 1 − attention to the image [CLS]; LLaVA: attention on image tokens
vs text tokens), because taking attention off the image is itself a behaviour. `raw = weights · mass`.

Attention probabilities are read from forward hooks on the attention modules (their output[1]),
sliced to the requested heads, queries and image keys inside the hook, so a 7B model never holds
all layers' full T×T maps. Models must be loaded with `attn_implementation="eager"`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from notice.adapters.base import ModelInput, VLMAdapter


@dataclass(frozen=True)
class FusionAttention:
    """Where one family's fusion attention lives and which of its keys are image patches."""

    modules: Callable[[VLMAdapter], Sequence[torch.nn.Module]]  # per layer; output[1] = probs [B, H, T, K]
    image_keys: Callable[[VLMAdapter, ModelInput], list[int]]   # key indices of the patches, row-major
    query_positions: Callable[[VLMAdapter, ModelInput], list[int]]  # default query positions


FUSION_ATTENTION: dict[str, FusionAttention] = {}


@dataclass
class PatchAttention:
    """Attention of layers × heads × query positions to the image patches of one prompt."""

    weights: torch.Tensor        # [L, H, Q, P] renormalised over the P patches (float32)
    mass: torch.Tensor           # [L, H, Q] raw attention on the patches before renormalising
    layers: list[int]
    heads: list[int]
    query_positions: list[int]
    grid: tuple[int, int]        # (rows, cols); patch p sits at (p // cols, p % cols)

    @property
    def raw(self) -> torch.Tensor:
        """The model's own probabilities on the patches, [L, H, Q, P]."""
        return self.weights * self.mass[..., None]


def patch_grid(adapter: VLMAdapter) -> tuple[int, int]:
    """(rows, cols) of the vision tower's patch grid (square images, as both processors produce)."""
    vision = adapter.model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def patch_attention(
    adapter: VLMAdapter,
    inp: ModelInput,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    query_positions: Sequence[int] | None = None,
) -> PatchAttention:
    """Fusion attention of `layers` × `heads` (default: all) from `query_positions` to the patches.

    Default query positions: BLIP, every text-encoder token ([CLS] and [SEP] included: which token
    localises varies between trained models, BRIEF §6); LLaVA, every text token after the image (the
    last one is "ASSISTANT:"'s ":"; tokens before the image cannot see it under the causal mask).
    """
    spec = FUSION_ATTENTION[adapter.family]
    modules = spec.modules(adapter)
    layers = list(range(len(modules))) if layers is None else list(layers)
    heads = list(range(adapter.n_heads)) if heads is None else list(heads)
    queries = spec.query_positions(adapter, inp) if query_positions is None else list(query_positions)
    keys = spec.image_keys(adapter, inp)
    grid = patch_grid(adapter)
    if len(keys) != grid[0] * grid[1]:
        raise ValueError(f"{adapter.family}: {len(keys)} image keys for a {grid[0]}×{grid[1]} patch grid")

    device = inp.input_ids.device
    head_idx, query_idx, key_idx = (torch.tensor(ix, device=device) for ix in (heads, queries, keys))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            probs = output[1]
            if probs is None:
                raise RuntimeError("attention weights are None: load the model with attn_implementation='eager'")
            rows = probs[0].index_select(0, head_idx).index_select(1, query_idx)  # [H, Q, K]
            captured[layer] = rows.index_select(2, key_idx).float()
        return hook

    handles = [modules[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        adapter.answer_logits(inp)
    finally:
        for handle in handles:
            handle.remove()
    patches = torch.stack([captured[layer] for layer in layers]).cpu()  # [L, H, Q, P]
    mass = patches.sum(-1)
    return PatchAttention(
        weights=patches / mass.clamp_min(torch.finfo(torch.float32).tiny)[..., None],
        mass=mass, layers=layers, heads=heads, query_positions=queries, grid=grid,
    )


def register_fusion_attention(family: str, spec: FusionAttention) -> None:
    FUSION_ATTENTION[family] = spec


def _blip_image_keys(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    rows, cols = patch_grid(adapter)
    return list(range(1, 1 + rows * cols))  # key 0 is the image [CLS]


def _llava_image_keys(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    keys = torch.nonzero(inp.input_ids[0] == adapter.model.config.image_token_id).flatten().tolist()
    rows, cols = patch_grid(adapter)
    # the "full" feature strategy keeps CLIP's [CLS] as the first image token
    return keys[1:] if len(keys) == rows * cols + 1 else keys


def _llava_queries(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    last_image = int(torch.nonzero(inp.input_ids[0] == adapter.model.config.image_token_id).max())
    return [p for p in adapter.patch_positions(inp) if p > last_image]


register_fusion_attention("blip", FusionAttention(
    modules=lambda a: [layer.crossattention.self for layer in a.model.text_encoder.encoder.layer],
    image_keys=_blip_image_keys,
    query_positions=lambda a, inp: a.patch_positions(inp),
))
register_fusion_attention("llava", FusionAttention(
    modules=lambda a: [layer.self_attn for layer in a.model.model.language_model.layers],
    image_keys=_llava_image_keys,
    query_positions=_llava_queries,
))


def model_view(adapter: VLMAdapter, inp: ModelInput) -> np.ndarray:
    """The image as the model sees it (after resize / crop), uint8 [H, W, 3]: the processor's
    normalisation undone, so overlays line up with the patch grid exactly."""
    processor = adapter.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    pixels = inp.pixel_values[0].float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def mask_view(adapter: VLMAdapter, mask: Image.Image) -> np.ndarray:
    """An object mask (0/255) through the same resize / crop as the image, as a float [H, W] in [0, 1].

    Pixels count as object above 0.5, so interpolated edges (and a processor's padding with the mean
    colour, ~0.46) do not.
    """
    out = adapter.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
    return (out["pixel_values"][0].float().mean(0) > 0.5).float().numpy()
