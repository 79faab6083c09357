"""Tiny random InternVL (`InternVLForConditionalGeneration`, InternVL3-hf layout), built offline.

Same classes, config layout (InternViT-style tower, pixel-shuffle projector, Qwen2 decoder), processor
(`InternVLProcessor` over the GotOcr2 tiling image processor) and chat-template format as
`OpenGVLab/InternVL3-8B-hf`, only tiny: 32-pixel tiles of 4-pixel patches (8×8 patches shuffled 2×2 into
4×4 = 16 image tokens per tile) and at most 4 tiles, so a 40×24 image is cut into 2×1 tiles plus the
thumbnail (48 image tokens between `<img>` and `</img>`). Built and saved without torchvision: the
processor has no video processor (`processors.image_only`). Saved with `save_pretrained`, it loads back
like the real checkpoint (`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer
from notice.testing.tiny_qwen import stop_at_qwen_end_tokens

# Qwen has no unknown token, but a word-level model needs one.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<unk>")

# InternVL3-hf's template, short: the image's placeholder and a newline before the text, chatml turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tile: int = 32,
    patch_size: int = 4,
    max_patches: int = 4,
) -> tuple[InternVLForConditionalGeneration, ProcessorMixin]:
    """A random tiny InternVL (eval mode, eager attention) and its processor.

    `hidden`, `layers` and `heads` size both the vision tower and the decoder. Images are cut into at most
    `max_patches` tiles of `tile` pixels (plus the thumbnail when there are several); each tile is
    (tile / patch_size / 2)² image tokens.
    """
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    text = dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(**tiny_layers(hidden, layers, heads), image_size=tile, patch_size=patch_size)
    tokens_side = tile // patch_size // 2
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=tokens_side**2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    stop_at_qwen_end_tokens(model, ids)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = image_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        image_seq_length=tokens_side**2,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
