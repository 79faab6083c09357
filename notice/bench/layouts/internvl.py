"""InternVL's layout for `make bench`: `OpenGVLab/InternVL3-8B-hf`'s architecture, random weights.

An InternViT-300M-style tower on 448-pixel tiles of 14-pixel patches (32×32 patches and a [CLS], pixel-
shuffled 2×2 into 256 tokens per tile) and an image that the processor cuts into 2×2 tiles plus the
thumbnail (what a square 896-pixel image gives; pixel values [5, 3, 448, 448]): 1280 `<IMG_CONTEXT>`
tokens between `<img>` and `</img>`. The prompt is the chat template's "<|im_start|>user\\n" (3 tokens),
the image, then "\\n{question}<|im_end|>\\n<|im_start|>assistant\\n" (16 tokens with a 10-token question):
1301 tokens. The tower keeps the real width (1024, 16 heads, MLP 4096) but 4 of its 24 layers, so that one
image (5 tiles) costs about what the LLaVA bench's CLIP ViT-L/14-336 costs; the Qwen2 language model is
scaled as the LLaVA bench's (hidden 1024, 12 layers, 16 query / 4 key-value heads, MLP 2816) with the real
vocabulary of 151674. `real_size` builds Qwen2.5-7B (28 layers × 3584, 28 query / 4 key-value heads, MLP
18944, untied head) and the full tower. Word ids are stand-ins drawn at random; the image tokens and
markers have their own ids.
"""

from __future__ import annotations

import random

from transformers import InternVLConfig, InternVLForConditionalGeneration

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 151674
START_IMAGE, END_IMAGE, IMAGE_TOKEN = 151665, 151666, 151667  # <img>, </img>, <IMG_CONTEXT>
PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\n{question}<|im_end|>\n<|im_start|>assistant\n"  # chat template
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE = 3, 16
TILE_ROWS, TILE_COLS = 2, 2
INTERN_VIT_300M = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, image_size=448, patch_size=14)
VISION: dict[Size, dict] = {
    # 4×4 patches, 2×2 tokens per tile.
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
    ),
    "bench": dict(INTERN_VIT_300M, num_hidden_layers=4),
    "real": dict(INTERN_VIT_300M, num_hidden_layers=24),
}
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944
    ),
}


def bench_case(real_size: bool = False, *, family: str = "internvl", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    tile = vision["image_size"]
    per_tile = (tile // vision["patch_size"] // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=dict(text, model_type="qwen2", vocab_size=VOCAB, max_position_embeddings=32768),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    adapter = family_adapter_of(family, build_model(InternVLForConditionalGeneration, config, size, device), PROMPT)
    n_views = TILE_ROWS * TILE_COLS + 1
    rng = random.Random(0)
    words = random_ids(rng, TEXT_BEFORE_IMAGE + TEXT_AFTER_IMAGE, 100, START_IMAGE)
    image = [START_IMAGE, *[IMAGE_TOKEN] * (n_views * per_tile), END_IMAGE]
    ids = [*words[:TEXT_BEFORE_IMAGE], *image, *words[TEXT_BEFORE_IMAGE:]]
    return sip_case(
        family,
        adapter,
        ids,
        (n_views, 3, tile, tile),
        tau=rng.randrange(100, START_IMAGE),
        tau_p=rng.randrange(100, START_IMAGE),
        description=f"InternVL layout: InternViT {tile} px tiles, {TILE_ROWS}×{TILE_COLS} tiles + thumbnail "
        f"({n_views * per_tile} image tokens), tower {vision['num_hidden_layers']} layers × {vision['hidden_size']}, "
        f"{len(ids)}-token prompt, Qwen2 {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
