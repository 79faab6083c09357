"""Qwen2-VL's and Qwen2.5-VL's layouts for `make bench`: `Qwen/Qwen2-VL-7B-Instruct`'s and
`Qwen/Qwen2.5-VL-7B-Instruct`'s architectures, random weights.

A 448×448 image at patch 14: 32×32 patches (`image_grid_thw` (1, 32, 32), pixel values as the
processor flattens them, [1024, 3·2·14·14]), merged 2×2 into 256 `<|image_pad|>` tokens between
`<|vision_start|>` and `<|vision_end|>` in a 31-token chat prompt (system turn and "<|im_start|>user\\n"
before the image, the question and the assistant prompt after it; mRoPE position ids from the model's
own `get_rope_index`, given `mm_token_type_ids`). The vision tower keeps the real width (1280, 16
heads; Qwen2-VL: MLP ratio 4; Qwen2.5-VL: SwiGLU 3420, 112-pixel windows) but only 8 of its 32 layers
(Qwen2.5-VL: the 8th attends globally, as every 8th in the real tower), so that one image costs about
what the LLaVA bench's CLIP ViT-L/14-336 costs; the full depth would make every hooked run, and so the
ratio, larger. The Qwen2 language model is scaled as the LLaVA bench's (hidden 1024, 12 layers, 16 query
/ 4 key-value heads, MLP 2816, head_dim 64 with mrope_section [8, 12, 12], the real ratio) with the
real vocabulary of 152064; `real_size` builds the 7B one (28 layers × 3584, 28 query / 4 key-value
heads, MLP 18944) and the full 32-layer tower.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from notice.adapters.base import VLMAdapter
from notice.bench.case import Case, Size, build_model, family_adapter_of, random_ids, sip_case, size_of

VOCAB = 152064
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)  # chat template
# As PROMPT tokenises: 15 tokens up to <|vision_start|>, 16 from <|vision_end|> on (a 10-token question).
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE = 15, 16
PATCH, MERGE, TEMPORAL = 14, 2, 2
IMAGE_SIDE: dict[Size, int] = {"tiny": 56, "bench": 448, "real": 448}
TEXT: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        mrope_section=[2, 3, 3],
    ),
    "bench": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        mrope_section=[8, 12, 12],
    ),
    "real": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        mrope_section=[16, 24, 24],
    ),
}
# (width, heads, MLP width (Qwen2.5-VL), depth); the Qwen2-VL tower's MLP is 4 × its width.
TOWER: dict[Size, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 64, 2),
    "bench": (1280, 16, 3420, 8),
    "real": (1280, 16, 3420, 32),
}
CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


def vision_config(family: str, size: Size, text_hidden: int) -> dict:
    """The tower's config; the families name the widths differently (Qwen2-VL: `embed_dim` is the
    tower's width and `hidden_size` the merger's output; Qwen2.5-VL: `hidden_size` and `out_hidden_size`)."""
    width, heads, mlp, depth = TOWER[size]
    common = dict(
        depth=depth, num_heads=heads, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    if family == "qwen2_vl":
        return dict(common, embed_dim=width, hidden_size=text_hidden, mlp_ratio=4)
    return dict(
        common,
        hidden_size=width,
        out_hidden_size=text_hidden,
        intermediate_size=mlp,
        window_size=112,
        fullatt_block_indexes=list(range(7, depth, 8)) or [depth - 1],
    )


def bench_case(real_size: bool = False, *, family: str = "qwen2_vl", tiny: bool = False, device: str = "cpu") -> Case:
    size = size_of(real_size, tiny)
    config_cls, model_cls = CLASSES[family]
    text = dict(TEXT[size])
    section = text.pop("mrope_section")
    config = config_cls(
        text_config=dict(
            text,
            vocab_size=VOCAB,
            max_position_embeddings=32768,
            bos_token_id=151643,
            eos_token_id=151645,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        ),
        vision_config=vision_config(family, size, text["hidden_size"]),
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    adapter = family_adapter_of(family, build_model(model_cls, config, size, device), PROMPT)
    return qwen_sip_case(
        family,
        adapter,
        IMAGE_SIDE[size] // PATCH,
        patch=PATCH,
        tokens=(VISION_START, IMAGE_PAD, VISION_END),
        text=(TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE),
        ids_below=150000,
        describe=lambda n_image, n_ids: f"{'Qwen2-VL' if family == 'qwen2_vl' else 'Qwen2.5-VL'} layout: "
        f"{IMAGE_SIDE[size]} px ({n_image} image tokens), tower {TOWER[size][3]} layers × {TOWER[size][0]}, "
        f"{n_ids}-token prompt, Qwen2 {text['num_hidden_layers']} layers × {text['hidden_size']}",
    )


def qwen_sip_case(
    family: str,
    adapter: VLMAdapter,
    grid: int,
    *,
    patch: int,
    tokens: tuple[int, int, int],
    text: tuple[int, int],
    ids_below: int,
    describe: Callable[[int, int], str],
) -> Case:
    """The SIP sample of a Qwen-style layout (Qwen2-VL, Qwen3-VL, Qwen3.5): a square image of `grid`² patches of
    `patch` pixels (2 frames, merged 2×2 into `<|image_pad|>` tokens), its token run `tokens` (vision start,
    image pad, vision end) after `text[0] - 1` random words and before `text[1] - 1`, random ids and answer
    tokens below `ids_below`; `describe(image tokens, prompt length)` is the case's description."""
    vision_start, image_pad, vision_end = tokens
    before, after = text
    n_image = (grid // MERGE) ** 2
    rng = random.Random(0)
    words = random_ids(rng, before + after - 2, 100, ids_below)
    ids = [*words[: before - 1], vision_start, *[image_pad] * n_image, vision_end, *words[before - 1 :]]
    return sip_case(
        family,
        adapter,
        ids,
        (grid * grid, 3 * TEMPORAL * patch * patch),
        tau=rng.randrange(100, ids_below),
        tau_p=rng.randrange(100, ids_below),
        extra={
            "image_grid_thw": torch.tensor([[1, grid, grid]]),
            "mm_token_type_ids": (torch.tensor([ids]) == image_pad).int(),
        },
        description=describe(n_image, len(ids)),
    )
