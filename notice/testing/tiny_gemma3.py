"""Tiny random Gemma 3 (`Gemma3ForConditionalGeneration`), built offline.

Same classes, config layout, processor and chat-template format as `google/gemma-3-4b-it`, only tiny: a SigLIP
tower on 32-pixel images of 4-pixel patches (8×8 patches, average-pooled 2×2 into 16 image tokens), a Gemma 3
decoder of three layers alternating sliding-window and global attention (the real pattern is five to one; three,
so that what a patch at an image token sends back to the image's earlier tokens one layer later reaches the score
in the next), and a word-level vocabulary with Gemma's first ids, its turn and image markers and the newlines the
processor writes around the image (`"\\n\\n<start_of_image>"`, the soft tokens, `"<end_of_image>\\n\\n"`). The
window is longer than a tiny prompt, as the real one (1024 tokens) is longer than a prompt; `sliding_window`
shortens it. The projector, which Gemma 3 initialises to zeros, is random. Saved with `save_pretrained`, it loads
back like the real checkpoint (`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from notice.testing.tiny import tiny_layers, word_tokenizer

# Gemma's first ids, then the turn and image markers.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
# Tokens of Gemma's vocabulary: line ends, the image's surroundings, and "user\n" + "\n\n<start_of_image>".
NEWLINES = ("\n", "\n\n", "\n\n\n")
ROLE_WORDS = ("model",)  # the assistant's role in Gemma's turns; "user" is a word already
# gemma-3-4b-it's template, short (no system turn): BOS, turns of user and model, the image's placeholder.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
    tokens_per_image: int = 16,
    sliding_window: int = 128,
    **text: Any,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A random tiny Gemma 3 (eval mode, eager attention) and its processor.

    `hidden`, `layers` and `heads` size both the SigLIP tower and the decoder; layers alternate sliding-window
    (`sliding_window` tokens) and global attention, starting with a sliding one; the tower's patches are
    average-pooled into `tokens_per_image` (a square) image tokens. `text` overrides the decoder's config.
    """
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        bos_token="<bos>",
        added=NEWLINES,
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Whole words only: an added token would otherwise also match inside words.
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in ROLE_WORDS])
    ids = {token: cast(int, tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    text_config = Gemma3TextConfig(
        **{
            "vocab_size": len(tokenizer),
            **tiny_layers(hidden, layers, heads),
            "num_key_value_heads": kv_heads,
            "head_dim": hidden // heads,
            "query_pre_attn_scalar": hidden // heads,
            "sliding_window": sliding_window,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "max_position_embeddings": 512,
            "pad_token_id": ids["<pad>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "bos_token_id": ids["<bos>"],
            **text,
        }
    )
    vision = SiglipVisionConfig(
        **tiny_layers(hidden, layers, heads), image_size=image_size, patch_size=patch_size, vision_use_head=False
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    # Gemma 3 initialises its projector to zeros (the image would not reach the text); random as the other weights.
    projection = model.get_parameter("model.multi_modal_projector.mm_input_projection_weight")
    torch.nn.init.normal_(projection, std=text_config.initializer_range)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    return model, processor
