"""Tiny random Qwen3-VL / Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

Same classes, config layout (text and vision sub-configs, interleaved mRoPE, DeepStack taps), processor and
chat-template format as `Qwen/Qwen3-VL-8B-Instruct` and `Qwen/Qwen3-VL-30B-A3B-Instruct`, only tiny: 4-pixel
patches and at most 64×64 pixels per image, so an image is tens of tokens. The tower's DeepStack taps are its
first layers, so their features are added after the decoder's first layers (all but the last). Built and saved
without torchvision: the processor has no video processor (`processors.image_only`). Saved with
`save_pretrained`, it loads back like the real checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from transformers import (
    PreTrainedModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.testing.tiny import tiny_layers, word_tokenizer
from notice.testing.tiny_qwen import qwen_chat_template, stop_at_qwen_end_tokens
from notice.testing.tiny_qwen2_vl import SPECIAL_TOKENS

Kind = Literal["qwen3_vl", "qwen3_vl_moe"]

# Qwen3-VL-Instruct's template, short: no default system turn, images in place, generation prompt.
CHAT_TEMPLATE = qwen_chat_template()

_CLASSES: dict[str, tuple[type, type[PreTrainedModel]]] = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
}


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the head_dim/2 rotary frequencies in the real ratio 24:20:20."""
    half = head_dim // 2
    spatial = max(1, round(half * 20 / 64))
    return [half - 2 * spatial, spatial, spatial]


def build(
    kind: Kind = "qwen3_vl",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    patch_size: int = 4,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
) -> tuple[Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration, ProcessorMixin]:
    """A random tiny Qwen3-VL (`kind="qwen3_vl"`) or Qwen3-VL-MoE (`"qwen3_vl_moe"`: 4 experts, 2 per token), eval
    mode, eager attention.

    `hidden`, `layers` and `heads` size both the vision tower and the decoder; the tower's first `layers - 1`
    layers are DeepStack taps. Images are resized to multiples of 2·`patch_size` within [`min_pixels`,
    `max_pixels`]; each 2×2 patches are one token.
    """
    config_cls, model_cls = _CLASSES[kind]
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope_section(hidden // heads)}
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        rope_parameters={**rope, "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if kind == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    vision = dict(
        depth=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_heads=heads,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=16,  # a 4×4 learned grid, interpolated to each image's
        deepstack_visual_indexes=list(range(layers - 1)),
    )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    stop_at_qwen_end_tokens(model, ids)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    return model, processor


def build_qwen3_vl(seed: int = 0, **sizes: Any):
    """A random tiny Qwen3-VL and its processor (`build`)."""
    return build("qwen3_vl", seed=seed, **sizes)


def build_qwen3_vl_moe(seed: int = 0, **sizes: Any):
    """A random tiny Qwen3-VL-MoE and its processor (`build`)."""
    return build("qwen3_vl_moe", seed=seed, **sizes)
