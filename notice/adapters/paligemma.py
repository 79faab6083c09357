"""PaliGemma and PaliGemma 2 (`PaliGemmaForConditionalGeneration`): SigLIP → linear projector → image
tokens before a Gemma (PaliGemma 2: Gemma 2) prompt, with prefix-LM attention.

Written for `google/paligemma-3b-mix-224` and `google/paligemma2-3b-mix-224` / `-448`. The processor
builds the prompt itself: the image tokens, BOS, the text, and a newline after which the model answers
(`<image>`×256 `<bos>answer en {question}\\n` at 224 px). Every prompt token is prefix (`token_type_ids`
0): attention is bidirectional over the image and the prompt, so a patched position changes the
positions before it too, and the fast engine is `prefix_lm`, not the causal decoder engine. Gaussian
noise is applied to the projector's output (the image tokens). PaliGemma 2's final logits are
soft-capped, as the model's own head does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class PaliGemmaAdapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = PaliGemmaForConditionalGeneration
    # The mix checkpoints' VQA task prefix; "<image>" marks where the processor puts the image tokens
    # (without it the processor infers the same layout and logs a warning on every prompt).
    default_prompt_template: ClassVar[str | None] = "<image>answer en {question}"

    def answer_context(self) -> str:
        # The processor ends every prompt with a newline; the answer follows it.
        return super().answer_context() + "\n"

    def prepare(self, image: Image.Image, prompt: str) -> ModelInput:
        inp = super().prepare(image, prompt)
        # Training targets the processor adds to its output: the forward would compute a loss from them.
        inp.extra.pop("labels", None)
        return inp

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """One image token per SigLIP patch of the square image, row-major."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        keys = self.image_positions(inp)
        if len(keys) != side * side:
            raise ValueError(f"paligemma: {len(keys)} image tokens for a {side}×{side} patch grid")
        return ImageGrid(tuple(keys), side, side)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        norm, head = self.float32_module(self.head_input_module()), self.float32_module(self.lm_head)
        logits = head(norm(self.head_input(hidden)))
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:  # PaliGemma 2 (Gemma 2), in the head's dtype as the model's head does
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
