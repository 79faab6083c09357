"""BLIP VQA (`BlipForQuestionAnswering`): ViT → image-grounded text encoder → text decoder.

The patched stream is the text encoder (BERT-style, post-LayerNorm; each layer has self-attention,
cross-attention to the image patches and an MLP). The fusion heads are the cross-attention heads.
The answer score is the text decoder's first step: decoder input = the BOS token
(`text_config.bos_token_id`, what `BlipForQuestionAnswering.generate` starts from), cross-attending
to the text encoder's output under the question's attention mask.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, cast

import torch
from transformers import BlipForQuestionAnswering

from notice.adapters.attention_blocks import bert_attention_blocks, together
from notice.adapters.attention_taps import AttentionTap, bert_attention_taps
from notice.adapters.base import HEAD_SITE_PARENT, ImageGrid, ModelInput, VLMAdapter


class BlipAdapter(VLMAdapter):
    model_class: ClassVar[type] = BlipForQuestionAnswering
    default_prompt_template: ClassVar[str | None] = "{question}"
    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn", "cross_attn")
    head_site: ClassVar[str] = "cross_attn_head"
    image_keys_are_positions: ClassVar[bool] = False

    @property
    def _text_config(self):
        return self.model.config.text_config

    @property
    def _layers(self) -> torch.nn.ModuleList:
        return self.model.text_encoder.encoder.layer

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def _cross_attention(self) -> Any:
        """The first layer's cross-attention (BlipTextSelfAttention): its fields by name."""
        return cast(Any, self._layers[0]).crossattention.self

    @property
    def n_heads(self) -> int:
        return self._cross_attention.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self._cross_attention.attention_head_size

    @property
    def hidden_size(self) -> int:
        return int(self._text_config.hidden_size)

    # -- inputs -----------------------------------------------------------------------------
    def option_token_id(self, option: str) -> int:
        # The decoder produces answers as plain WordPiece text after BOS, so no context is needed.
        ids = self.processor.tokenizer(option, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"option {option!r} tokenises to no tokens")
        return int(ids[0])

    def patch_positions(self, inp: ModelInput) -> list[int]:
        return list(range(inp.input_ids.shape[1]))

    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        ids = inp.input_ids[0].tolist()
        # Position 0 is [CLS]; the answer is named in the question after it.
        for position in range(1, len(ids)):
            if ids[position] == answer_token_id:
                return position
        raise ValueError(
            f"answer token id {answer_token_id} does not occur in the question tokens {inp.tokens}; "
            "BLIP head patching needs the correct option to be named in the question"
        )

    # -- running ----------------------------------------------------------------------------
    def _encode(self, inp: ModelInput, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder output [B, T, D] (question embeddings that the decoder cross-attends to); `image_embeds`
        [B, K, D]: the vision model's output, computed here when not given."""
        if image_embeds is None:
            image_embeds = self.model.vision_model(pixel_values=inp.pixel_values)[0]
        rows = image_embeds.shape[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.model.text_encoder(
            input_ids=inp.input_ids.expand(rows, -1),
            attention_mask=inp.attention_mask.expand(rows, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )[0]

    def _decoder_logits(
        self, question_embeds: torch.Tensor, inp: ModelInput, decoder_ids: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits [V] for the token after `decoder_ids` [1, n] ([B, V] for question embeddings of B rows)."""
        rows = question_embeds.shape[0]
        logits = self.model.text_decoder(
            input_ids=decoder_ids.expand(rows, -1),
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=inp.attention_mask.expand(rows, -1),
        ).logits
        return (logits[0, -1] if rows == 1 else logits[:, -1]).float()

    def _bos(self) -> torch.Tensor:
        return torch.tensor([[self._text_config.bos_token_id]], device=self.device)

    def differentiable_answer_logits(self, inp: ModelInput) -> torch.Tensor:
        return self.answer_logits_of(lambda: self._decoder_logits(self._encode(inp), inp, self._bos()))

    def head_input_module(self) -> torch.nn.Module:
        # The decoder's prediction head (transform: dense, activation, LayerNorm; then the unembedding).
        return cast(torch.nn.Module, self.model.text_decoder.cls)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.float32_module(self.head_input_module())(self.head_input(hidden)).float()

    @torch.no_grad()
    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        # Greedy, without a key/value cache: answers are a few tokens, and the first step is then
        # computed exactly as in `answer_logits`. Stops at [SEP] like `BlipForQuestionAnswering.generate`
        # (which passes sep_token_id as its eos; text_config.eos_token_id is an unused id in BLIP).
        question_embeds = self._encode(inp)
        decoder_ids = self._bos()
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(self._decoder_logits(question_embeds, inp, decoder_ids).argmax())
            if next_id == self._text_config.sep_token_id:
                break
            generated.append(next_id)
            decoder_ids = torch.cat([decoder_ids, torch.tensor([[next_id]], device=self.device)], dim=1)
        return self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()

    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        block: Any = self._layers[layer]  # a BlipTextLayer: submodules by name
        site = HEAD_SITE_PARENT.get(site, site)
        if site == "mlp":
            return block.output.dense, "output"
        if site == "self_attn":
            return block.attention.output.dense, "input"
        if site == "cross_attn":
            return block.crossattention.output.dense, "input"
        if site == "layer":
            return block, "output"
        raise ValueError(f"unknown BLIP site {site!r}")

    def attention_projections(self, site: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        block: Any = self._layers[layer]  # a BlipTextLayer: submodules by name
        attention = {"self_attn": block.attention, "cross_attn": block.crossattention}[site].self
        return attention.query, attention.key, attention.value

    def circuit_input_modules(self) -> dict[str, list[torch.nn.Module]]:
        return {"image": [self.model.vision_model], "text": [self.model.text_encoder.embeddings.word_embeddings]}

    def image_embedding_module(self) -> torch.nn.Module:
        # Its `last_hidden_state` is what the text encoder's cross-attention reads.
        return self.model.vision_model

    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        # The vision tower's output: key 0 the image [CLS], then the patches.
        return self.edited_output(self.model.vision_model, edit)

    # -- attention knockout -----------------------------------------------------------------------
    def image_keys(self, inp: ModelInput) -> list[int]:
        vision = self.model.config.vision_config
        return list(range(1 + (vision.image_size // vision.patch_size) ** 2))  # the image [CLS] and every patch

    def answer_position(self, inp: ModelInput) -> int | None:
        return None  # the decoder reads every position of the text encoder

    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        self_attentions = [cast(Any, layer).attention.self for layer in self._layers]
        return together(
            bert_attention_blocks(self_attentions, self_blocks),
            bert_attention_blocks(self.fusion_attention_modules(), fusion_blocks),
        )

    def batched_answer_logits(self, inp: ModelInput, rows: int) -> torch.Tensor:
        image_embeds = self.model.vision_model(pixel_values=inp.pixel_values)[0]  # once for every row
        encoded = self._encode(inp, image_embeds.expand(rows, -1, -1))
        logits = self.answer_logits_of(lambda: self._decoder_logits(encoded, inp, self._bos()))
        return logits.reshape(rows, -1)

    # -- fusion attention: the text encoder's cross-attention to the vision tower's output ----
    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        return [cast(Any, layer).crossattention.self for layer in self._layers]

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        return bert_attention_taps(self.fusion_attention_modules(), tap)

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        # Key 0 is the image [CLS], which has no place on the image.
        return ImageGrid(tuple(range(1, 1 + side * side)), side, side)

    def attention_queries(self, inp: ModelInput) -> list[int]:
        # Every text-encoder token, [CLS] and [SEP] included: which token localises the object
        # varies between trained models.
        return self.patch_positions(inp)
