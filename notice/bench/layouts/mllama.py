"""Llama 3.2 Vision's layout for `make bench`: `meta-llama/Llama-3.2-11B-Vision-Instruct`'s architecture, random
weights.

The vision tower on 560-pixel tiles of 14-pixel patches (40×40 patches and a [CLS] per tile: 1601 image keys), its
local layers followed by gated global layers, its output the last layer concatenated with intermediate ones and
projected to the decoder's width; the decoder's cross-attention layers attend to those keys from every prompt
position. The image is not in the prompt: the chat template's "<|begin_of_text|><|start_header_id|>user
<|end_header_id|>\\n\\n" (5 tokens), the one `<|image|>` placeholder, then "{question}<|eot_id|><|start_header_id|>
assistant<|end_header_id|>\\n\\n" (15 tokens with a 10-token question): 21 tokens, every one patched (the
placeholder too). The bench keeps the tower's real width (1280, 16 heads, MLP 5120) but 2 of its 32 local and 2 of
its 8 global layers, and one tile (`max_num_tiles` 1; the real model pads every image to 4 tiles); the decoder is
scaled as the LLaVA bench's (hidden 1024, 12 layers, 16 query / 4 key-value heads, MLP 2816) with cross-attention
layers at 2, 6 and 10 (the real one: 8 of 40, from layer 3 every fifth) and the real vocabulary of 128256.
`real_size` builds the 11B: Llama 3.1 8B's decoder with 8 cross-attention layers added (40 layers × 4096, 32
query / 8 key-value heads, MLP 14336) and the full tower on 4 tiles. Word ids are stand-ins drawn at random.
"""

from __future__ import annotations

import random

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 128256
BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT = 128000, 128006, 128007, 128009
IMAGE_TOKEN = 128256  # past the vocabulary, as the real checkpoint's (its embedding table has 8 extra rows)
USER, ASSISTANT, NEWLINES = 882, 78191, 271
PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
QUESTION_TOKENS = 10
VISION_11B = dict(
    hidden_size=1280, attention_heads=16, intermediate_size=5120, image_size=560, patch_size=14, num_channels=3
)
VISION: dict[Size, dict] = {
    # 2×2 patches per tile, two tiles.
    "tiny": dict(
        hidden_size=32,
        attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        num_hidden_layers=2,
        num_global_layers=1,
        intermediate_layers_indices=[0],
        max_num_tiles=2,
    ),
    "bench": dict(
        VISION_11B, num_hidden_layers=2, num_global_layers=2, intermediate_layers_indices=[0, 1], max_num_tiles=1
    ),
    "real": dict(
        VISION_11B,
        num_hidden_layers=32,
        num_global_layers=8,
        intermediate_layers_indices=[3, 7, 15, 23, 30],
        max_num_tiles=4,
    ),
}
TEXT: dict[Size, dict] = {
    "tiny": dict(SCALED_DECODER["tiny"], num_hidden_layers=3, cross_attention_layers=[1]),
    "bench": dict(SCALED_DECODER["bench"], cross_attention_layers=[2, 6, 10]),
    "real": dict(
        hidden_size=4096,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


def bench_case(real_size: bool = False, *, family: str = "mllama", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    vision = dict(
        vision,
        vision_output_dim=vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"])),
        # Every tile arrangement of at most max_num_tiles tiles, as the image processor numbers them.
        supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(vision["max_num_tiles"])],
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=dict(
            text,
            vocab_size=VOCAB,
            max_position_embeddings=131072,
            bos_token_id=BEGIN_OF_TEXT,
            eos_token_id=EOT,
            pad_token_id=128004,
        ),
        image_token_index=IMAGE_TOKEN,
    )
    model = build_model(MllamaForConditionalGeneration, config, size, device)
    with torch.no_grad():  # a fresh model's tanh gates are 0 (its cross-attention layers the identity)
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    adapter = family_adapter_of(family, model, PROMPT)
    rng = random.Random(0)
    question = random_ids(rng, QUESTION_TOKENS, 100, BEGIN_OF_TEXT)
    before = [BEGIN_OF_TEXT, START_HEADER, USER, END_HEADER, NEWLINES]
    after = [*question, EOT, START_HEADER, ASSISTANT, END_HEADER, NEWLINES]
    ids = [*before, IMAGE_TOKEN, *after]
    tiles, tile = vision["max_num_tiles"], vision["image_size"]
    # One tile (the image fits one; the rest, if any, are padding), as the processor gives it.
    seen = torch.zeros(1, len(ids), 1, tiles, dtype=torch.long)
    seen[0, len(before) :, 0, 0] = 1
    extra = {
        "aspect_ratio_ids": torch.tensor([[1]]),
        "aspect_ratio_mask": torch.tensor([[[1] + [0] * (tiles - 1)]]),
        "cross_attention_mask": seen,
    }
    return sip_case(
        family,
        adapter,
        ids,
        (1, 1, tiles, 3, tile, tile),
        tau=rng.randrange(100, BEGIN_OF_TEXT),
        tau_p=rng.randrange(100, BEGIN_OF_TEXT),
        description=f"Llama 3.2 Vision layout: {tile} px tiles, 1 of {tiles} tiles "
        f"({(tile // vision['patch_size']) ** 2 + 1} image keys per tile), tower {vision['num_hidden_layers']} + "
        f"{vision['num_global_layers']} global layers × {vision['hidden_size']}, {len(ids)}-token prompt, Llama "
        f"{text['num_hidden_layers']} layers × {text['hidden_size']} (cross-attention at "
        f"{text['cross_attention_layers']})",
        extra=extra,
    )
