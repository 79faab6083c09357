"""Gemma 3's layout for `make bench`: `google/gemma-3-4b-it`'s architecture, random weights.

SigLIP So400m/14, its patches average-pooled into 256 image tokens and projected, in the chat template's prompt:
"<bos><start_of_turn>user\\n" and the processor's "\\n\\n<start_of_image>" (5 tokens), the 256 image tokens
(`token_type_ids` 1: attended to bidirectionally among themselves), then
"<end_of_image>\\n\\n{question}<end_of_turn>\\n<start_of_turn>model\\n" (17 tokens with a 10-token question): 278
tokens. The tower keeps the real width (1152, 16 heads, MLP 4304) but runs 2 of its 27 layers on a 448-pixel image
(32×32 patches pooled 2×2 into the same 256 tokens), not the real 896 pixels (64×64 patches pooled 4×4): eager
attention over 4096 patches alone takes longer on 2 cores than the bench's budget for the family. The language
model is the other decoder layouts' (hidden 1024, 12 layers, MLP 2816) with Gemma 3's attention (8 query / 4
key-value heads × 128, as the 4B's 8 / 4 × 256; five sliding-window layers of 1024 tokens to one global, as the
real pattern) and the real vocabulary of 262208; `real_size` builds the 4B (34 layers × 2560, MLP 10240, global
RoPE scaled 8× linearly) and the full tower at 896 px. Word ids are stand-ins drawn at random; the image tokens and
markers have their own ids. The projector, which Gemma 3 initialises to zeros, is random.

The default patch set is the decoder families': module sites at every text position (those before the image are
no-ops under SIP), heads at the last position, so every patched position follows the image and the block-causal
engine recomputes only the suffix after it, as the causal decoder engine does. The hooked run it is compared with
costs less than the real model's would: its tower is 2 layers over 1024 patches instead of 27 over 4096.
"""

from __future__ import annotations

import random

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 262208
BOS, START_OF_TURN, END_OF_TURN = 2, 105, 106
START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN = 255999, 256000, 262144
# The adapter's chat template (the tokenizer adds <bos>).
PROMPT = "<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n"
# Around the image: "user", "\n\n\n" before <start_of_image>; "\n\n", a 10-token question, "\n", "model", "\n" after.
WORDS_BEFORE_IMAGE, QUESTION_TOKENS = 2, 10
SIGLIP_SO400M = dict(
    hidden_size=1152, num_attention_heads=16, intermediate_size=4304, image_size=896, patch_size=14, layer_norm_eps=1e-6
)
VISION: dict[Size, dict] = {
    # 4×4 patches pooled 2×2: 4 image tokens.
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
    ),
    "bench": dict(SIGLIP_SO400M, num_hidden_layers=2, image_size=448),
    "real": dict(SIGLIP_SO400M, num_hidden_layers=27),
}
TOKENS_PER_IMAGE: dict[Size, int] = {"tiny": 4, "bench": 256, "real": 256}
TEXT: dict[Size, dict] = {
    # The other decoder layouts' language model, with Gemma 3's 2:1 query to key-value heads.
    "tiny": dict(
        SCALED_DECODER["tiny"],
        head_dim=8,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "bench": dict(SCALED_DECODER["bench"], num_attention_heads=8, head_dim=128, query_pre_attn_scalar=128),
    "real": dict(
        hidden_size=2560,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        intermediate_size=10240,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
}


def bench_case(real_size: bool = False, *, family: str = "gemma3", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    n_image = TOKENS_PER_IMAGE[size]
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
        text_config=Gemma3TextConfig(**text, vocab_size=VOCAB, sliding_window=1024, max_position_embeddings=131072),
        mm_tokens_per_image=n_image,
        boi_token_index=START_OF_IMAGE,
        eoi_token_index=END_OF_IMAGE,
        image_token_index=IMAGE_TOKEN,
    )
    model = build_model(Gemma3ForConditionalGeneration, config, size, device)
    # Gemma 3 initialises its projector to zeros (the image would not reach the text); random as the other weights.
    projection = model.get_parameter("model.multi_modal_projector.mm_input_projection_weight")
    torch.nn.init.normal_(projection, std=config.get_text_config().initializer_range)
    adapter = family_adapter_of(family, model, PROMPT)
    rng = random.Random(0)
    words = random_ids(rng, WORDS_BEFORE_IMAGE + QUESTION_TOKENS + 5, 256, START_OF_IMAGE)
    before, newlines, question, tail = words[:2], words[2], words[3:13], words[13:]
    ids = [
        BOS,
        START_OF_TURN,
        *before,
        START_OF_IMAGE,
        *[IMAGE_TOKEN] * n_image,
        END_OF_IMAGE,
        newlines,
        *question,
        END_OF_TURN,
        tail[0],
        START_OF_TURN,
        *tail[1:3],
    ]
    side = vision["image_size"]
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, side, side),
        tau=rng.randrange(256, START_OF_IMAGE),
        tau_p=rng.randrange(256, START_OF_IMAGE),
        extra={"token_type_ids": (torch.tensor([ids]) == IMAGE_TOKEN).long()},
        description=f"Gemma 3 layout: SigLIP {side} px ({n_image} image tokens), tower {vision['num_hidden_layers']} "
        f"layers × {vision['hidden_size']}, {len(ids)}-token prompt, Gemma 3 {text['num_hidden_layers']} layers × "
        f"{text['hidden_size']}",
    )
