"""PaliGemma's layout for `make bench`: `google/paligemma-3b-mix-224`'s architecture, random weights.

SigLIP So400m/14 at 224 px (27 layers × 1152, 256 image tokens, a linear projector) before a 14-token
prompt as the processor builds it: "<bos>answer en {question}\\n" after the image tokens (a 10-token
question), every token prefix (`token_type_ids` 0, so attention is bidirectional over the whole
prompt). The bench scales the Gemma language model by half in width and depth (hidden 1024, 9 layers,
8 query heads × 128 with one key-value head as Gemma 2B's multi-query attention, MLP 8192 as its 8×
ratio) with the real vocabulary of 257216; `real_size` builds Gemma 2B (18 layers × 2048, 8 heads ×
256, MLP 16384).

Every patched position is a prefix position: a patch changes every position from the next layer on,
so a patched run recomputes the whole prompt from its layer on (the `prefix_lm` engine) and the
decoder engine's causal saving is not available. The ratio to a hooked run comes from skipping the
vision tower and the layers before the patched one.
"""

from __future__ import annotations

import random

import torch
from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

from notice.bench.case import Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 257216
IMAGE_TOKEN = 257152
BOS, NEWLINE = 2, 108
TEXT_WORDS = 12  # "answer ▁en" and a 10-token question, between <bos> and "\n"
PROMPT = "<image>answer en {question}"  # the adapter's default (no processor here)
SIGLIP_SO400M = dict(
    hidden_size=1152,
    num_hidden_layers=27,
    num_attention_heads=16,
    intermediate_size=4304,
    image_size=224,
    patch_size=14,
)
VISION: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
    ),
    "bench": SIGLIP_SO400M,
    "real": SIGLIP_SO400M,
}
TEXT: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=512,
    ),
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=9,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=128,
        intermediate_size=8192,
    ),
    "real": dict(
        hidden_size=2048,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=16384,
    ),
}


def bench_case(real_size: bool = False, *, family: str = "paligemma", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        text_config=GemmaConfig(**text, vocab_size=VOCAB, max_position_embeddings=8192),
        image_token_index=IMAGE_TOKEN,
        vocab_size=VOCAB,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
    )
    adapter = family_adapter_of(family, build_model(PaliGemmaForConditionalGeneration, config, size, device), PROMPT)
    rng = random.Random(0)
    ids = [*[IMAGE_TOKEN] * n_image, BOS, *random_ids(rng, TEXT_WORDS, 256, IMAGE_TOKEN), NEWLINE]
    side = vision["image_size"]
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, side, side),
        tau=rng.randrange(256, IMAGE_TOKEN),
        tau_p=rng.randrange(256, IMAGE_TOKEN),
        extra={"token_type_ids": torch.zeros(1, len(ids), dtype=torch.long)},
        description=f"PaliGemma layout: SigLIP {side} px ({n_image} image tokens), {len(ids)}-token prompt, "
        f"all prefix; Gemma {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
