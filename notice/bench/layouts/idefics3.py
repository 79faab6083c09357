"""Idefics3's and SmolVLM's layout for `make bench`: `HuggingFaceTB/SmolVLM-Instruct`'s architecture
(SmolVLM2-2.2B's for `smolvlm`: the same geometry), random weights.

A SigLIP so400m tower on 384-pixel tiles of 14-pixel patches (27×27 patches, pixel-shuffled 3×3 into 81
tokens per tile) and an image that the processor cuts into 2×2 tiles plus the global image (what
`size={"longest_edge": 2 * 384}` gives for a square image; pixel values [1, 5, 3, 384, 384] with an
all-ones `pixel_attention_mask`): 405 `<image>` tokens. The prompt is the chat template's
"<|im_start|>User:" (3 tokens), each tile's `<fake_token_around_image><row_i_col_j>` and 81 image tokens,
a newline after each row of tiles (the second one merged with the global image's leading one), the
global image's `<fake_token_around_image><global-img>`, 81 image tokens and a closing
`<fake_token_around_image>` (13 marker tokens, all patched text positions), then "{question}
<end_of_utterance>\\nAssistant:" (14 tokens with a 10-token question): 435 tokens. The tower keeps the
real width (1152, 16 heads, MLP 4304) but 4 of its 27 layers, so that one image (5 tiles) costs about
what the LLaVA bench's CLIP ViT-L/14-336 costs; the Llama language model is scaled as the LLaVA bench's
(hidden 1024, 12 layers, 16 query / 4 key-value heads, MLP 2816) with SmolLM2's vocabulary plus the
three image tokens (49155). `real_size` builds SmolLM2-1.7B (24 layers × 2048, 32 heads, MLP 8192) and
the full tower. Marker and word ids are stand-ins drawn at random; only `<image>` and
`<fake_token_around_image>` have their own ids.
"""

from __future__ import annotations

import random

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 49155
FAKE_TOKEN, IMAGE_TOKEN = 49152, 49153
PROMPT = "<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"  # chat template
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE = 3, 14
TILE_ROWS, TILE_COLS = 2, 2
PATCH, SCALE = 14, 3
SO400M = dict(hidden_size=1152, num_attention_heads=16, intermediate_size=4304, image_size=384, patch_size=PATCH)
VISION: dict[Size, dict] = {
    # 6×6 patches, 2×2 tokens per tile.
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=84, patch_size=14
    ),
    "bench": dict(SO400M, num_hidden_layers=4),
    "real": dict(SO400M, num_hidden_layers=27),
}
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192
    ),
}
CLASSES = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
}


def image_ids(rng: random.Random, per_tile: int) -> list[int]:
    """The processor's expansion of `<image>`: tiles row by row with their markers, then the global image."""
    ids: list[int] = []
    for _ in range(TILE_ROWS):
        for _ in range(TILE_COLS):
            ids += [FAKE_TOKEN, rng.randrange(100, FAKE_TOKEN), *[IMAGE_TOKEN] * per_tile]
        ids.append(rng.randrange(100, FAKE_TOKEN))  # "\n" ("\n\n" after the last row)
    return ids + [FAKE_TOKEN, rng.randrange(100, FAKE_TOKEN), *[IMAGE_TOKEN] * per_tile, FAKE_TOKEN]


def bench_case(real_size: bool = False, *, family: str = "idefics3", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    config_cls, model_cls = CLASSES[family]
    vision, text = VISION[size], TEXT[size]
    config = config_cls(
        vision_config=vision,
        text_config=dict(text, vocab_size=VOCAB, max_position_embeddings=16384),
        scale_factor=SCALE,
        image_token_id=IMAGE_TOKEN,
    )
    adapter = family_adapter_of(family, build_model(model_cls, config, size, device), PROMPT)
    tile = vision["image_size"]
    per_tile = (tile // PATCH // SCALE) ** 2
    rng = random.Random(0)
    words = random_ids(rng, TEXT_BEFORE_IMAGE + TEXT_AFTER_IMAGE, 100, FAKE_TOKEN)
    ids = [*words[:TEXT_BEFORE_IMAGE], *image_ids(rng, per_tile), *words[TEXT_BEFORE_IMAGE:]]
    n_views = TILE_ROWS * TILE_COLS + 1
    return sip_case(
        family,
        adapter,
        ids,
        (1, n_views, 3, tile, tile),
        tau=rng.randrange(100, FAKE_TOKEN),
        tau_p=rng.randrange(100, FAKE_TOKEN),
        extra={"pixel_attention_mask": torch.ones(1, n_views, tile, tile, dtype=torch.long)},
        description=f"{'Idefics3' if family == 'idefics3' else 'SmolVLM'} layout: SigLIP {tile} px tiles, "
        f"{TILE_ROWS}×{TILE_COLS} tiles + global ({n_views * per_tile} image tokens), tower "
        f"{vision['num_hidden_layers']} layers × {vision['hidden_size']}, {len(ids)}-token prompt, "
        f"Llama {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
