"""Tiny random LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-v1.6-mistral layout), built offline.

Same classes, config layout, processor and chat-template format as `llava-hf/llava-v1.6-mistral-7b-hf`,
only tiny: a CLIP tower on 32-pixel tiles, a Mistral decoder and a word-level vocabulary, with
small any-resolution pinpoints so that images are still split into tiles. Saved with
`save_pretrained`, it loads back like the real checkpoint (`AutoConfig`, the model class,
`notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer

# llava-v1.6-mistral's template, short: images first, then the text, inside [INST] ... [/INST].
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for content in message['content'] if content['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] }}{% endfor %}"
    " [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}"
)
# Mistral's instruction markers: single tokens, as in Mistral's v3 tokenizers.
INSTRUCTION_TOKENS = ("[INST]", "[/INST]")
GRID_PINPOINTS = ((32, 32), (32, 64), (64, 32))


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: Sequence[Sequence[int]] = GRID_PINPOINTS,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny LLaVA-NeXT (eval mode, eager attention) and its processor.

    `hidden`, `layers` and `heads` size both the CLIP tower and the Mistral decoder; `image_size`
    is the CLIP tile side; `grid_pinpoints` are the any-resolution canvases (multiples of it).
    """
    tokenizer = word_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        "<unk>",
        bos_token="<s>",
        added=INSTRUCTION_TOKENS,
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = CLIPVisionConfig(
        **tiny_layers(hidden, layers, heads),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pinpoints = [list(p) for p in grid_pinpoints]
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        # The default -2 would leave the last layer of a tiny tower unused.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor
