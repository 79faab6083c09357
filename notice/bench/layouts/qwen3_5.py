"""Qwen3.5's layout for `make bench`: the architecture of transformers' default Qwen3.5 config (the 9B layout;
`Qwen/Qwen3.5-27B` is the same design, wider and deeper), random weights.

A 384×384 image at patch 16: 24×24 patches (`image_grid_thw` (1, 24, 24), pixel values as the processor
flattens them, [576, 3·2·16·16]), merged 2×2 into 144 `<|image_pad|>` tokens between `<|vision_start|>` and
`<|vision_end|>` in a 170-token chat prompt (no system turn: "<|im_start|>user\\n" before the image, the question
and the non-thinking assistant prompt with its closed `<think>` block after it; mRoPE position ids from the
model's own `get_rope_index`, given `mm_token_type_ids`). The vision tower keeps the real width (1152, 16
heads, MLP 4304, 2304 learned positions) but only 4 of its 27 layers, as the Qwen2-VL / InternVL layouts cut
theirs. The hybrid language model has the Qwen2-VL bench's width (1024) but 8 layers, keeping the real pattern
of three linear-attention layers then one full-attention layer (full attention in layers 3 and 7), and the real
head shapes: full attention 8 query / 2 key-value heads of 256 (rotary on a quarter), linear attention 4 key /
8 value heads of 128 with a 4-wide convolution, MLP 3072, with the real vocabulary of 248320. It is smaller
than the other decoder layouts (144 image tokens, 8 layers) so that `make bench` keeps its time: a patched row
solves at least one whole 64-position chunk of the delta rule in every linear-attention layer, so its rows cost
more than a decoder's. `real_size` builds the default config's 32 layers × 4096 (16 / 4 heads of 256; linear
attention 16 / 32 heads of 128; MLP 12288) and the full 27-layer tower. Qwen3.5-MoE (`family="qwen3_5_moe"`,
`Qwen/Qwen3.5-35B-A3B`): the same layout with each MLP 32 experts of 256, 8 per token, plus a shared expert of
256 (`MOE`).
"""

from __future__ import annotations

from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from notice.bench.case import Case, Size, build_model, family_adapter_of, size_of
from notice.bench.layouts.qwen2_vl import qwen_sip_case

VOCAB = 248320
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 248053, 248054, 248056, 248057
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)  # chat template, enable_thinking=False
# As PROMPT tokenises: 3 tokens before <|vision_start|>, 22 from <|vision_end|> on (a 10-token question).
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE = 4, 22
PATCH, MERGE, TEMPORAL = 16, 2, 2
IMAGE_SIDE: dict[Size, int] = {"tiny": 64, "bench": 384, "real": 512}
TEXT: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        mrope_section=[2, 1, 1],
        partial_rotary_factor=0.5,
    ),
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        intermediate_size=3072,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        mrope_section=[11, 11, 10],
        partial_rotary_factor=0.25,
    ),
    "real": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        intermediate_size=12288,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        mrope_section=[11, 11, 10],
        partial_rotary_factor=0.25,
    ),
}
# Qwen3.5-MoE (`qwen3_5_moe`): the MLP fields above replaced by experts (routed per position, plus a gated shared
# expert), as transformers' default Qwen3.5-MoE config (the 35B-A3B layout: 40 layers × 2048, 16 / 2 heads of
# 256, linear attention 16 / 32 heads of 128, 256 experts of 512, 8 per token, shared expert 512) at real size.
MOE: dict[Size, dict] = {
    "tiny": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    "bench": dict(
        num_experts=32, num_experts_per_tok=8, moe_intermediate_size=256, shared_expert_intermediate_size=256
    ),
    "real": dict(
        hidden_size=2048,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
}
CLASSES = {
    "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
    "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration),
}
# (width, heads, MLP width, depth)
TOWER: dict[Size, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 64, 2),
    "bench": (1152, 16, 4304, 4),
    "real": (1152, 16, 4304, 27),
}


def bench_case(real_size: bool = False, *, family: str = "qwen3_5", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    config_cls, model_cls = CLASSES[family]
    text = dict(TEXT[size])
    if family == "qwen3_5_moe":
        del text["intermediate_size"]
        text.update(MOE[size])
    section, rotary = text.pop("mrope_section"), text.pop("partial_rotary_factor")
    width, heads, mlp, depth = TOWER[size]
    config = config_cls(
        text_config=dict(
            text,
            vocab_size=VOCAB,
            max_position_embeddings=32768,
            eos_token_id=248046,
            full_attention_interval=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": rotary,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=width,
            num_heads=heads,
            intermediate_size=mlp,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            out_hidden_size=text["hidden_size"],
            num_position_embeddings=2304,
        ),
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    adapter = family_adapter_of(family, build_model(model_cls, config, size, device), PROMPT)
    experts = (
        f", {text['num_experts']} experts, {text['num_experts_per_tok']} per token" if family == "qwen3_5_moe" else ""
    )
    return qwen_sip_case(
        family,
        adapter,
        IMAGE_SIDE[size] // PATCH,
        patch=PATCH,
        tokens=(VISION_START, IMAGE_PAD, VISION_END),
        text=(TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE),
        ids_below=240000,
        describe=lambda n_image, n_ids: f"{'Qwen3.5-MoE' if family == 'qwen3_5_moe' else 'Qwen3.5'} layout: "
        f"{IMAGE_SIDE[size]} px ({n_image} image tokens), tower {depth} layers × {width}, {n_ids}-token prompt, "
        f"hybrid LM {text['num_hidden_layers']} layers × {text['hidden_size']} (3 linear-attention : 1 "
        f"full-attention){experts}",
    )
