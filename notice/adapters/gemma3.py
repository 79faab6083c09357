"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP → average pooling → linear projector → image tokens inside a
Gemma 3 chat prompt, attended to bidirectionally within the image.

Written for `google/gemma-3-4b-it` (also `-12b-it` / `-27b-it`). The prompt is the processor's chat template,
"<start_of_turn>user\\n<start_of_image>{question}<end_of_turn>\\n<start_of_turn>model\\n", whose leading "<bos>" is
left to the tokenizer (it adds one to every prompt: one BOS, as the processor's own `apply_chat_template` gives,
whoever calls the processor). The processor expands `<start_of_image>` into "\\n\\n<start_of_image>", the image's
soft tokens (256 at 896 px: SigLIP's 64×64 patches average-pooled 4×4, row-major) and "<end_of_image>\\n\\n"; the
markers and newlines are patched text positions. `token_type_ids` (1 at the soft tokens) reaches the model, which
then lets the image's tokens attend to each other in both directions; text is causal, and five of every six layers
attend within a sliding window (1024 tokens: longer than a prompt). So a patch at an image token reaches the
image's earlier tokens one layer later, and the fast engine is the block-causal one. Gaussian noise is applied to
the projector's output (the image tokens). Final logits are soft-capped where the config says so (Gemma 3's
checkpoints do not).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import Gemma3ForConditionalGeneration

from notice.adapters.base import ImageGrid, ModelInput
from notice.adapters.decoder import DecoderVLMAdapter


class Gemma3Adapter(DecoderVLMAdapter):
    model_class: ClassVar[type] = Gemma3ForConditionalGeneration
    default_prompt_template: ClassVar[str | None] = None

    def image_embedding_module(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """One image token per pooled cell of the square image, row-major."""
        side = int(self.model.model.multi_modal_projector.tokens_per_side)
        keys = self.image_positions(inp)
        if len(keys) != side * side:
            raise ValueError(
                f"{self.family}: {len(keys)} image tokens for one {side}×{side} image (pan-and-scan crops are not "
                "supported: one image, do_pan_and_scan off)"
            )
        return ImageGrid(tuple(keys), side, side)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        norm, head = self.float32_module(self.head_input_module()), self.float32_module(self.lm_head)
        logits = head(norm(self.head_input(hidden)))
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:  # in the head's dtype, as the model's head does
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
