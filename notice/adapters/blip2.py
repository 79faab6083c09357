"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`).

Written for `Salesforce/blip2-opt-2.7b` (and -6.7b; an OPT language model) and
`Salesforce/instructblip-vicuna-7b` (and -13b; a Llama one). A ViT reads the image; a Q-Former's 32
learned query tokens cross-attend to its patches (every 2nd Q-Former layer has cross-attention; the
queries attend to each other bidirectionally, and InstructBLIP's also to the prompt, tokenised by the
Q-Former's BERT tokenizer as `qformer_input_ids`); `language_projection` maps the query outputs into the
language model, where the processor has put one `<image>` token per query in front of the prompt.
The flan-t5 checkpoints (an encoder-decoder language model) are refused: both streams score the
next-token logits of a decoder-only language model.

Vision meets text in two places, so each model type has two adapters, one per patched stream:

- the language model (families `blip2`, `instructblip`; the default, as for LLaVA): its
  self-attention heads at the last prompt position, module sites at every text position (the query
  tokens are the image tokens), the shared decoder fast engine, Gaussian noise on the
  `language_projection` output (the query embeddings the language model reads);
- the Q-Former (families `blip2_qformer`, `instructblip_qformer`; opt-in, chosen with the model
  section's `adapter` key), BLIP-like: its cross-attention heads and sites. Its layers are the
  Q-Former layers that have cross-attention (0, 2, 4, ...; the layers between them run unpatched),
  its positions are the query tokens: query k is the prompt's position k, the `<image>` token its
  output is spliced into (InstructBLIP's instruction tokens in the Q-Former are read by the queries
  but not patched). Heads are patched at query 0, the Q-Former's pooled position (the queries have no
  order of their own). Gaussian noise goes on the ViT output that the cross-attention reads; the
  answer is still the language model's next token.

Head functions: the language model attends to 32 query tokens, which have no place on the image, so
the language-model stream scores each head's attention *carried onto the ViT patch grid*: its
attention to query k times query k's cross-attention to each patch (mean over the Q-Former's
cross-attention layers and heads), summed over the queries (`QueryImageAttention`). The patches'
mass is the head's attention to the queries, less what the queries give the image [CLS]. The
Q-Former stream scores its own cross-attention from the queries to the patch grid, like BLIP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from notice.adapters.attention_blocks import interface_attention_blocks, together
from notice.adapters.attention_taps import AttentionTap, interface_attention_taps
from notice.adapters.base import HEAD_SITE_PARENT, ImageGrid, ModelInput, VLMAdapter
from notice.adapters.decoder import DecoderVLMAdapter

# -- the language-model stream -----------------------------------------------------------------


