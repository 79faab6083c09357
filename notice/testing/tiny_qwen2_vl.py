"""Tiny random Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Same classes, config layout (text and vision sub-configs, mRoPE), processor and chat-template format
as `Qwen/Qwen2-VL-2B-Instruct` and `Qwen/Qwen2.5-VL-3B-Instruct`, only tiny: 4-pixel patches and
at most 64×64 pixels per image, so an image is tens of tokens. Built and saved without
torchvision: the processor has no video processor (`processors.image_only`). Saved with
`save_pretrained`, it loads back like the real checkpoints (`AutoConfig`, the model class,
`notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.testing.tiny import tiny_layers, word_tokenizer
from notice.testing.tiny_qwen import qwen_chat_template, stop_at_qwen_end_tokens

Kind = Literal["qwen2_vl", "qwen2_5_vl"]

# Ids in the real checkpoints' order; Qwen has no unknown token, but a word-level model needs one.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)

# Qwen2-VL-Instruct's template, short: default system turn, images in place, generation prompt.
CHAT_TEMPLATE = qwen_chat_template(system="You are a helpful assistant.")

_CLASSES: dict[str, tuple[type, type[PreTrainedModel], type[ProcessorMixin]]] = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
}


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the head_dim/2 rotary frequencies in the real ratio 16:24:24."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def _vision_config(kind: Kind, hidden: int, layers: int, heads: int, patch_size: int) -> dict[str, Any]:
    """The vision tower's config: the two families name their widths differently."""
    common = dict(depth=layers, num_heads=heads, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        # embed_dim is the tower's width, hidden_size the merger's output (the text width).
        return dict(common, embed_dim=hidden, hidden_size=hidden, mlp_ratio=2)
    # Windows of 2×2 merged tokens; the last block attends globally, as every 8th does in the real tower.
    return dict(
        common,
        hidden_size=hidden,
        out_hidden_size=hidden,
        intermediate_size=2 * hidden,
        window_size=2 * 2 * patch_size,
        fullatt_block_indexes=[layers - 1],
    )


def build(
    kind: Kind = "qwen2_vl",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    patch_size: int = 4,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
) -> tuple[Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration, ProcessorMixin]:
    """A random tiny Qwen2-VL (`kind="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`), eval mode, eager attention.

    `hidden`, `layers` and `heads` size both the vision tower and the decoder. Images are resized to
    multiples of 2·`patch_size` within [`min_pixels`, `max_pixels`]; each 2×2 patches are one token.
    """
    config_cls, model_cls, processor_cls = _CLASSES[kind]
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(hidden // heads)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = config_cls(
        text_config=text,
        vision_config=_vision_config(kind, hidden, layers, heads, patch_size),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    stop_at_qwen_end_tokens(model, ids)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    processor = image_only(processor_cls)(  # type: ignore[arg-type]  # type[X] is hashable (python/mypy#20409)
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    return model, processor


def build_qwen2_vl(seed: int = 0, **sizes: Any):
    """A random tiny Qwen2-VL and its processor (`build`)."""
    return build("qwen2_vl", seed=seed, **sizes)


def build_qwen2_5_vl(seed: int = 0, **sizes: Any):
    """A random tiny Qwen2.5-VL and its processor (`build`)."""
    return build("qwen2_5_vl", seed=seed, **sizes)
