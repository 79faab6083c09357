"""Mistral 3's layout for `make bench`: `mistralai/Mistral-Small-3.1-24B-Instruct-2503`'s architecture, random weights.

A Pixtral tower at 14-pixel patches on a 4:3 landscape image the processor resized to 336×448 pixels (`image_sizes`;
pixel values [1, 3, 336, 448]): 24×32 patches with 2-D RoPE, merged 2×2 into 12 rows of 16 `[IMG]` tokens, each row
followed by `[IMG_BREAK]` and the last by `[IMG_END]` (204 image positions, 192 of them image tokens). The prompt is
the adapter's default, "<s>[INST]" (2 tokens), the image, then "{question}[/INST]" (11 tokens with a 10-token
question): 217 tokens. The 12 markers are patched text positions inside the image, so a patch there recomputes the
image rows after it: they, not the text after the image, make most of the fast engine's cost. The tower keeps the
real width (1024, 16 heads of 64, SiLU-gated MLP 4096) but 4 of its 24 layers; the Mistral language model is scaled
as the LLaVA bench's (hidden 1024, 12 layers, 16 query / 4 key-value heads, MLP 2816) with the real vocabulary of
131072 and no sliding window. `real_size` builds Mistral-Small-3.1 (40 layers × 5120, 32 query / 8 key-value heads
of 128, MLP 32768, untied head) and the full tower. Word ids are stand-ins drawn at random above Mistral's 1000
control tokens; the control tokens have their real ids.
"""

from __future__ import annotations

import random

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 131072
CONTROL_TOKENS = 1000  # Tekken's first ids are control tokens
BOS, INST, END_INST, IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END = 1, 3, 4, 10, 12, 13
PROMPT = "[INST][IMG]{question}[/INST]"  # the adapter's default (no processor here)
QUESTION_TOKENS = 10
MERGE = 2
TOKEN_ROWS, TOKEN_COLS = 12, 16  # merged tokens of the resized image: 336×448 pixels at 14 × 2
PIXTRAL = dict(
    hidden_size=1024,
    num_attention_heads=16,
    head_dim=64,
    intermediate_size=4096,
    hidden_act="silu",
    patch_size=14,
    image_size=1540,
    rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
)
VISION: dict[Size, dict] = {
    "tiny": dict(
        PIXTRAL, hidden_size=32, num_attention_heads=2, head_dim=16, intermediate_size=64, num_hidden_layers=2
    ),
    "bench": dict(PIXTRAL, num_hidden_layers=4),
    "real": dict(PIXTRAL, num_hidden_layers=24),
}
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=32768,
    ),
}
GRID: dict[Size, tuple[int, int]] = {
    "tiny": (2, 3),
    "bench": (TOKEN_ROWS, TOKEN_COLS),
    "real": (TOKEN_ROWS, TOKEN_COLS),
}


def image_ids(rows: int, cols: int) -> list[int]:
    """The processor's image tokens: per row `cols` × [IMG] and [IMG_BREAK], the last break [IMG_END]."""
    ids = [tok for _ in range(rows) for tok in [*[IMAGE_TOKEN] * cols, IMAGE_BREAK]]
    ids[-1] = IMAGE_END
    return ids


def bench_case(real_size: bool = False, *, family: str = "mistral3", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(**vision),
        text_config=MistralConfig(
            **text,
            vocab_size=VOCAB,
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 1e9},
            sliding_window=None,
        ),
        image_token_index=IMAGE_TOKEN,
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    adapter = family_adapter_of(family, build_model(Mistral3ForConditionalGeneration, config, size, device), PROMPT)
    rows, cols = GRID[size]
    token_pixels = vision["patch_size"] * MERGE
    height, width = rows * token_pixels, cols * token_pixels
    rng = random.Random(0)
    question = random_ids(rng, QUESTION_TOKENS, CONTROL_TOKENS, VOCAB)
    ids = [BOS, INST, *image_ids(rows, cols), *question, END_INST]
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, height, width),
        tau=rng.randrange(CONTROL_TOKENS, VOCAB),
        tau_p=rng.randrange(CONTROL_TOKENS, VOCAB),
        extra={"image_sizes": torch.tensor([[height, width]])},
        description=f"Mistral 3 layout: Pixtral {height}×{width} px, {rows}×{cols} merged tokens "
        f"({rows * cols} image tokens + {rows} row markers), tower {vision['num_hidden_layers']} layers × "
        f"{vision['hidden_size']}, {len(ids)}-token prompt, Mistral {text['num_hidden_layers']} layers × "
        f"{text['hidden_size']}",
    )
