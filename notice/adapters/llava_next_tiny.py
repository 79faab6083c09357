"""Tiny random LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-v1.6-mistral layout), built offline.

Same classes, config layout, processor and chat-template format as `llava-hf/llava-v1.6-mistral-7b-hf`,
only tiny: a CLIP tower on 32-pixel tiles, a Mistral decoder and a word-level vocabulary, with
small any-resolution pinpoints so that images are still split into tiles. Saved with
`save_pretrained`, it loads back like the real checkpoint (`AutoConfig`, the model class,
`notice.adapters.processors.load_processor`). Also home of the word-level tokenizer that the
tiny Qwen2-VL builder shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from notice.demo.toy_models import IMAGE_MEAN, IMAGE_STD, build_vocabulary

# Every word of the synthetic questions and of the chat templates (lowercased: the normaliser
# lowercases), plus the punctuation the Whitespace pre-tokenizer splits off words.
WORDS: tuple[str, ...] = tuple(
    sorted(
        set(build_vocabulary(()))  # the toy models' words
        | {
            "red",
            "green",
            "blue",
            "yellow",
            "purple",
            "circle",
            "square",
            "triangle",
            "cross",
            "object",
            "shape",
            "colour",
            "is",
            "the",
            "or",
            "what",
            "answer",
            "with",
            "one",
            "word",
            "user",
            "assistant",
            "system",
            "you",
            "are",
            "a",
            "helpful",
            "?",
            ".",
            ":",
            ",",
        }
    )
)

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


def tiny_layers(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    """The size fields of a tiny transformer config (vision tower or language model), MLP twice as wide."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads)


def word_tokenizer(
    specials: Sequence[str],
    unk_token: str,
    bos_token: str | None = None,
    added: Sequence[str] = (),
    **special_tokens: str | Mapping[str, str],
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `specials` + `added` + WORDS: every word and option is one token.

    Saved as a generic `PreTrainedTokenizerFast` because the family classes (LlamaTokenizer,
    Qwen2Tokenizer) rebuild a BPE model from the vocabulary on load. Whitespace, newlines included,
    gives no token. `bos_token` is prepended to every encoding, as Llama/Mistral do.
    """
    vocab = {tok: i for i, tok in enumerate([*specials, *added, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", special_tokens=[(bos_token, vocab[bos_token])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        bos_token=bos_token,
        # Left padding keeps the answer position at -1 in batches (as the llava-hf and Qwen processors do).
        padding_side="left",
        **special_tokens,
    )


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
