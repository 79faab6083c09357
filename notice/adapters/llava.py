"""LLaVA (`LlavaForConditionalGeneration`): CLIP ViT → projector → image tokens spliced into a Llama prompt.

The patched stream is the language model (`model.model.language_model`, pre-RMSNorm Llama layers);
the fusion heads are its self-attention query heads (grouped-query attention is fine: the input of
`o_proj` has one slice per query head). The answer score is the next-token logits at the last prompt
position.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, VLMAdapter, register


@register
class LlavaAdapter(VLMAdapter):
    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    model_class: ClassVar[type] = LlavaForConditionalGeneration
    default_prompt_template: ClassVar[str] = "USER: <image>\n{question} Answer with one word. ASSISTANT:"
    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn")
    head_site: ClassVar[str] = "self_attn_head"

    @property
    def _layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def n_heads(self) -> int:
        return self.model.config.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self._layers[0].self_attn.head_dim

    # -- inputs -----------------------------------------------------------------------------
    def prepare(self, image: Image.Image, prompt: str) -> ModelInput:
        enc = self.processor(images=image, text=prompt, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        return ModelInput(
            input_ids=input_ids,
            attention_mask=enc["attention_mask"].to(self.device),
            pixel_values=enc["pixel_values"].to(self.device, self.dtype),
            tokens=self.processor.tokenizer.convert_ids_to_tokens(input_ids[0].tolist()),
        )

    def option_token_id(self, option: str) -> int:
        """First token of `option` generated right after the prompt.

        Rule: tokenise the template's text after "{question}" (e.g. " Answer with one word.
        ASSISTANT:") alone and followed by " " + option; the first token past the common prefix is
        the answer token. With Llama's sentencepiece-style tokenizer this is the space-prefixed word
        piece ("▁red"), which is what the model emits after "ASSISTANT:", not the bare "red".
        """
        tokenizer = self.processor.tokenizer
        context = self.prompt_template.split("{question}")[-1]
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(context + " " + option, add_special_tokens=False)["input_ids"]
        if full_ids[: len(ctx_ids)] != ctx_ids or len(full_ids) <= len(ctx_ids):
            raise ValueError(
                f"option {option!r} does not tokenise as a continuation of {context!r}: "
                f"{tokenizer.convert_ids_to_tokens(ctx_ids)} vs {tokenizer.convert_ids_to_tokens(full_ids)}"
            )
        return int(full_ids[len(ctx_ids)])

    def patch_positions(self, inp: ModelInput) -> list[int]:
        is_text = inp.input_ids[0] != self.model.config.image_token_id
        return torch.nonzero(is_text).flatten().tolist()

    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        # The last prompt token ("ASSISTANT:" / ":") carries the effect in LLaVA (paper).
        return inp.input_ids.shape[1] - 1

    # -- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def answer_logits(self, inp: ModelInput) -> torch.Tensor:
        out = self.model(
            input_ids=inp.input_ids,
            attention_mask=inp.attention_mask,
            pixel_values=inp.pixel_values,
            logits_to_keep=1,
        )
        return out.logits[0, -1].float()

    @torch.no_grad()
    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        tokenizer = self.processor.tokenizer
        out = self.model.generate(
            input_ids=inp.input_ids,
            attention_mask=inp.attention_mask,
            pixel_values=inp.pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_ids = out[0, inp.input_ids.shape[1]:].tolist()
        return tokenizer.decode(new_ids, skip_special_tokens=True).strip()

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        block = self._layers[layer]
        site = HEAD_SITE_PARENT.get(site, site)
        if site == "mlp":
            return block.mlp, "output"
        if site == "self_attn":
            return block.self_attn.o_proj, "input"
        if site == "layer":
            return block, "output"
        raise ValueError(f"unknown LLaVA site {site!r}")

    def image_embedding_module(self) -> torch.nn.Module:
        # The projector's output is exactly what is spliced into the image-token positions.
        return self.model.model.multi_modal_projector
