"""BLIP's layout for `make bench`: the `Salesforce/blip-vqa-base` architecture, random weights.

ViT-B/16 at 384 px (577 image tokens), 12-layer BERT-base text encoder and decoder (hidden 768,
12 heads, vocabulary 30524) and a 12-token question that names both options. blip-vqa-base is small,
so the bench size is the real size (`real_size` only switches to bfloat16 on the device). Patch set:
mlp / self_attn / cross_attn × 12 layers × 12 positions and the 144 cross-attention heads at the
answer token.
"""

from __future__ import annotations

import random

import torch
from transformers import BlipConfig, BlipForQuestionAnswering

from notice.adapters.base import ModelInput
from notice.adapters.blip import BlipAdapter
from notice.bench.case import Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

QUESTION_LEN = 12
SCREEN_KEY_PREFIX = "blip_"  # `make bench` times the attribution screen here too (`blip_screen_speedup=`)
VOCAB = 30524
BASE = dict(
    text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    vision=dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=384,
        patch_size=16,
    ),
)
SIZES: dict[Size, dict] = {
    "tiny": dict(
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        vision=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        ),
    ),
    "bench": BASE,
    "real": BASE,
}


@torch.no_grad()
def rows_logits(adapter: BlipAdapter, inp: ModelInput) -> torch.Tensor:
    """Answer logits [B, V] of a batched input (as BlipAdapter.answer_logits, which scores one row)."""
    model = adapter.model
    image = model.vision_model(pixel_values=inp.pixel_values)[0]
    encoded = model.text_encoder(
        input_ids=inp.input_ids,
        attention_mask=inp.attention_mask,
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
    )[0]
    bos = torch.full((inp.input_ids.shape[0], 1), model.config.text_config.bos_token_id, device=image.device)
    return adapter.answer_logits_of(
        lambda: model.text_decoder(
            input_ids=bos, encoder_hidden_states=encoded, encoder_attention_mask=inp.attention_mask, use_cache=False
        ).logits[:, -1]
    )


def bench_case(real_size: bool = False, *, family: str = "blip", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    dims = SIZES[size]
    config = BlipConfig(
        text_config=dict(dims["text"], vocab_size=VOCAB, bos_token_id=30522, sep_token_id=102, pad_token_id=0),
        vision_config=dict(dims["vision"], initializer_range=0.02),
    )
    adapter = family_adapter_of(family, build_model(BlipForQuestionAnswering, config, size, device))
    ids = [101, *random_ids(random.Random(0), QUESTION_LEN - 2, 1000, 30000), 102]  # [CLS] question [SEP]
    text, vision = dims["text"], dims["vision"]
    side = vision["image_size"]
    return sip_case(
        family,
        adapter,
        ids,
        (1, 3, side, side),
        tau=ids[4],
        tau_p=ids[6],
        rows_logits=rows_logits,
        description=f"BLIP (blip-vqa-base layout): {(side // vision['patch_size']) ** 2 + 1} image tokens, "
        f"{QUESTION_LEN}-token question, {text['num_hidden_layers']}+{text['num_hidden_layers']} "
        f"text layers × {text['hidden_size']}",
    )
