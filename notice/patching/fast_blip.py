"""Fast exact patching for BLIP VQA (`BlipForQuestionAnswering`).

The patched stream is the text encoder (bidirectional, post-LayerNorm BERT layers: self-attention,
cross-attention to the image, MLP). Per sample the engine caches:
- the image embeddings of each distinct image (vision model run once per image), and the
  cross-attention keys/values of the corrupt image for every layer: no text-side patch changes them;
- every intermediate of the corrupt run at every layer, and the clean run's site activations.

A row patched at (layer L, position p) starts from the corrupt run's cached values at layer L and
recomputes only position p inside layer L (everything after the patched site is position-wise);
from layer L+1 on, every position is recomputed (bidirectional attention spreads the change), then
the decoder's first step (BOS cross-attending to the encoder output) gives the row's logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers.masking_utils import create_bidirectional_mask

from notice.adapters.base import ModelInput, Patch
from notice.patching.fast_core import FastFamily, Run, register_fast, rows_by_index

# Cached per layer, in computation order (`_layer` documents each).
RECORDED = ("h_in", "self_attn", "a1", "cross_attn", "a2", "mlp", "layer")


@register_fast
class BlipFast(FastFamily):
    family = "blip"
    stages = ("self_attn", "cross_attn", "mlp", "layer")

    def __init__(self, adapter, *args, **kwargs):
        self.layers = adapter.model.text_encoder.encoder.layer
        self.n_heads = self.layers[0].attention.self.num_attention_heads
        super().__init__(adapter, *args, **kwargs)

    # -- cached runs ------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, N, D_vision]: the vision model's last hidden state, which the text encoder cross-attends to."""
        return self.adapter.model.vision_model(pixel_values=pixel_values)[0]

    def _cross_kv(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values [H, N, d] of the image embeddings."""
        shape = (image.shape[1], self.n_heads, self.head_dim)
        kv = []
        for block in self.layers:
            attn = block.crossattention.self
            kv.append((attn.key(image[0]).view(shape).transpose(0, 1), attn.value(image[0]).view(shape).transpose(0, 1)))
        return kv

    def capture(self, run: Run, inp: ModelInput, image: torch.Tensor) -> torch.Tensor:
        encoder = self.adapter.model.text_encoder
        h = encoder.embeddings(input_ids=inp.input_ids)
        # The same (possibly None) additive mask the Hugging Face encoder builds for this prompt.
        self.mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=h, attention_mask=inp.attention_mask)
        self.question_mask = inp.attention_mask
        self.cross_kv = self._cross_kv(image)
        record: dict[str, list[torch.Tensor]] = {name: [] for name in RECORDED}
        for layer in range(len(self.layers)):
            h = self._layer(layer, h, record)
        self.record_sites(run, record)
        self.corrupt = record  # the last capture is the corrupt run's
        return self._decode(h)[0]

    # -- layer arithmetic (mirrors modeling_blip_text in eval mode: dropout is the identity) --
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H*d] -> [B, H, T, d]."""
        return x.view(*x.shape[:2], self.n_heads, self.head_dim).transpose(1, 2)

    def _self_attention(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Concatenated head outputs [B, T, H*d] (the input of `attention.output.dense`)."""
        attn = self.layers[layer].attention.self
        q, k, v = self._heads(attn.query(h)), self._heads(attn.key(h)), self._heads(attn.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if self.mask is not None:
            scores = scores + self.mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return ctx.permute(0, 2, 1, 3).reshape(h.shape[0], h.shape[1], -1)

    def _cross_attention(self, layer: int, a1: torch.Tensor) -> torch.Tensor:
        """Concatenated head outputs [B, T, H*d] (the input of `crossattention.output.dense`).

        All rows share the image keys/values, so rows and positions are stacked into one matrix per
        head instead of expanding the keys per row. The image mask is all ones (no padding): its
        additive bias is zero and is left out.
        """
        keys, values = self.cross_kv[layer]
        B, T, _ = a1.shape
        q = self.layers[layer].crossattention.self.query(a1)
        q = q.view(B * T, self.n_heads, self.head_dim).transpose(0, 1)  # [H, B*T, d]
        scores = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), values)  # [H, B*T, d]
        return ctx.transpose(0, 1).reshape(B, T, -1)

    def _mlp(self, layer: int, a2: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        return block.output.dense(block.intermediate(a2))

    def _layer(self, layer: int, h: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """One encoder layer on [B, T, D]; `record` collects every intermediate of row 0."""
        block = self.layers[layer]
        ctx = self._self_attention(layer, h)
        a1 = block.attention.output.LayerNorm(block.attention.output.dense(ctx) + h)
        ctx2 = self._cross_attention(layer, a1)
        a2 = block.crossattention.output.LayerNorm(block.crossattention.output.dense(ctx2) + a1)
        m = self._mlp(layer, a2)
        out = block.output.LayerNorm(m + a2)
        if record is not None:
            for name, value in zip(RECORDED, (h, ctx, a1, ctx2, a2, m, out)):
                record[name].append(value[0])
        return out

    def _enter(self, layer: int, patches: Sequence[Patch]) -> torch.Tensor:
        """Layer-`layer` outputs [n, T, D] of rows patched at that layer.

        Only the patched position differs from the corrupt run's output, and it is computed from the
        corrupt run's cached values at that position: sites after the patched one are recomputed,
        sites before it are the cached ones.
        """
        block = self.layers[layer]
        corrupt = self.corrupt
        pos = torch.tensor([p.position for p in patches], device=self.adapter.device)
        stage = self.stage_of(patches)
        v = self.patched_inputs(layer, patches)
        own_a1 = block.attention.output.LayerNorm(block.attention.output.dense(v["self_attn"]) + corrupt["h_in"][layer][pos])
        a1 = torch.where(stage == 0, own_a1, corrupt["a1"][layer][pos])
        ctx2 = torch.where(stage == 0, self._cross_attention(layer, a1[:, None])[:, 0], v["cross_attn"])
        own_a2 = block.crossattention.output.LayerNorm(block.crossattention.output.dense(ctx2) + a1)
        a2 = torch.where(stage <= 1, own_a2, corrupt["a2"][layer][pos])
        m = torch.where(stage <= 1, self._mlp(layer, a2), v["mlp"])
        out = torch.where(stage <= 2, block.output.LayerNorm(m + a2), v["layer"])
        rows = corrupt["layer"][layer].expand(len(patches), -1, -1).clone()
        rows[torch.arange(len(patches)), pos] = out
        return rows

    def _decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """First decoder step (BOS cross-attending to the encoder output): logits [1, V] (float32) of
        the clean or corrupt run.

        Mirrors the decoder's layers in the same operation order as modeling_blip_text, so the clean
        and corrupt scores are bit-identical to the Hugging Face forward's. One exact shortcut:
        self-attention over one token has weight exactly 1, so its output is the value projection.
        """
        decoder = self.adapter.model.text_decoder
        B, T, D = encoded.shape
        bos = torch.full((B, 1), self.adapter.model.config.text_config.bos_token_id, device=encoded.device)
        h = decoder.bert.embeddings(input_ids=bos)
        mask = create_bidirectional_mask(config=decoder.config, inputs_embeds=h, attention_mask=self.question_mask,
                                         encoder_hidden_states=encoded)
        for block in decoder.bert.encoder.layer:
            a1 = block.attention.output.LayerNorm(block.attention.output.dense(block.attention.self.value(h)) + h)
            attn = block.crossattention.self
            q = self._heads(attn.query(a1))
            k, v = self._heads(attn.key(encoded)), self._heads(attn.value(encoded))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(B, 1, -1)
            a2 = block.crossattention.output.LayerNorm(block.crossattention.output.dense(ctx) + a1)
            h = block.output.LayerNorm(block.output.dense(block.intermediate(a2)) + a2)
        return decoder.cls(h)[:, 0].float()

    def _decode_rows(self, encoded: torch.Tensor) -> torch.Tensor:
        """`_decode` for many patched rows at once, logits [B, V] (float32), with one more exact
        shortcut: cross-attention from one query folds the key/value projections into the query side
        (scores_h = (W_k,h^T q_h)·e_j + q_h·b_k,h; output_h = W_v,h (sum_j p_hj e_j) + b_v,h), which
        avoids projecting every encoder position of every row. It sums in a different order than the
        model does: rows agree with the hooked forward to float rounding (~1e-6 on float32 logits).
        """
        decoder = self.adapter.model.text_decoder
        B, T, D = encoded.shape
        H, d = self.n_heads, self.head_dim
        bos = torch.full((1, 1), self.adapter.model.config.text_config.bos_token_id, device=encoded.device)
        h = decoder.bert.embeddings(input_ids=bos)[:, 0].expand(B, D)
        blocked = ~self.question_mask.bool()[:, None, :]  # [1, 1, T]
        for block in decoder.bert.encoder.layer:
            a1 = block.attention.output.LayerNorm(block.attention.output.dense(block.attention.self.value(h)) + h)
            attn = block.crossattention.self
            q = attn.query(a1).view(B, H, d)
            w_k, w_v = attn.key.weight.view(H, d, D), attn.value.weight.view(H, d, D)
            folded = torch.matmul(q.transpose(0, 1), w_k).transpose(0, 1)  # [B, H, D]
            bias = (q * attn.key.bias.view(H, d)).sum(-1, keepdim=True)  # [B, H, 1]
            scores = (torch.matmul(folded, encoded.transpose(1, 2)) + bias) / math.sqrt(d)
            probs = torch.softmax(scores.masked_fill(blocked, torch.finfo(scores.dtype).min), dim=-1)
            mixed = torch.matmul(probs, encoded)  # [B, H, D]
            ctx = torch.matmul(w_v, mixed.permute(1, 2, 0)).permute(2, 0, 1) + attn.value.bias.view(H, d)
            a2 = block.crossattention.output.LayerNorm(block.crossattention.output.dense(ctx.reshape(B, H * d)) + a1)
            h = block.output.LayerNorm(block.output.dense(block.intermediate(a2)) + a2)
        return decoder.cls(h).float()

    # -- patched rows -----------------------------------------------------------------------
    def order_key(self, patch: Patch) -> tuple:
        # Rows of one chunk then start at the same or neighbouring layers.
        return (patch.layer, patch.position, self.stage(patch.site), patch.head)

    def row_bytes(self, patch: Patch) -> int:
        width = self.layers[0].intermediate.dense.out_features
        hidden = self.layers[0].attention.self.query.in_features
        n_image = self.cross_kv[0][0].shape[1]
        T = self.seq_len
        elements = T * (12 * hidden + 2 * width + 2 * self.n_heads * (T + n_image))
        return elements * self.adapter.dtype.itemsize

    @torch.no_grad()
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        start = min(p.layer for p in patches)
        h: torch.Tensor | None = None
        order: list[int] = []
        for layer in range(start, len(self.layers)):
            if h is not None:
                h = self._layer(layer, h)
            entering = [i for i, p in enumerate(patches) if p.layer == layer]
            if entering:
                new = self._enter(layer, [patches[i] for i in entering])
                h = new if h is None else torch.cat([h, new])
                order += entering
        return self._decode_rows(h)[rows_by_index(order, h.device)]
