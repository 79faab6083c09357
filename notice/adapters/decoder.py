"""Token-fusion VLMs: image features spliced into a decoder language model's prompt (token fusion).

What the token-fusion families share lives here; a family module says only
where its modules are and what is special about its inputs. The patched stream is the decoder
language model (pre-norm layers with `self_attn` (whose `o_proj` input is the concatenation of the
query heads: grouped-query attention is fine), `mlp`, a final `norm` and the `lm_head`). The fusion
heads are its self-attention heads. The answer score is the next-token logits at the last prompt
position. Sites are patched at every position that is not an image token (markers around the image,
such as `<|vision_start|>`, are text positions), heads at the last prompt position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch

from notice.adapters.attention_blocks import interface_attention_blocks
from notice.adapters.attention_taps import AttentionTap, interface_attention_taps
from notice.adapters.base import HEAD_SITE_PARENT, ImageGrid, ModelInput, VLMAdapter, pre_hook_while_active


@dataclass(frozen=True)
class ResidualAddition:
    """What a model adds to the residual stream after decoder layer `layer`'s output, before the next layer (or the
    final norm) reads it: `values` [N, D] at the sorted positions `positions` [N] (e.g. DeepStack's image features)."""

    layer: int
    positions: torch.Tensor
    values: torch.Tensor

    def added(self, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        """`hidden` [B, S, D], the states of positions start..start+S-1, with the addition at its positions among
        them, in the model's own arithmetic (states + values, in the states' dtype)."""
        if not len(self.positions) or int(self.positions[-1]) < start:
            return hidden  # every position it adds at lies before the states'
        keep = self.positions >= start
        index = self.positions[keep] - start
        out = hidden.clone()
        out[:, index] = hidden[:, index] + self.values[keep].to(hidden.device, hidden.dtype)
        return out


def residual_added(
    additions: Mapping[int, ResidualAddition], layer: int, hidden: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """Layer `layer`'s outputs [B, S, D] at positions start.. with what the model adds after it, if `additions` (by
    layer) has anything."""
    addition = additions.get(layer)
    return hidden if addition is None else addition.added(hidden, start)


class DecoderVLMAdapter(VLMAdapter):
    """Shared behaviour of decoder-LM families; subclasses name their modules."""

    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn")
    head_site: ClassVar[str] = "self_attn_head"
    knockout_engine: ClassVar[Literal["suffix", "batched"]] = "suffix"

    # -- where the family keeps things (override when the path differs) ----------------------
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder (`.layers`, `.norm`, `.rotary_emb`), without the head."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return cast(torch.nn.ModuleList, self.language_model.layers)

    # -- architecture -----------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        attention: Any = self.layers[0].self_attn  # a family's attention module: fields by name
        return int(attention.head_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        block: Any = self.layers[layer]  # a family's decoder layer: submodules by name
        site = HEAD_SITE_PARENT.get(site, site)
        if site == "mlp":
            return block.mlp, "output"
        if site == "self_attn":
            return block.self_attn.o_proj, "input"
        if site == "layer":
            return block, "output"
        raise ValueError(f"unknown {self.family} site {site!r} (sites: mlp, self_attn, self_attn_head, layer)")

    def attention_projections(self, site: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        if site not in self.layer_sites(layer) or site not in ("self_attn", "cross_attn"):
            raise ValueError(f"{self.family}: layer {layer} has no attention site {site!r}")
        attention: Any = getattr(self.layers[layer], site)  # a family's attention module: projections by name
        return attention.q_proj, attention.k_proj, attention.v_proj

    def residual_norms(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(the norm the attention reads the residual stream through, the MLP's) where `layer` is a pre-norm layer
        that adds its attention's output projection and its MLP's output to the stream as they are (Llama's
        layout: those four submodules and no other); None for any other layer (post-norms, gates, cross-attention,
        linear attention). Circuits score such layers' edges in one backward pass (notice.circuits.attribution)."""
        block: Any = self.layers[layer]  # a family's decoder layer: submodules by name
        names = {name for name, _ in block.named_children()}
        if names != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
            return None
        return block.input_layernorm, block.post_attention_layernorm

    # -- inputs -----------------------------------------------------------------------------
    def option_token_id(self, option: str) -> int:
        """First token of `option` generated right after the prompt.

        Rule: tokenise the prompt's text after the question (`answer_context`, e.g. " Answer with one
        word. ASSISTANT:", or a chat template's "<|im_end|>\\n<|im_start|>assistant\\n") alone and followed
        by the option (after a space unless the prompt ends in whitespace, as a model writes it); the
        first token past the common prefix is the answer token. With sentencepiece-style tokenizers
        this is the space-prefixed piece ("▁red") the model emits after "ASSISTANT:", not "red".
        """
        tokenizer = self.processor.tokenizer
        context = self.answer_context()
        separator = "" if context[-1:].isspace() else " "
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(context + separator + option, add_special_tokens=False)["input_ids"]
        if full_ids[: len(ctx_ids)] != ctx_ids or len(full_ids) <= len(ctx_ids):
            raise ValueError(
                f"option {option!r} does not tokenise as a continuation of {context!r}: "
                f"{tokenizer.convert_ids_to_tokens(ctx_ids)} vs {tokenizer.convert_ids_to_tokens(full_ids)}"
            )
        return int(full_ids[len(ctx_ids)])

    def answer_context(self) -> str:
        """The prompt's text after the question, as the model reads it right before the answer (the
        template's text after "{question}"; a processor that appends text to every prompt adds it)."""
        return self.prompt_template.split("{question}")[-1]

    def image_positions(self, inp: ModelInput) -> list[int]:
        return torch.nonzero(inp.input_ids[0] == self.image_token_id).flatten().tolist()

    def patch_positions(self, inp: ModelInput) -> list[int]:
        return torch.nonzero(inp.input_ids[0] != self.image_token_id).flatten().tolist()

    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        # The last prompt token (e.g. "ASSISTANT:") carries the effect (paper).
        return inp.input_ids.shape[1] - 1

    # -- running ----------------------------------------------------------------------------
    def forward(self, inp: ModelInput, **kwargs):
        """The model's own forward on `inp`, scoring the last position only."""
        return self.model(**inp.model_kwargs(), logits_to_keep=1, **kwargs)

    def differentiable_answer_logits(self, inp: ModelInput) -> torch.Tensor:
        return self.answer_logits_of(lambda: self.forward(inp).logits[0, -1])

    @torch.no_grad()
    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        tokenizer = self.processor.tokenizer
        out = self.model.generate(
            **inp.model_kwargs(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_ids = out[0, inp.input_ids.shape[1] :].tolist()
        return tokenizer.decode(new_ids, skip_special_tokens=True).strip()

    def head_input_module(self) -> torch.nn.Module:
        return cast(torch.nn.Module, self.language_model.norm)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] (float32) from last-layer outputs [B, D] (final norm, then head)."""
        norm, head = self.float32_module(self.head_input_module()), self.float32_module(self.lm_head)
        return head(norm(self.head_input(hidden))).float()

    def residual_additions_recorded(self, additions: list[ResidualAddition]) -> AbstractContextManager[None]:
        """While active, a forward (batch of one) appends to `additions` what the model adds to the residual stream
        between decoder layers besides their outputs, which the fast engines must add as the model does. None here:
        a layer's output is the next layer's input."""
        return nullcontext()

    @property
    def self_attentions(self) -> list[torch.nn.Module]:
        """Per layer, the decoder's self-attention module."""
        return [cast(torch.nn.Module, layer.self_attn) for layer in self.layers]

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        return interface_attention_taps(self.self_attentions, tap)

    # -- how the image enters ------------------------------------------------------------------
    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        """The language model's input embeddings [B, T, D] (image features already spliced in; key = position)."""

        def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if kwargs.get("inputs_embeds") is None:
                raise RuntimeError(f"{self.family}: the language model was called without inputs_embeds")
            return args, {**kwargs, "inputs_embeds": edit(kwargs["inputs_embeds"])}

        return pre_hook_while_active(self.language_model, pre_hook)

    def stream_image_grid(self, inp: ModelInput) -> ImageGrid:
        return self.image_grid(inp)  # the image tokens are the decoder's own positions

    # -- attention knockout -----------------------------------------------------------------------
    def image_keys(self, inp: ModelInput) -> list[int]:
        return self.image_positions(inp)

    def answer_position(self, inp: ModelInput) -> int | None:
        return inp.input_ids.shape[1] - 1  # the next-token logits of the last prompt position

    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        if fusion_blocks:
            raise ValueError(f"{self.family}: the image tokens are positions; block them in the self-attention")
        return interface_attention_blocks(self.self_attentions, self_blocks)

    # -- fusion attention ---------------------------------------------------------------------
    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        return self.self_attentions

    def attention_queries(self, inp: ModelInput) -> list[int]:
        # Positions before the image cannot see it under the causal mask.
        last_image = max(self.image_positions(inp))
        return [p for p in self.patch_positions(inp) if p > last_image]

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """The image tokens as one square grid (one image token per patch of a square image)."""
        keys = self.image_positions(inp)
        side = int(round(len(keys) ** 0.5))
        if side * side != len(keys):
            raise ValueError(f"{self.family}: {len(keys)} image tokens do not form a square patch grid")
        return ImageGrid(tuple(keys), side, side)
