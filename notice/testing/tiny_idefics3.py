"""Tiny random Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

Same classes, config layout (SigLIP-style tower, pixel-shuffle connector, Llama decoder), processor and
chat-template format as `HuggingFaceTB/SmolVLM-Instruct` (and, for `kind="smolvlm"`, SmolVLM2), only
tiny: 16-pixel tiles of 4-pixel patches shuffled 2×2 into 4 image tokens per tile, images resized to a
longest edge of 32 pixels, so a 32×32 or 40×24 image is split into 2×2 tiles plus the global image (20
image tokens). The tokenizer is word-level (`llava_next_tiny.word_tokenizer`) with the family's image
markers as single tokens. Saved with `save_pretrained`, it loads back like the real checkpoints
(`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from notice.adapters.processors import image_only
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD
from notice.testing.tiny import tiny_layers, word_tokenizer

Kind = Literal["idefics3", "smolvlm"]

# The processor marks tile (i, j) of at most 6×6 tiles with <row_i_col_j>.
ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *ROW_COL_TOKENS,
)

# SmolVLM-Instruct's template: "User:<image>{question}<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_CLASSES: dict[str, tuple[type, type[PreTrainedModel], type, type[ProcessorMixin]]] = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor),
}


def build(
    kind: Kind = "idefics3",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tile: int = 16,
    patch_size: int = 4,
    scale_factor: int = 2,
    longest_edge: int = 32,
) -> tuple[Idefics3ForConditionalGeneration | SmolVLMForConditionalGeneration, ProcessorMixin]:
    """A random tiny Idefics3 (`kind="idefics3"`) or SmolVLM (`"smolvlm"`), eval mode, eager attention.

    `hidden`, `layers` and `heads` size both the vision tower and the decoder. Images are resized to a
    longest edge of `longest_edge` pixels, then split into `tile`-pixel tiles (plus the global image
    resized to one tile); each tile is (tile / patch_size / scale_factor)² image tokens.
    """
    config_cls, model_cls, image_processor_cls, processor_cls = _CLASSES[kind]
    tokenizer = word_tokenizer(
        SPECIAL_TOKENS,
        "<|endoftext|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        **tiny_layers(hidden, layers, heads),
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        **tiny_layers(hidden, layers, heads),
        image_size=tile,
        patch_size=patch_size,
    )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|im_end|>"]
    image_processor = image_processor_cls(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    # SmolVLM's processor takes a video processor (torchvision only): the image-only class drops it.
    videos = {"video_processor": None} if kind == "smolvlm" else {}
    processor = image_only(processor_cls)(  # type: ignore[arg-type]  # a class is hashable; mypy misreads it
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch_size // scale_factor) ** 2,
        chat_template=CHAT_TEMPLATE,
        **videos,
    )
    return model, processor


def build_idefics3(seed: int = 0, **sizes: Any):
    """A random tiny Idefics3 and its processor (`build`)."""
    return build("idefics3", seed=seed, **sizes)


def build_smolvlm(seed: int = 0, **sizes: Any):
    """A random tiny SmolVLM and its processor (`build`)."""
    return build("smolvlm", seed=seed, **sizes)
