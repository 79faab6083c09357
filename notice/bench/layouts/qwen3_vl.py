"""Qwen3-VL's and Qwen3-VL-MoE's layouts for `make bench`: `Qwen/Qwen3-VL-8B-Instruct`'s and
`Qwen/Qwen3-VL-30B-A3B-Instruct`'s architectures, random weights.

A 512×512 image at patch 16: 32×32 patches (`image_grid_thw` (1, 32, 32), pixel values as the processor flattens
them, [1024, 3·2·16·16]), merged 2×2 into 256 `<|image_pad|>` tokens between `<|vision_start|>` and
`<|vision_end|>` in a 20-token chat prompt ("<|im_start|>user\\n" before the image, the question and the assistant
prompt after it; interleaved mRoPE position ids from the model's own `get_rope_index`, given `mm_token_type_ids`).
The vision tower keeps the real width (1152, 16 heads, MLP 4304, a 48×48 learned position grid) but only 4 of its
27 layers, with three DeepStack taps (after its layers 1, 2 and 3; the real ones: 8, 16, 24), so that the
features added after the decoder's first three layers stay; the full depth would make every hooked run, and so
the ratio, larger. The language model is scaled as the Qwen2-VL bench's (hidden 1024, 12 layers, 16 query / 4
key-value heads, head_dim 64 with mrope_section [12, 10, 10], the real ratio; MLP 3072, the real 3× ratio; MoE: 16
experts of 384, 4 per token) with the real vocabulary of 151936; `real_size` builds the 8B one (36 layers × 4096,
32 query / 8 key-value heads, MLP 12288) or the 30B-A3B one (48 layers × 2048, 32 / 4 heads, 128 experts of 768, 8
per token) and the full 27-layer tower.
"""

from __future__ import annotations

from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from notice.bench.case import Case, Size, build_model, family_adapter_of, size_of
from notice.bench.layouts.qwen2_vl import qwen_sip_case

VOCAB = 151936
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
# The chat template (Qwen3-VL-Instruct's has no default system turn).
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
# As PROMPT tokenises: 4 tokens up to <|vision_start|>, 16 from <|vision_end|> on (a 10-token question).
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE = 4, 16
PATCH, MERGE, TEMPORAL = 16, 2, 2
IMAGE_SIDE: dict[Size, int] = {"tiny": 64, "bench": 512, "real": 512}
TEXT: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mrope_section=[4, 2, 2],
    ),
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=3072,
        mrope_section=[12, 10, 10],
    ),
    "real": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        mrope_section=[24, 20, 20],
    ),
}
# The MoE language model: what replaces TEXT's sizes.
MOE_TEXT: dict[Size, dict] = {
    "tiny": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "bench": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=384),
    "real": dict(
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
}
# (width, heads, MLP width, depth, DeepStack taps, learned position grid side)
TOWER: dict[Size, tuple[int, int, int, int, list[int], int]] = {
    "tiny": (32, 2, 64, 3, [0, 1, 2], 4),
    "bench": (1152, 16, 4304, 4, [1, 2, 3], 48),
    "real": (1152, 16, 4304, 27, [8, 16, 24], 48),
}
CLASSES = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
}


def bench_case(real_size: bool = False, *, family: str = "qwen3_vl", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    config_cls, model_cls = CLASSES[family]
    text = dict(TEXT[size], **(MOE_TEXT[size] if family == "qwen3_vl_moe" else {}))
    section = text.pop("mrope_section")
    width, heads, mlp, depth, taps, grid_side = TOWER[size]
    config = config_cls(
        text_config=dict(
            text,
            vocab_size=VOCAB,
            max_position_embeddings=262144,
            bos_token_id=151643,
            eos_token_id=151645,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=width,
            num_heads=heads,
            intermediate_size=mlp,
            out_hidden_size=text["hidden_size"],
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            num_position_embeddings=grid_side**2,
            deepstack_visual_indexes=taps,
        ),
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )
    adapter = family_adapter_of(family, build_model(model_cls, config, size, device), PROMPT)
    name = "Qwen3-VL-MoE" if family == "qwen3_vl_moe" else "Qwen3-VL"
    return qwen_sip_case(
        family,
        adapter,
        IMAGE_SIDE[size] // PATCH,
        patch=PATCH,
        tokens=(VISION_START, IMAGE_PAD, VISION_END),
        text=(TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE),
        ids_below=150000,
        describe=lambda n_image, n_ids: f"{name} layout: {IMAGE_SIDE[size]} px ({n_image} image tokens), tower "
        f"{depth} layers × {width} (DeepStack taps {taps}), {n_ids}-token prompt, {text['num_hidden_layers']} "
        f"layers × {text['hidden_size']}",
    )
