"""The toy BLIP of the embedded demo: `BlipForQuestionAnswering` at toy size, its tokenizer and training step.

Same classes as `Salesforce/blip-vqa-base`, only tiny; trained by `notice.demo.toy_models.train`.
"""

from __future__ import annotations

import torch
from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from notice.demo.toy_config import ToyModelConfig
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD, ToyFamily, build_vocabulary, pad_prompts

# Special tokens in id order, named as in the real checkpoint (BLIP's decoder starts from [DEC]).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def build_blip_tokenizer() -> BertTokenizer:
    vocab = {tok: i for i, tok in enumerate(build_vocabulary(SPECIAL_TOKENS))}
    # `vocab=` (a dict or path); transformers 5 silently ignores `vocab_file=`.
    return BertTokenizer(vocab=vocab, bos_token="[DEC]")


def build_blip(cfg: ToyModelConfig) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A randomly initialised toy `BlipForQuestionAnswering` and its processor."""
    tokenizer = build_blip_tokenizer()
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            **cfg.text_settings(),
        ),
        vision_config=cfg.vision_settings(),
        projection_dim=cfg.text_hidden,
        initializer_range=cfg.initializer_range,
    )
    torch.manual_seed(cfg.seed)
    model = BlipForQuestionAnswering(config).eval()
    image_processor = BlipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def blip_decoder_logits(
    model: BlipForQuestionAnswering,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    decoder_input_ids: torch.Tensor,
) -> torch.Tensor:
    """Decoder logits [B, L, V]; `[:, 0]` is the first answer step (decoder input [DEC]), which
    `BlipForQuestionAnswering.forward` computes but does not return."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    question = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
    ).last_hidden_state
    return model.text_decoder(
        input_ids=decoder_input_ids, encoder_hidden_states=question, encoder_attention_mask=attention_mask
    ).logits


class BlipToy(ToyFamily):
    special_tokens = SPECIAL_TOKENS
    prompt_template = "{question}"
    default_steps = 2000
    generate_returns_prompt = False

    def build(self, cfg: ToyModelConfig, training: bool = False) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
        return build_blip(cfg)

    def end_token_id(self, tokenizer) -> int:
        return tokenizer.sep_token_id

    def two_step_logits(
        self, model, prompt_ids: list[list[int]], pixels: torch.Tensor, answer_ids: torch.Tensor, tokenizer
    ) -> torch.Tensor:
        ids, mask = pad_prompts(prompt_ids, tokenizer.pad_token_id, left=False)
        bos = torch.full_like(answer_ids, tokenizer.bos_token_id)
        return blip_decoder_logits(model, ids, mask, pixels, torch.stack([bos, answer_ids], 1))[:, :2]
