"""Tiny random LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, llava-onevision-qwen2 layout), built
offline.

Same classes, config layout, processor and chat-template format as `llava-hf/llava-onevision-qwen2-7b-ov-hf`,
only tiny: a SigLIP tower on 32-pixel tiles (no [CLS]: every patch is an image token), a Qwen2 decoder and a
word-level vocabulary, with small any-resolution pinpoints so that images are still split into tiles. Built and
saved without torchvision: the processor has no video processor (`processors.image_only`). Saved with
`save_pretrained`, it loads back like the real checkpoint (`AutoConfig`, the model class,
`notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer
from notice.testing.tiny_qwen import stop_at_qwen_end_tokens

# Ids in the real checkpoint's order; Qwen has no unknown token, but a word-level model needs one.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>")
# llava-onevision-qwen2's template, short: "<|im_start|>user <image>\n{text}<|im_end|><|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ '\n' + content['text'] }}{% endfor %}"
    "<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GRID_PINPOINTS = ((32, 32), (32, 64), (64, 32), (64, 64))


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: Sequence[Sequence[int]] = GRID_PINPOINTS,
) -> tuple[LlavaOnevisionForConditionalGeneration, ProcessorMixin]:
    """A random tiny LLaVA-OneVision (eval mode, eager attention) and its processor.

    `hidden`, `layers` and `heads` size both the SigLIP tower and the Qwen2 decoder; `image_size` is the
    tile side; `grid_pinpoints` are the any-resolution canvases (multiples of it).
    """
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    vision = SiglipVisionConfig(
        **tiny_layers(hidden, layers, heads), image_size=image_size, patch_size=patch_size, vision_use_head=False
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    pinpoints = [list(p) for p in grid_pinpoints]
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    stop_at_qwen_end_tokens(model, ids)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
