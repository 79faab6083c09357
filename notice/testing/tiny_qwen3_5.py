"""Tiny random Qwen3.5 (`Qwen3_5ForConditionalGeneration`), built offline.

Same classes, config layout (Qwen3-VL-style tower without DeepStack, a hybrid language model whose
`layer_types` alternate gated-delta-rule linear attention and gated full attention, interleaved mRoPE on a
quarter of the head), processor (`Qwen3VLProcessor` over the Qwen2-VL PIL image processor, 16-pixel patches
merged 2×2) and chat-template format as `Qwen/Qwen3.5-27B`, only tiny: 4 layers (linear, full, linear,
full), 4-pixel patches and at most 64×64 pixels per image, so an image is tens of tokens.

Qwen3.5's tokenizer class (`Qwen3_5Tokenizer`) rebuilds a byte-level BPE from the saved vocabulary and
merges on load, whatever class the directory names, so a word-level vocabulary would come back merging
words: the tokenizer here is a byte-level BPE trained offline on the tiny vocabulary's words (every word
the tests ask about, with its leading space, is one token). Built and saved without torchvision: the
processor has no video processor (`processors.image_only`).
"""

from __future__ import annotations

import json
from typing import Any, cast

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.testing.tiny import WORDS
from notice.testing.tiny_qwen import qwen_chat_template, stop_at_qwen_end_tokens

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
THINK = ("<think>", "</think>")  # ordinary added tokens in the real vocabulary

# Qwen3.5's template, short: no default system turn, images in place, and the generation prompt with an
# empty thinking block when `enable_thinking` is false (the real template's non-thinking answer prompt).
CHAT_TEMPLATE = qwen_chat_template(thinking_switch=True)


def byte_level_tokenizer(vocab_size: int = 600) -> Qwen3_5Tokenizer:
    """Qwen3.5's tokenizer over a byte-level BPE trained on WORDS (each alone, after a space and capitalised, so
    that " red" and "Red" are one token each), with the real special tokens."""
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.NFC()
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    corpus = [text for word in WORDS for text in (word, " " + word, word.capitalize(), " " + word.capitalize())]
    trainer_model.train_from_iterator(corpus * 4, trainer=trainer)
    trained = trainer_model.model
    vocab: dict[str, int] = trainer_model.get_vocab()
    merges = _merges(trained)
    tokenizer = Qwen3_5Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # `tokenizers`' BPE takes (left, right) pairs
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.add_tokens(list(THINK))
    cast(Tokenizer, tokenizer._tokenizer).decoder = decoders.ByteLevel()
    return tokenizer


def _merges(model: Any) -> list[tuple[str, str]]:
    """The merges of a trained `tokenizers` BPE model, in rank order."""
    state = json.loads(Tokenizer(model).to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state]


def build(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    patch_size: int = 4,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
    layer_types: list[str] | None = None,
    moe: bool = False,
) -> tuple[Qwen3_5ForConditionalGeneration | Qwen3_5MoeForConditionalGeneration, ProcessorMixin]:
    """A random tiny Qwen3.5 (`moe`: Qwen3.5-MoE, whose MLPs are 4 experts, 2 per token, plus a gated shared
    expert), eval mode, eager attention, and its processor.

    The language model alternates linear and full attention (`layer_types`, default linear first, as the real
    three-linear-then-one-full pattern starts); full attention has `heads` query heads of 16 dims (rotary on
    half of them), linear attention 2 key and 4 value heads of 8 dims with a 4-wide causal convolution. Images
    are resized to multiples of 2·`patch_size` within [`min_pixels`, `max_pixels`]; each 2×2 patches are one
    token.
    """
    tokenizer = byte_level_tokenizer()
    ids = {tok: cast(int, tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}
    layer_types = layer_types or ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    mlp = (
        dict(moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2)
        if moe
        else dict(intermediate_size=2 * hidden)
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        **mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_conv_kernel_dim=4,
        layer_types=layer_types,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_heads=heads,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=64,
    )
    config_cls, model_cls = (
        (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
        if moe
        else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # the zero-centred RMSNorm weights and A_log are initialised flat: vary them
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("A_log") or name.endswith("dt_bias"):
                parameter.normal_(0.0, 0.3)
    stop_at_qwen_end_tokens(model, ids)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    processor = image_only(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    return model, processor


def build_moe(seed: int = 0, **sizes: Any):
    """A random tiny Qwen3.5-MoE and its processor (`build`)."""
    return build(seed=seed, moe=True, **sizes)
