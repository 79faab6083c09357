"""LLaVA-OneVision's layout for `make bench`: `llava-hf/llava-onevision-qwen2-7b-ov-hf`'s architecture, random
weights.

SigLIP-so400m at 384 px (26 layers × 1152 at real size, 4 of them in the bench; 16 heads, MLP 4304, patch
14: 729 features per view, no [CLS], last layer's features, two-layer GELU projector) with the real
any-resolution pinpoints (every h × w canvas of 384-pixel tiles up to 6 × 6): an image of 384×768 pixels
(`image_sizes`) fits the 1×2 canvas exactly, so the tower sees the
base view and 2 tiles ([1, 3, 3, 384, 384] pixel values, `batch_num_images` [1]) and the prompt holds 729 base
tokens + 27 rows × (54 tile features + 1 newline) = 2214 image tokens (within anyres_max_9's budget: nothing is
shrunk), after "<|im_start|>user " and before "\\n{question}<|im_end|><|im_start|>assistant\\n" (30 text tokens in
all). The Qwen2 language model is scaled as the LLaVA-1.5 bench's (hidden 1024, 12 layers, 16 query / 4 key-value
heads, MLP 2816) with the real vocabulary of 152064; `real_size` builds Qwen2-7B (28 layers × 3584, 28 query / 4
key-value heads, MLP 18944).
"""

from __future__ import annotations

import random

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 152064
IM_START, IMAGE_TOKEN, VIDEO_TOKEN = 151644, 151646, 151647
TEXT_BEFORE_IMAGE = 3  # "<|im_start|> user Ġ"
TEXT_AFTER_IMAGE = 27  # "\n{question}<|im_end|><|im_start|>assistant\n"
PROMPT = "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n"  # the chat template
TILE_ROWS, TILE_COLS = 1, 2  # the canvas the image fits: base view + 2 tiles
MAX_TILES = 6  # the pinpoints: every canvas of up to 6 × 6 tiles
SIGLIP_SO400M_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
VISION: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    ),
    # Full width, 4 of the 26 layers (as the Idefics3 and InternVL layouts): the tower runs in every hooked forward
    # of the bench's (a) and (b), and 26 layers over three views would take most of `make bench`'s time.
    "bench": {**SIGLIP_SO400M_384, "num_hidden_layers": 4},
    "real": SIGLIP_SO400M_384,
}
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944
    ),
}


def image_token_count(side: int) -> int:
    """Image tokens of an image that fills the TILE_ROWS × TILE_COLS canvas exactly (nothing unpadded or shrunk):
    the base view's side², then per feature row of the tiles, its features and a newline."""
    return side * side + TILE_ROWS * side * (TILE_COLS * side + 1)


def bench_case(
    real_size: bool = False, *, family: str = "llava_onevision", tiny: bool = False, device: str = "cpu"
) -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    tile = vision["image_size"]
    n_image = image_token_count(tile // vision["patch_size"])
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        text_config=Qwen2Config(
            **text,
            vocab_size=VOCAB,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[tile * h, tile * w] for h in range(1, MAX_TILES + 1) for w in range(1, MAX_TILES + 1)],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    model = build_model(LlavaOnevisionForConditionalGeneration, config, size, device)
    adapter = family_adapter_of(family, model, PROMPT)
    rng = random.Random(0)
    words = random_ids(rng, TEXT_BEFORE_IMAGE + TEXT_AFTER_IMAGE - 1, 100, 150000)
    ids = [IM_START, *words[: TEXT_BEFORE_IMAGE - 1], *[IMAGE_TOKEN] * n_image, *words[TEXT_BEFORE_IMAGE - 1 :]]
    n_views = 1 + TILE_ROWS * TILE_COLS
    return sip_case(
        family,
        adapter,
        ids,
        (1, n_views, 3, tile, tile),
        tau=rng.randrange(100, 150000),
        tau_p=rng.randrange(100, 150000),
        extra={
            "image_sizes": torch.tensor([[tile * TILE_ROWS, tile * TILE_COLS]]),
            "batch_num_images": torch.tensor([1]),
        },
        description=f"LLaVA-OneVision layout: SigLIP {tile} px, base + {n_views - 1} tiles ({n_image} image tokens), "
        f"{len(ids)}-token prompt, Qwen2 {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
