"""BLIP-2's and InstructBLIP's layouts for `make bench`: `Salesforce/blip2-opt-2.7b`'s and
`Salesforce/instructblip-vicuna-7b`'s architectures, random weights; each stream of each.

The ViT-g/14 tower at 224 px (257 tokens, width 1408, 16 heads, MLP 6144) keeps its width but only 24
of its 39 layers, so that one image costs about what the LLaVA bench's CLIP ViT-L/14-336 costs (the
full depth would make every hooked run, and so the ratio, larger). The Q-Former is the real one (12
layers × 768, 12 heads, cross-attention every 2nd layer, 32 query tokens; InstructBLIP's also reads
a 16-token instruction). The 32 `<image>` tokens come first, then the prompt: BLIP-2's
"</s>Question: {question} Answer:" (14 tokens), InstructBLIP's "<s>Question: {question} Short answer:"
(16 tokens). The language model is scaled as the LLaVA bench's (hidden 1024, 12 layers, 16 heads;
OPT: MLP 4096, Vicuna: MLP 2816, all heads with their own keys/values) with vocabularies of 50272
(OPT) and 32002 (Vicuna, the image token last); `real_size` builds OPT-2.7B (32 layers × 2560, 32
heads, MLP 10240) or Vicuna-7B (32 layers × 4096, 32 heads, MLP 11008) and the full 39-layer tower.
Families `blip2` / `instructblip` patch the language model, `blip2_qformer` / `instructblip_qformer`
the Q-Former (both with `sites.default_patches`).
"""

from __future__ import annotations

import random

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from notice.bench.case import Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of
from notice.testing.tiny_blip2 import distinct_queries

QUERIES: dict[Size, int] = {"tiny": 4, "bench": 32, "real": 32}
TEXT_TOKENS = {"blip2": 14, "instructblip": 16}  # after the image tokens, BOS included
QFORMER_TEXT = 16  # InstructBLIP's instruction as the Q-Former's BERT tokenizer gives it, [CLS] .. [SEP]
QFORMER_VOCAB = 30523
# (vocabulary, image token, BOS) of OPT's and Vicuna's tokenizers.
TOKENS = {"blip2": (50272, 50265, 2), "instructblip": (32002, 32001, 1)}
VIT_G = dict(hidden_size=1408, num_attention_heads=16, intermediate_size=6144, image_size=224, patch_size=14)
VISION: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    ),
    "bench": dict(VIT_G, num_hidden_layers=24),
    "real": dict(VIT_G, num_hidden_layers=39),
}
VISION_INIT = 0.02  # the config's default, 1e-10, gives a tower whose output ignores the image
QFORMER_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
QFORMER: dict[Size, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64),
    "bench": QFORMER_BASE,
    "real": QFORMER_BASE,
}
TEXT: dict[str, dict[Size, dict]] = {
    "blip2": {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64),
        "bench": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, ffn_dim=4096),
        "real": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    },
    "instructblip": {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "bench": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816),
        "real": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    },
}


def model_config(kind: str, size: Size) -> Blip2Config | InstructBlipConfig:
    """The model's config: `kind` "blip2" (OPT) or "instructblip" (Vicuna)."""
    vocab, image_token, bos = TOKENS[kind]
    text = dict(TEXT[kind][size], vocab_size=vocab, bos_token_id=bos, eos_token_id=2, max_position_embeddings=2048)
    qformer = dict(QFORMER[size], cross_attention_frequency=2)
    config_cls: type[Blip2Config | InstructBlipConfig]
    if kind == "blip2":
        text = dict(text, model_type="opt", word_embed_proj_dim=text["hidden_size"], pad_token_id=1)
        config_cls = Blip2Config
    else:
        text = dict(text, model_type="llama", num_key_value_heads=text["num_attention_heads"], pad_token_id=0)
        qformer = dict(qformer, vocab_size=QFORMER_VOCAB)
        config_cls = InstructBlipConfig
    return config_cls(
        vision_config=dict(VISION[size], initializer_range=VISION_INIT),
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=QUERIES[size],
        image_token_index=image_token,
    )


def bench_case(real_size: bool = False, *, family: str = "blip2", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    kind = family.removesuffix("_qformer")
    config = model_config(kind, size)
    model_cls = Blip2ForConditionalGeneration if kind == "blip2" else InstructBlipForConditionalGeneration
    model = build_model(model_cls, config, size, device)
    distinct_queries(model)
    adapter = family_adapter_of(family, model)
    _, image_token, bos = TOKENS[kind]
    rng = random.Random(0)
    words = random_ids(rng, TEXT_TOKENS[kind] - 1, 100, image_token)
    ids = [*[image_token] * QUERIES[size], bos, *words]
    extra = {}
    if kind == "instructblip":
        instruction = [101, *random_ids(rng, QFORMER_TEXT - 2, 1000, 30000), 102]
        extra = {
            "qformer_input_ids": torch.tensor([instruction]),
            "qformer_attention_mask": torch.ones(1, QFORMER_TEXT, dtype=torch.long),
        }
    vision, text = VISION[size], TEXT[kind][size]
    side = vision["image_size"]
    stream = "Q-Former" if family.endswith("_qformer") else "language model"
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, side, side),
        tau=rng.randrange(100, image_token),
        tau_p=rng.randrange(100, image_token),
        extra=extra,
        description=f"{'BLIP-2' if kind == 'blip2' else 'InstructBLIP'} layout, {stream} stream: ViT {side} px "
        f"({vision['num_hidden_layers']} layers × {vision['hidden_size']}), Q-Former {QUERIES[size]} queries, "
        f"{len(ids)}-token prompt, {'OPT' if kind == 'blip2' else 'Vicuna'} {text['num_hidden_layers']} layers × "
        f"{text['hidden_size']}",
    )
