"""Tiny random Mistral 3 (`Mistral3ForConditionalGeneration`, Mistral-Small-3.1 layout), built offline.

Same classes, config layout (Pixtral tower with 2-D RoPE, RMS norm + 2×2 patch merger + MLP projector, Mistral
decoder), processor (`PixtralProcessor` over the PIL Pixtral image processor, `spatial_merge_size` 2) and
chat-template shape as `mistralai/Mistral-Small-3.1-24B-Instruct-2503`, only tiny: 4-pixel patches merged 2×2
into one image token per 8×8 pixels, images resized to at most 32 pixels a side (keeping their aspect ratio,
rounded up to whole tokens), so a 40×24 image is 3 rows of 4 `[IMG]` tokens, each row followed by `[IMG_BREAK]`,
the last by `[IMG_END]`. Built and saved without torchvision: the processor class comes through
`processors.processor_class`. Saved with `save_pretrained`, it loads back like the real checkpoint (`AutoConfig`,
the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import processor_class
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer

# Mistral's control tokens (special, as in the Tekken tokenizer), its padding token last.
SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "<pad>",
)

# Mistral-Small-3.1's template, short: BOS, the system prompt (a default one when the conversation has none; the
# real default also holds the current date), then the user's turn inside [INST] ... [/INST] with [IMG] where an
# image is.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'][0]['text'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = 'you are a helpful assistant.' %}{% set loop_messages = messages %}{% endif %}"
    "[SYSTEM_PROMPT]{{ system }}[/SYSTEM_PROMPT]"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] == 'image' %}[IMG]{% endif %}"
    "{% endfor %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    patch_size: int = 4,
    longest_edge: int = 32,
) -> tuple[Mistral3ForConditionalGeneration, ProcessorMixin]:
    """A random tiny Mistral 3 (eval mode, eager attention) and its processor.

    `hidden`, `layers` and `heads` size both the Pixtral tower and the Mistral decoder. Images are resized to at
    most `longest_edge` pixels a side and cut into `patch_size` patches, merged 2×2 into image tokens.
    """
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    vision = PixtralVisionConfig(**tiny_layers(hidden, layers, heads), patch_size=patch_size, image_size=longest_edge)
    text = MistralConfig(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("[IMG]")),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": longest_edge},
        patch_size={"height": patch_size, "width": patch_size},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = processor_class("PixtralProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        spatial_merge_size=2,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
