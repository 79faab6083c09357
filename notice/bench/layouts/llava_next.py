"""LLaVA-NeXT's layout for `make bench`: `llava-hf/llava-v1.6-mistral-7b-hf`'s architecture, random weights.

The LLaVA-1.5 bench's CLIP ViT-L/14-336 tower and projector, with the real any-resolution pinpoints:
an image of 336×672 pixels (`image_sizes`) fits the 1×2 canvas exactly, so the tower sees the base view
and 2 tiles ([1, 3, 3, 336, 336] pixel values) and the prompt holds 576 base tokens + 24 rows × (48
tile features + 1 newline) = 1752 image tokens, after "<s> [INST]" and before "\\n{question} [/INST]"
(30 text tokens). The Mistral language model is scaled as the LLaVA-1.5 bench's (hidden 1024, 12
layers, 16 query / 4 key-value heads, MLP 2816, vocabulary 32064, no sliding window, as v0.2);
`real_size` builds Mistral-7B (32 layers × 4096, 32 query / 8 key-value heads, MLP 14336).
"""

from __future__ import annotations

import random

import torch
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of
from notice.bench.layouts.llava import IMAGE_TOKEN, VISION, VOCAB

TEXT_BEFORE_IMAGE = 4  # "<s> ▁[ INST ]"
TEXT_AFTER_IMAGE = 26  # "\n{question} [/INST]"
PROMPT = "[INST] <image>\n{question} [/INST]"  # the processor's chat template (no processor here)
TILE_ROWS, TILE_COLS = 1, 2  # the canvas the image fits: base view + 2 tiles
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336
    ),
}


def image_token_count(side: int) -> int:
    """Image tokens of an image that fills the TILE_ROWS × TILE_COLS canvas exactly (nothing unpadded):
    the base view's side², then per feature row of the tiles, its features and a newline."""
    return side * side + TILE_ROWS * side * (TILE_COLS * side + 1)


def bench_case(real_size: bool = False, *, family: str = "llava_next", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    tile = vision["image_size"]
    n_image = image_token_count(tile // vision["patch_size"])
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=MistralConfig(**text, vocab_size=VOCAB, max_position_embeddings=32768, sliding_window=None),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[tile * h, tile * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))],
        image_seq_length=(tile // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    adapter = family_adapter_of(family, build_model(LlavaNextForConditionalGeneration, config, size, device), PROMPT)
    rng = random.Random(0)
    words = random_ids(rng, TEXT_BEFORE_IMAGE + TEXT_AFTER_IMAGE - 1, 100, IMAGE_TOKEN)
    ids = [1, *words[: TEXT_BEFORE_IMAGE - 1], *[IMAGE_TOKEN] * n_image, *words[TEXT_BEFORE_IMAGE - 1 :]]
    n_views = 1 + TILE_ROWS * TILE_COLS
    return sip_case(
        family,
        adapter,
        ids,
        (1, n_views, 3, tile, tile),
        tau=rng.randrange(100, IMAGE_TOKEN),
        tau_p=rng.randrange(100, IMAGE_TOKEN),
        extra={"image_sizes": torch.tensor([[tile * TILE_ROWS, tile * TILE_COLS]])},
        description=f"LLaVA-NeXT layout: CLIP {tile} px, base + {n_views - 1} tiles ({n_image} image tokens), "
        f"{len(ids)}-token prompt, Mistral {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
