"""The toy LLaVA of the embedded demo: `LlavaForConditionalGeneration` at toy size, its tokenizer and training step.

Same classes as `llava-hf/llava-1.5-7b-hf`, only tiny; trained by `notice.demo.toy_models.train` on the
llava-1.5 prompt.
"""

from __future__ import annotations

from typing import cast

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from notice.demo.toy_config import ToyModelConfig
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD, ToyFamily, build_vocabulary, pad_prompts

# The prompt of llava-1.5; the toy LLaVA is trained on exactly this template.
PROMPT_TEMPLATE = "USER: <image>\n{question} Answer with one word. ASSISTANT:"
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per word, so every option is a single token."""
    vocab = {tok: i for i, tok in enumerate(build_vocabulary(SPECIAL_TOKENS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama prepends <s> to every prompt.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        # Left padding keeps the answer position at -1 in batches (as llava-hf's processor does).
        padding_side="left",
    )
    return fast


def build_llava(
    cfg: ToyModelConfig, attn_implementation: str = "eager"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised toy `LlavaForConditionalGeneration` and its processor."""
    tokenizer = build_llava_tokenizer()
    vision = CLIPVisionConfig(projection_dim=cfg.vision_hidden, **cfg.vision_settings())
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=cfg.text_kv_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg.text_settings(),
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")),
        image_seq_length=cfg.n_patches,
        # The default -2 would feed only the first layer of a 2-layer tower to the projector.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        # Not in LlavaConfig's signature: kept as an attribute, which the weight initialisation reads.
        initializer_range=cfg.initializer_range,  # type: ignore[call-arg]
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor


class LlavaToy(ToyFamily):
    special_tokens = SPECIAL_TOKENS
    prompt_template = PROMPT_TEMPLATE
    default_steps = 3200
    generate_returns_prompt = True

    def build(
        self, cfg: ToyModelConfig, training: bool = False
    ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
        # SDPA trains the toy LLaVA about twice as fast as eager on CPU; the saved weights load with either.
        return build_llava(cfg, attn_implementation="sdpa" if training else "eager")

    def end_token_id(self, tokenizer) -> int:
        return tokenizer.eos_token_id

    def two_step_logits(
        self, model, prompt_ids: list[list[int]], pixels: torch.Tensor, answer_ids: torch.Tensor, tokenizer
    ) -> torch.Tensor:
        # Prompt then the answer token; left padding puts both scored positions at the end.
        ids, mask = pad_prompts(
            [p + [int(a)] for p, a in zip(prompt_ids, answer_ids)], tokenizer.pad_token_id, left=True
        )
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=2).logits
