"""Small vision-language models built and trained from scratch on CPU on the synthetic dataset.

They have the exact architecture classes of `Salesforce/blip-vqa-base` (`BlipForQuestionAnswering`)
and `llava-hf/llava-1.5-7b-hf` (`LlavaForConditionalGeneration`), only tiny, and are saved with
`save_pretrained` so that the workflow loads them exactly like the real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from notice.synthetic import QUESTION_TEMPLATES, SUBJECT, TASK_VALUES

# The prompt of llava-1.5 (BRIEF §3); the toy LLaVA is trained on exactly this template.
LLAVA_PROMPT_TEMPLATE = "USER: <image>\n{question} Answer with one word. ASSISTANT:"

# Special tokens in id order, named as in the real checkpoints (BLIP's decoder starts from [DEC]).
BLIP_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# Standard CLIP normalisation, used by both toy image processors.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ToyModelConfig:
    """Architecture of a toy model (both families); defaults are the measured recipe (BRIEF §6)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2  # LLaVA (Llama) only
    text_intermediate: int = 256
    max_positions: int = 256
    # std 0.02 leaves the models on a long accuracy plateau; 0.06 trains reliably (BRIEF §6).
    initializer_range: float = 0.06
    seed: int = 0

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _words() -> list[str]:
    """Every plain word the questions, answers and the LLaVA template use, lowercased, sorted."""
    text = " ".join(
        [QUESTION_TEMPLATES[t].format(subject=SUBJECT, a="", b="") for t in QUESTION_TEMPLATES]
        + [LLAVA_PROMPT_TEMPLATE.replace("<image>", "").replace("{question}", "")]
        + [v for values in TASK_VALUES.values() for v in values]
    ).lower()
    # Split punctuation off words the way both tokenizers' pre-tokenizers do.
    words = pre_tokenizers.Whitespace().pre_tokenize_str(text)
    return sorted({w for w, _ in words})


def build_vocabulary(family: str) -> list[str]:
    """Tokens of the family's toy tokenizer in id order: its special tokens, then the words."""
    specials = {"blip": BLIP_SPECIAL_TOKENS, "llava": LLAVA_SPECIAL_TOKENS}[family]
    return list(specials) + _words()


def build_blip_tokenizer() -> BertTokenizer:
    vocab = {tok: i for i, tok in enumerate(build_vocabulary("blip"))}
    # `vocab=` (a dict or path); transformers 5 silently ignores `vocab_file=`.
    return BertTokenizer(vocab=vocab, bos_token="[DEC]")


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per word, so every option is a single token."""
    vocab = {tok: i for i, tok in enumerate(build_vocabulary("llava"))}
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


def build_blip(cfg: ToyModelConfig) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A randomly initialised toy `BlipForQuestionAnswering` and its processor."""
    tokenizer = build_blip_tokenizer()
    std = cfg.initializer_range
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            intermediate_size=cfg.text_intermediate,
            max_position_embeddings=cfg.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            initializer_range=std,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_intermediate,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            # BlipVisionConfig's own default is 1e-10 (position and class embeddings).
            initializer_range=std,
        ),
        projection_dim=cfg.text_hidden,
        initializer_range=std,
    )
    torch.manual_seed(cfg.seed)
    model = BlipForQuestionAnswering(config).eval()
    image_processor = BlipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_llava(
    cfg: ToyModelConfig, attn_implementation: str = "eager"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised toy `LlavaForConditionalGeneration` and its processor."""
    tokenizer = build_llava_tokenizer()
    std = cfg.initializer_range
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_intermediate,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
        initializer_range=std,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=cfg.n_patches,
        # The default -2 would feed only the first layer of a 2-layer tower to the projector.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        initializer_range=std,
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