class TokenView(torch.nn.Module):
    """Identity whose output is OPT's MLP output as [batch, tokens, width]: OPT runs its MLP on the
    tokens flattened to [batch·tokens, width], and sites are read and written per token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def opt_mlp_view(layer: Any) -> TokenView:
    """The `TokenView` of an OPT decoder layer's `fc2` output, installed once per layer (kept in the
    layer's `__dict__`, not as a submodule, so the model's state and saved files are unchanged)."""
    view = layer.__dict__.get("_notice_mlp_view")
    if view is not None:
        return view
    view = TokenView()
    batch_tokens: list[torch.Size] = []

    def remember_shape(_module, args, kwargs) -> None:
        batch_tokens[:] = [(args[0] if args else kwargs["hidden_states"]).shape[:-1]]

    def through_view(_module, _args, output: torch.Tensor) -> torch.Tensor:
        return view(output.view(*batch_tokens[0], -1)).reshape(output.shape)

    layer.register_forward_pre_hook(remember_shape, with_kwargs=True)
    layer.fc2.register_forward_hook(through_view)
    layer.__dict__["_notice_mlp_view"] = view
    return view


class HookHandles:
    """Several hook handles removed together (what `register_forward_hook` returns)."""

    def __init__(self, handles: Sequence[Any]):
        self.handles = list(handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class QueryImageAttention(torch.nn.Module):
    """One language-model layer's attention carried onto the ViT patches through the query tokens.

    Output [1] is [B, H, T, P]: Σ_k attention(t → query k) · footprint(k → patch p), where the query
    tokens are the prompt's positions 0..Q-1 and footprint [B, Q, P] is each query's cross-attention to
    the patches (mean over the Q-Former's cross-attention layers and heads, the [CLS] key left out).
    A forward hook registered on it is fed from the language model's own forward: the registration
    also hooks the layer's self-attention and the Q-Former's cross-attention (eager attention), and
    removing the returned handle removes all of them.
    """

    def __init__(self, attention: torch.nn.Module, cross_attentions: Sequence[torch.nn.Module], n_queries: int):
        super().__init__()
        # A tuple, so not registered as submodules: the model owns these modules.
        self.targets = (attention, tuple(cross_attentions))
        self.n_queries = n_queries

    def forward(self, probs: torch.Tensor, footprint: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, torch.matmul(probs[..., : self.n_queries].float(), footprint)

    # Returns the handles of every hook it installs, not one RemovableHandle.
    def register_forward_hook(self, hook, **kwargs) -> HookHandles:  # type: ignore[override]
        attention, cross_attentions = self.targets
        maps: list[torch.Tensor] = []

        def record_cross(_module, _args, output) -> None:
            if output[1] is None:
                raise RuntimeError("attention weights are None: load the model with attn_implementation='eager'")
            maps.append(output[1][..., 1:].float().mean(1))  # [B, Q, P], the image [CLS] key left out

        def relay(_module, _args, output) -> None:
            if output[1] is None:
                raise RuntimeError("attention weights are None: load the model with attn_implementation='eager'")
            self(output[1], torch.stack(maps).mean(0))
            maps.clear()

        handles = [super().register_forward_hook(hook, **kwargs), attention.register_forward_hook(relay)]
        handles += [module.register_forward_hook(record_cross) for module in cross_attentions]
        return HookHandles(handles)


class Blip2LanguageModelAdapter(DecoderVLMAdapter):
    """The language-model stream of BLIP-2 / InstructBLIP (an OPT- or Llama-style decoder)."""

    def __init__(self, model: torch.nn.Module, processor, prompt_template: str | None = None):
        config: Any = model.config  # a Blip2Config / InstructBlipConfig: fields by name
        if not config.use_decoder_only_language_model:
            raise ValueError(
                f"{type(self).__name__}: the language model is {config.text_config.model_type!r}, an "
                "encoder-decoder; BLIP-2 / InstructBLIP are supported with decoder-only language models "
                "(OPT, Vicuna) only"
            )
        super().__init__(model, processor, prompt_template)
        self.is_opt = hasattr(self.layers[0], "fc2")
        self.mlp_views = [opt_mlp_view(layer) for layer in self.layers] if self.is_opt else []
        self._query_attention: list[QueryImageAttention] = []

    @property
    def language_model(self) -> torch.nn.Module:
        decoder = self.model.language_model.model
        return getattr(decoder, "decoder", decoder)  # OPT keeps its layers one level down

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.language_model.lm_head

    @property
    def n_queries(self) -> int:
        return int(self.model.config.num_query_tokens)

    @property
    def qformer_layers(self) -> torch.nn.ModuleList:
        return self.model.qformer.encoder.layer

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        if not self.is_opt:
            return super().site_module(site, layer)
        block: Any = self.layers[layer]  # an OPT decoder layer: submodules by name
        site = HEAD_SITE_PARENT.get(site, site)
        if site == "mlp":
            return self.mlp_views[layer], "output"
        if site == "self_attn":
            return block.self_attn.out_proj, "input"
        if site == "layer":
            return block, "output"
        raise ValueError(f"unknown {self.family} site {site!r} (sites: mlp, self_attn, self_attn_head, layer)")

    def _opt_head(self) -> list[torch.nn.Module]:
        """OPT's score head in order: final layer norm and output projection (either may be absent), head."""
        decoder: Any = self.language_model  # OPT's decoder: submodules by name
        return [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None] + [self.lm_head]

    def head_input_module(self) -> torch.nn.Module:
        return self._opt_head()[0] if self.is_opt else super().head_input_module()

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.is_opt:
            return super().final_logits(hidden)
        hidden = self.head_input(hidden)
        for module in self._opt_head():
            hidden = self.float32_module(module)(hidden)
        return hidden.float()

    def image_embedding_module(self) -> torch.nn.Module:
        # The query embeddings spliced into the `<image>` positions.
        return self.model.language_projection

    def query_positions(self, inp: ModelInput) -> list[int]:
        """The prompt's `<image>` positions, 0..Q-1 (the processors put them first), checked."""
        positions = self.image_positions(inp)
        if positions != list(range(self.n_queries)):
            raise ValueError(
                f"{self.family}: the prompt's image tokens are at {positions}; the {self.n_queries} query tokens "
                "must come first (as BLIP-2's and InstructBLIP's processors put them)"
            )
        return positions

    def vit_grid(self) -> tuple[int, int]:
        """(side, patches) of the ViT's square patch grid."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side * side

    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        # The image keys are the ViT patches (the query tokens have no place on the image): the ViT output the
        # Q-Former's cross-attention reads, less the image [CLS] (row 0).
        return self.edited_output(self.model.vision_model, edit, first_row=1)

    def stream_image_grid(self, inp: ModelInput) -> ImageGrid:
        """The query tokens, the language model's image positions, as one row: they have no place on the image."""
        positions = self.query_positions(inp)
        return ImageGrid(tuple(positions), 1, len(positions))

    def object_keys(self, inp: ModelInput, object_mask: np.ndarray) -> list[int]:
        return []  # the image keys are the query tokens, which have no place on the image

    # -- fusion attention: carried onto the patch grid ----------------------------------------
    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        if not self._query_attention:
            layers: list[Any] = list(self.qformer_layers)  # Q-Former layers: submodules by name
            cross = [layer.crossattention.attention for layer in layers if layer.has_cross_attention]
            self._query_attention = [
                QueryImageAttention(attention, cross, self.n_queries)
                for attention in super().fusion_attention_modules()
            ]
        return list(self._query_attention)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        self.query_positions(inp)
        side, patches = self.vit_grid()
        return ImageGrid(tuple(range(patches)), side, side)


class Blip2Adapter(Blip2LanguageModelAdapter):
    model_class: ClassVar[type] = Blip2ForConditionalGeneration
    # The model card's VQA prompt (the processor has no chat template).
    default_prompt_template: ClassVar[str | None] = "Question: {question} Answer:"


class InstructBlipAdapter(Blip2LanguageModelAdapter):
    model_class: ClassVar[type] = InstructBlipForConditionalGeneration
    # InstructBLIP's short-answer VQA instruction; the Q-Former reads the same text.
    default_prompt_template: ClassVar[str | None] = "Question: {question} Short answer:"


# -- the Q-Former stream (opt-in) ------------------------------------------------------------------


class QFormerStreamAdapter(Blip2LanguageModelAdapter):
    """The Q-Former stream: BLIP-like sites on the Q-Former layers with cross-attention, at the query
    tokens; the answer, prompt and tokens are the language model's, as in the default stream."""

    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn", "cross_attn")
    head_site: ClassVar[str] = "cross_attn_head"
    knockout_engine: ClassVar[Literal["suffix", "batched"]] = "batched"
    image_keys_are_positions: ClassVar[bool] = False

    @property
    def stream_layers(self) -> list[int]:
        """Indices of the Q-Former layers with cross-attention: layer i of the stream is Q-Former layer
        stream_layers[i]."""
        return [i for i, layer in enumerate(self.qformer_layers) if layer.has_cross_attention]

    @property
    def qformer_config(self):
        return self.model.config.qformer_config

    @property
    def n_layers(self) -> int:
        return len(self.stream_layers)

    @property
    def n_heads(self) -> int:
        return int(self.qformer_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.qformer_config.hidden_size // self.qformer_config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.qformer_config.hidden_size)

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        block: Any = self.qformer_layers[self.stream_layers[layer]]  # a Q-Former layer: submodules by name
        site = HEAD_SITE_PARENT.get(site, site)
        if site == "mlp":
            return block.output_query.dense, "output"  # the queries' MLP (instruction tokens have their own)
        if site == "self_attn":
            return block.attention.output.dense, "input"
        if site == "cross_attn":
            return block.crossattention.output.dense, "input"
        if site == "layer":
            return block, "output"
        raise ValueError(
            f"unknown {self.family} site {site!r} (sites: mlp, self_attn, cross_attn, cross_attn_head, layer)"
        )

    def attention_projections(self, site: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        block: Any = self.qformer_layers[self.stream_layers[layer]]  # a Q-Former layer: submodules by name
        attention = {"self_attn": block.attention, "cross_attn": block.crossattention}[site].attention
        return attention.query, attention.key, attention.value

    def circuit_input_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The image: the ViT output the cross-attention reads. The text: the instruction's word embeddings in the
        Q-Former (InstructBLIP) and the prompt's in the language model, which reads it besides the queries."""
        qformer: Any = self.model.qformer  # a Q-Former: submodules by name
        words = [qformer.embeddings.word_embeddings] if hasattr(qformer, "embeddings") else []
        return {"image": [self.model.vision_model], "text": [*words, self.model.get_input_embeddings()]}

    def patch_positions(self, inp: ModelInput) -> list[int]:
        return self.query_positions(inp)

    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        return self.query_positions(inp)[0]

    def image_embedding_module(self) -> torch.nn.Module:
        # Its `last_hidden_state` is what the Q-Former's cross-attention reads.
        return self.model.vision_model

    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        # The ViT output the cross-attention reads: key 0 the image [CLS], then the patches.
        return self.edited_output(self.model.vision_model, edit)

    def stream_image_grid(self, inp: ModelInput) -> ImageGrid:
        # The Q-Former's queries read the image through cross-attention, and its output is projected into the
        # language model, not unembedded.
        return VLMAdapter.stream_image_grid(self, inp)

    # -- attention knockout: the query tokens' attention; no question or answer position in this stream ----
    def stream_positions(self, inp: ModelInput) -> list[int]:
        return self.query_positions(inp)

    def image_keys(self, inp: ModelInput) -> list[int]:
        return list(range(1 + self.vit_grid()[1]))  # the image [CLS] and every patch

    def object_keys(self, inp: ModelInput, object_mask: np.ndarray) -> list[int]:
        return VLMAdapter.object_keys(self, inp, object_mask)  # the cross-attention's keys are the ViT patches

    def question_positions(self, inp: ModelInput, question: str) -> list[int]:
        return []  # the stream's positions are the learned queries (an instruction is read, not patched)

    def answer_position(self, inp: ModelInput) -> int | None:
        return None  # the language model reads every query

    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        """Blocks at stream layer l act in Q-Former layer `stream_layers[l]` (the layers between run unblocked);
        self-attention blocks cover the queries, an instruction's tokens after them stay visible."""
        layers: list[Any] = list(self.qformer_layers)  # Q-Former layers: submodules by name
        self_attentions = [layers[i].attention.attention for i in self.stream_layers]
        return together(
            interface_attention_blocks(self_attentions, self_blocks),
            interface_attention_blocks(self.fusion_attention_modules(), fusion_blocks),
        )

    def batched_answer_logits(self, inp: ModelInput, rows: int) -> torch.Tensor:
        kwargs = {key: value.expand(rows, *value.shape[1:]) for key, value in inp.model_kwargs().items()}
        return self.answer_logits_of(lambda: self.model(**kwargs, logits_to_keep=1).logits[:, -1])

    # -- fusion attention: the Q-Former's cross-attention to the ViT patches --------------------
    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        layers: list[Any] = list(self.qformer_layers)  # Q-Former layers: submodules by name
        return [layers[i].crossattention.attention for i in self.stream_layers]

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        return interface_attention_taps(self.fusion_attention_modules(), tap)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        side, patches = self.vit_grid()
        return ImageGrid(tuple(range(1, 1 + patches)), side, side)  # key 0 is the image [CLS]

    def attention_queries(self, inp: ModelInput) -> list[int]:
        return self.query_positions(inp)


class Blip2QFormerAdapter(QFormerStreamAdapter, Blip2Adapter):
    """BLIP-2's Q-Former stream (the family table's opt-in `blip2_qformer`)."""


class InstructBlipQFormerAdapter(QFormerStreamAdapter, InstructBlipAdapter):
    """InstructBLIP's Q-Former stream (the family table's opt-in `instructblip_qformer`)."""
