"""Tiny random BLIP-2 / InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`).

Same classes, config layout and processors as `Salesforce/blip2-opt-2.7b` (an OPT language model) and
`Salesforce/instructblip-vicuna-7b` (a Llama one; its Q-Former also reads the prompt through a BERT
tokenizer), only tiny: a ViT on 32-pixel images with 8-pixel patches (a 4×4 grid), a Q-Former of 3
layers with cross-attention every 2nd layer (as in the real ones) and 4 query tokens, a 2-layer
language model and word-level vocabularies. The processor puts one `<image>` token per query in front
of the prompt. Saved with `save_pretrained`, it loads back like the real checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import WORDS, tiny_layers, word_tokenizer

Kind = Literal["blip2", "instructblip"]

# Prompt words the shared word list lacks ("Question: ... Answer:", "Short answer:").
PROMPT_WORDS = ("question", "short")
# Special tokens in the real tokenizers' id order (OPT's GPT-2 BPE; Vicuna's Llama sentencepiece).
OPT_SPECIALS = ("<pad>", "</s>", "<unk>")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _language_model(kind: Kind, tokenizer, hidden: int, layers: int, heads: int) -> OPTConfig | LlamaConfig:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    if kind == "blip2":
        return OPTConfig(**common, ffn_dim=2 * hidden, word_embed_proj_dim=hidden, do_layer_norm_before=True)
    return LlamaConfig(**common, intermediate_size=2 * hidden, num_key_value_heads=heads // 2)


def distinct_queries(model: torch.nn.Module) -> None:
    """Random query tokens: transformers initialises them to zero, which makes every query the same."""
    with torch.no_grad():
        torch.nn.init.normal_(cast(torch.Tensor, model.query_tokens), std=0.02)


def build(
    kind: Kind = "blip2",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    qformer_layers: int = 3,
    query_tokens: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
) -> tuple[
    Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration, Blip2Processor | InstructBlipProcessor
]:
    """A random tiny BLIP-2 (`kind="blip2"`, OPT) or InstructBLIP (`"instructblip"`, Llama), eval mode,
    eager attention, and its processor. `hidden`, `layers` and `heads` size the vision tower, the
    Q-Former and the language model alike."""
    specials, bos = (OPT_SPECIALS, "</s>") if kind == "blip2" else (LLAMA_SPECIALS, "<s>")
    tokenizer = word_tokenizer(
        specials, "<unk>", bos_token=bos, added=PROMPT_WORDS, eos_token="</s>", pad_token="<pad>"
    )
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    qformer = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=qformer_layers,
        num_attention_heads=heads,
        cross_attention_frequency=2,
    )
    # The processors add the `<image>` token to the tokenizer, at the end of the vocabulary as in the real ones.
    processor: Blip2Processor | InstructBlipProcessor
    config_cls: type[Blip2Config | InstructBlipConfig]
    model_cls: type[Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration]
    if kind == "blip2":
        config_cls, model_cls = Blip2Config, Blip2ForConditionalGeneration
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=query_tokens)
    else:
        config_cls, model_cls = InstructBlipConfig, InstructBlipForConditionalGeneration
        qformer_vocab = {tok: i for i, tok in enumerate([*BERT_SPECIALS, *PROMPT_WORDS, *WORDS])}
        qformer["vocab_size"] = len(qformer_vocab)
        # `vocab=` (a dict or path); transformers 5 silently ignores `vocab_file=`.
        processor = InstructBlipProcessor(
            image_processor, tokenizer, BertTokenizer(vocab=qformer_vocab), num_query_tokens=query_tokens
        )
    vision = dict(
        **tiny_layers(hidden, layers, heads),
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.02,  # the config's default, 1e-10, gives a tower whose output ignores the image
    )
    config = config_cls(
        vision_config=vision,
        qformer_config=qformer,
        text_config=_language_model(kind, tokenizer, hidden, layers, heads).to_dict(),
        num_query_tokens=query_tokens,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")),
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    distinct_queries(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def build_blip2(seed: int = 0, **sizes: Any):
    """A random tiny BLIP-2 and its processor (`build`)."""
    return build("blip2", seed=seed, **sizes)


def build_instructblip(seed: int = 0, **sizes: Any):
    """A random tiny InstructBLIP and its processor (`build`)."""
    return build("instructblip", seed=seed, **sizes)
