"""Tiny random Llama 3.2 Vision (`MllamaForConditionalGeneration`), built offline.

Same classes, config layout (a tiled vision tower with local and gated global layers whose intermediate
layers are concatenated to its output, a linear projector, a Llama decoder whose cross-attention layers
read the projected image), processor (`MllamaProcessor` over the PIL `MllamaImageProcessorPil`: no
torchvision) and chat-template shape as `meta-llama/Llama-3.2-11B-Vision-Instruct`, only tiny: 32-pixel tiles
of 8-pixel patches (16 patches and a [CLS] per tile) and at most 4 tiles, so the decoder's cross-attention
reads 4 × 17 image keys (padding tiles included, as the model pads every image to `max_num_tiles`). The
cross-attention layers' tanh gates start at zero in a fresh model (the layer is then the identity); the
builder draws them, so the image reaches the text. Saved with `save_pretrained`, it loads back like the
real checkpoint (`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_all_supported_aspect_ratios,
)

from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer

IMAGE_TOKEN = "<|image|>"
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    IMAGE_TOKEN,
    "<unk>",
)

# Llama 3.2 Vision Instruct's template, short: the image's one placeholder where the user's turn shows it, header
# tokens around each role, `<|eot_id|>` after each turn (the real one adds no system turn when an image is given).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def draw_gates(model: MllamaForConditionalGeneration, seed: int) -> None:
    """Every tanh gate of the decoder's cross-attention layers ~ U(0.5, 1.5) (a fresh model's are 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 4,
    cross_attention_layers: tuple[int, ...] = (1, 3),
    heads: int = 4,
    kv_heads: int = 2,
    tile: int = 32,
    patch_size: int = 8,
    max_tiles: int = 4,
) -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    """A random tiny Mllama (eval mode, eager attention) and its processor.

    `hidden` and `heads` size both the vision tower (`layers` local layers, one global layer) and the decoder
    (`layers` layers, those in `cross_attention_layers` cross-attention layers). Images are resized onto a canvas
    of at most `max_tiles` tiles of `tile` pixels.
    """
    tokenizer = word_tokenizer(SPECIAL_TOKENS, "<unk>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    # The chat template writes `<|begin_of_text|>` itself (the processor adds it to a prompt without one).
    tokenizer.bos_token = "<|begin_of_text|>"
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        cross_attention_layers=list(cross_attention_layers),
        max_position_embeddings=512,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    intermediate = [0]
    vision: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_global_layers=1,
        attention_heads=heads,
        image_size=tile,
        patch_size=patch_size,
        max_num_tiles=max_tiles,
        intermediate_layers_indices=intermediate,
        vision_output_dim=hidden * (1 + len(intermediate)),
        supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(max_tiles)],
    )
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids[IMAGE_TOKEN])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    draw_gates(model, seed)
    model.generation_config.eos_token_id = [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    model.generation_config.pad_token_id = ids["<|finetune_right_pad_id|>"]
    image_processor = MllamaImageProcessorPil(
        size={"height": tile, "width": tile}, max_image_tiles=max_tiles, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor
