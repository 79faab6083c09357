"""The model-adapter interface: everything the method needs to know about one architecture family.

Patching engines, evaluation and analysis talk to models only through this interface, so adding a
family means adding one adapter, never `if model == ...` branches elsewhere.

Sites (BRIEF §3), all at one token position of the text stream:
- ``mlp``: the MLP's output before it is added to the residual stream;
- ``self_attn`` / ``cross_attn``: the concatenated per-head attention outputs, i.e. the *input* of the
  attention block's output projection;
- ``self_attn_head`` / ``cross_attn_head``: one head's slice ``[h*d:(h+1)*d]`` of that same input;
- ``layer``: the layer's output (residual stream after the layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from PIL import Image

HEAD_SITE_PARENT = {"self_attn_head": "self_attn", "cross_attn_head": "cross_attn"}


@dataclass(frozen=True, order=True)
class Patch:
    """One patched run: copy the clean activation of `site` at (`layer`, `position`[, `head`])."""

    site: str
    layer: int
    position: int
    head: int = -1


@dataclass
class ModelInput:
    """One prompt with one image, tokenised by the model's own processor and on the model's device."""

    input_ids: torch.Tensor       # [1, T]
    attention_mask: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor    # [1, C, H, W]
    tokens: list[str]             # one display string per position of input_ids


class VLMAdapter(ABC):
    """One architecture family (BLIP-style cross-attention fusion, LLaVA-style token fusion)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # Hugging Face `config.model_type` values handled
    model_class: ClassVar[type]             # transformers class that `from_pretrained` loads
    default_prompt_template: ClassVar[str]  # "{question}" is replaced by the question

    def __init__(self, model: torch.nn.Module, processor, prompt_template: str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.prompt_template = prompt_template or self.default_prompt_template

    # -- architecture -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Layers of the stream that is patched (BLIP text encoder, LLaVA language model)."""

    @property
    @abstractmethod
    def n_heads(self) -> int:
        """Query heads of the fusion attention (BLIP cross-attention, LLaVA self-attention)."""

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    module_sites: ClassVar[tuple[str, ...]]  # module-wise sites, e.g. ("mlp", "self_attn", "cross_attn")
    head_site: ClassVar[str]                 # "cross_attn_head" (BLIP) or "self_attn_head" (LLaVA)

    # -- inputs -----------------------------------------------------------------------------
    def format_prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)

    @abstractmethod
    def prepare(self, image: Image.Image, prompt: str) -> ModelInput:
        """Tokenise `prompt` and preprocess `image` exactly as the model's processor does."""

    @abstractmethod
    def option_token_id(self, option: str) -> int:
        """First token of `option` as the model would produce it as an answer."""

    @abstractmethod
    def patch_positions(self, inp: ModelInput) -> list[int]:
        """Positions patched module-wise (BLIP: every text token; LLaVA: the text tokens, no image tokens)."""

    @abstractmethod
    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        """Position for head patching (BLIP: the correct-answer token in the question; LLaVA: last token)."""

    # -- running ----------------------------------------------------------------------------
    @abstractmethod
    def answer_logits(self, inp: ModelInput) -> torch.Tensor:
        """Logits [vocab] (float32) of the first answer token: what every metric is computed from."""

    @abstractmethod
    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        """Greedy answer string, for exact-match accuracy."""

    @abstractmethod
    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        """The module whose input (first positional argument) or output *is* the site's activation.

        Head sites return their parent attention site's module; the head is a slice of it.
        """

    @abstractmethod
    def image_embedding_module(self) -> torch.nn.Module:
        """Module whose output holds the image embeddings the text side sees (Gaussian-noise target)."""

    @staticmethod
    def replace_output_tensor(output, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Apply `fn` to the main tensor of a module output (tensor, tuple or ModelOutput)."""
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        key = next(iter(output.keys()))
        output[key] = fn(output[key])
        return output


ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls
