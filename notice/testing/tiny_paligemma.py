"""Tiny random PaliGemma / PaliGemma 2 (`PaliGemmaForConditionalGeneration`), built offline.

Same classes, config layout, processor and prompt format as `google/paligemma-3b-mix-224` (Gemma) and
`google/paligemma2-3b-mix-224` (Gemma 2: soft-capped attention and final logits, sliding-window layers),
only tiny: a SigLIP tower on 32-pixel images with 8-pixel patches (16 image tokens), a word-level
vocabulary with the newline the processor ends prompts with as a token (as in Gemma's vocabulary),
and the processor's `<loc>` / `<seg>` tokens. Saved with `save_pretrained`, it loads back like the
real checkpoints (`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from notice.testing.tiny import tiny_layers, word_tokenizer

Kind = Literal["paligemma", "paligemma2"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")  # Gemma's first ids, then the image token
TASK_WORDS = ("en",)  # the mix checkpoints' task prefix "answer en"; "answer" is a word already


def _text_config(kind: Kind, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, **text: Any):
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if kind == "paligemma":
        return GemmaConfig(**common, **text)
    # Gemma 2's layout (sliding / full layers alternate); the window is shorter than a tiny prompt.
    return Gemma2Config(**{**common, "query_pre_attn_scalar": hidden // heads, "sliding_window": 8, **text})


def build(
    seed: int = 0,
    kind: Kind = "paligemma",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 1,
    image_size: int = 32,
    patch_size: int = 8,
    **text: Any,
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A random tiny PaliGemma (`kind="paligemma"`, Gemma) or PaliGemma 2 (`"paligemma2"`, Gemma 2) in
    eval mode with eager attention, and its processor.

    `hidden`, `layers` and `heads` size both the SigLIP tower and the decoder (`kv_heads` key/value
    heads: 1 is PaliGemma's multi-query attention); `text` overrides the decoder's config (e.g.
    `attn_logit_softcapping`, `final_logit_softcapping`, `sliding_window`).
    """
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<unk>",
        added=("\n",),
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.bos_token = "<bos>"  # the processor writes it after the image tokens itself
    # Whole words only: an added token would otherwise also match inside words ("gre|en").
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in TASK_WORDS])
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_seq_length=(image_size // patch_size) ** 2,
    )
    # The processor adds the <loc> / <seg> tokens to the tokenizer: size the vocabulary after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(tokenizer)
    vision = SiglipVisionConfig(
        **tiny_layers(hidden, layers, heads),
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=_text_config(kind, vocab, hidden, layers, heads, kv_heads, **text),
        image_token_index=processor.image_token_id,
        vocab_size=vocab,
        projection_dim=hidden,
        hidden_size=hidden,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
