"""LLaVA-1.5's layout for `make bench`: `llava-hf/llava-1.5-7b-hf`'s architecture, random weights.

CLIP ViT-L/14 at 336 px (24 layers, second-to-last layer's features, 576 image tokens, two-layer GELU
projector) spliced into a 30-token chat prompt ("<s> USER: <image>\\n{question} Answer with one word.
ASSISTANT:"). The bench scales the Llama language model down to what a CPU runs in minutes (hidden
1024, 12 layers, 16 query / 4 key-value heads, MLP 2816, the real vocabulary of 32064); `real_size`
builds the 7B one (32 layers × 4096, 32 heads, MLP 11008). Patch set: mlp / self_attn × every layer ×
the 30 text positions, and every head at the last token.
"""

from __future__ import annotations

import random

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from notice.bench.case import SCALED_DECODER, Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 32064
SCREEN_KEY_PREFIX = ""  # `make bench` times the attribution screen here: `screen_speedup=` is this layout's
KNOCKOUT_KEY_PREFIX = ""  # and the attention-knockout sweep: `knockout_speedup=` is this layout's
CIRCUIT_KEY_PREFIX = ""  # and circuits: `eap_ig_forwards=` and `faithfulness_speedup=` are this layout's
KNOCKOUT_QUESTION_TOKENS = 16  # the "{question}" of the text after the image (after its "\n")
IMAGE_TOKEN = 32000
TEXT_BEFORE_IMAGE = 3  # "<s> USER :"
TEXT_AFTER_IMAGE = 27  # "\n{question} Answer with one word. ASSISTANT:"
CLIP_L_336 = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
VISION: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    ),
    "bench": CLIP_L_336,
    "real": CLIP_L_336,
}
TEXT: dict[Size, dict] = {
    **SCALED_DECODER,
    "real": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008
    ),
}


def bench_case(real_size: bool = False, *, family: str = "llava", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    vision, text = VISION[size], TEXT[size]
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, vocab_size=VOCAB, max_position_embeddings=4096),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=n_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    adapter = family_adapter_of(family, build_model(LlavaForConditionalGeneration, config, size, device))
    rng = random.Random(0)
    words = random_ids(rng, TEXT_BEFORE_IMAGE + TEXT_AFTER_IMAGE - 1, 100, IMAGE_TOKEN)
    ids = [1, *words[: TEXT_BEFORE_IMAGE - 1], *[IMAGE_TOKEN] * n_image, *words[TEXT_BEFORE_IMAGE - 1 :]]
    side = vision["image_size"]
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, side, side),
        tau=rng.randrange(100, IMAGE_TOKEN),
        tau_p=rng.randrange(100, IMAGE_TOKEN),
        description=f"LLaVA-1.5 layout: CLIP {side} px ({n_image} image tokens), {len(ids)}-token prompt, "
        f"Llama {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )
