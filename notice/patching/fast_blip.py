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

Every matrix product is computed as the reference (one Hugging Face forward per row) computes it:
the decoder token's own linear layers as one-row products, every other product with at least the
reference's T rows and its operand layout. BLAS sums a one-row product, a product of a few rows or
one with a plain instead of a transposed operand in another order, and a trained model amplifies
those last-bit differences to ~1e-5 in the scores; this way rows are bit-identical to the
reference's on the CPU (MKL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from transformers.masking_utils import create_bidirectional_mask

from notice.adapters.base import ModelInput, Patch
from notice.patching.fast_core import FastFamily, Run, rows_by_index
from notice.patching.hooks import ImageFn

# Cached per layer, in computation order (`_layer` documents each).
RECORDED = ("h_in", "self_attn", "a1", "cross_attn", "a2", "mlp", "layer")
VOCAB_BLOCK = 2048  # vocabulary columns per pass of the output layer, so that their weights stay in the CPU cache


def _one_row_products(linear: torch.nn.Linear, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """`linear(x)` [B, 1, out] for x [B, 1, in] as B products of one row each, as the reference
    computes its one-token decoder step (a B-row product sums in another order).

    `block`: output columns per pass, so that a large weight is read from memory once for all rows
    rather than once per row (a one-row product computes a column the same way whichever other
    columns it computes with).
    """
    B, n_out = x.shape[0], linear.out_features
    step = block or n_out
    parts = [
        torch.baddbmm(linear.bias[cols].expand(B, 1, -1), x, linear.weight[cols].t().expand(B, -1, -1))
        for cols in (slice(start, start + step) for start in range(0, n_out, step))
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class BlipFast(FastFamily):
    stages = ("self_attn", "cross_attn", "mlp", "layer")

    def __init__(self, adapter, *args, **kwargs):
        self.layers = adapter.model.text_encoder.encoder.layer
        self.n_heads = self.layers[0].attention.self.num_attention_heads
        super().__init__(adapter, *args, **kwargs)

    # -- cached runs ------------------------------------------------------------------------
    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        # The image encoder runs once per distinct image.
        clean_image = None
        if clean_inp is not None:
            clean_image = self.image_embeddings(clean_inp.pixel_values)
            self.clean_logits = self.capture("clean", clean_inp, clean_image)
        same_image = clean_inp is not None and torch.equal(clean_inp.pixel_values, corrupt_inp.pixel_values)
        corrupt_image = (
            clean_image if clean_image is not None and same_image else self.image_embeddings(corrupt_inp.pixel_values)
        )
        if image_fn is not None:
            corrupt_image = image_fn(corrupt_image)
        # Captured last, so the caches patched rows read are the corrupt run's.
        self.corrupt_logits = self.capture("corrupt", corrupt_inp, corrupt_image)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, N, D_vision]: the vision model's last hidden state, which the text encoder cross-attends to."""
        return self.adapter.model.vision_model(pixel_values=pixel_values)[0]

    def _cross_kv(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values [H, N, d] of the image embeddings."""
        shape = (image.shape[1], self.n_heads, self.head_dim)
        kv = []
        for block in self.layers:
            attn = block.crossattention.self
            kv.append(
                (attn.key(image[0]).view(shape).transpose(0, 1), attn.value(image[0]).view(shape).transpose(0, 1))
            )
        return kv

    def capture(self, run: Run, inp: ModelInput, image: torch.Tensor) -> torch.Tensor:
        """One full forward pass: fill `self.sites[run]` and the caches; return the logits [V] (float32)."""
        encoder = self.adapter.model.text_encoder
        h = encoder.embeddings(input_ids=inp.input_ids)
        # The same (possibly None) additive mask the Hugging Face encoder builds for this prompt (a tensor:
        # a BlockMask only under flex attention).
        self.mask = cast(
            torch.Tensor | None,
            create_bidirectional_mask(config=encoder.config, inputs_embeds=h, attention_mask=inp.attention_mask),
        )
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
        # Contiguous keys: q·kᵀ of many rows then multiplies a transposed operand, as the reference's
        # one-row forward does (matmul would otherwise copy kᵀ into a plain one).
        q, k, v = self._heads(attn.query(h)), self._heads(attn.key(h)).contiguous(), self._heads(attn.value(h))
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
        sites before it are the cached ones. The reference computes the patched position as one of
        its T rows: fewer rows are padded to T (repeating the last), as BLAS sums products of a few
        rows in another order.
        """
        block = self.layers[layer]
        corrupt = self.corrupt
        n = len(patches)
        patches = list(patches) + [patches[-1]] * (self.seq_len - n)
        pos = torch.tensor([p.position for p in patches], device=self.adapter.device)
        stage = self.stage_of(patches)
        v = self.patched_inputs(layer, patches)
        own_a1 = block.attention.output.LayerNorm(
            block.attention.output.dense(v["self_attn"]) + corrupt["h_in"][layer][pos]
        )
        a1 = torch.where(stage == 0, own_a1, corrupt["a1"][layer][pos])
        ctx2 = torch.where(stage == 0, self._cross_attention(layer, a1[:, None])[:, 0], v["cross_attn"])
        own_a2 = block.crossattention.output.LayerNorm(block.crossattention.output.dense(ctx2) + a1)
        a2 = torch.where(stage <= 1, own_a2, corrupt["a2"][layer][pos])
        m = torch.where(stage <= 1, self._mlp(layer, a2), v["mlp"])
        out = torch.where(stage <= 2, block.output.LayerNorm(m + a2), v["layer"])
        rows = corrupt["layer"][layer].expand(n, -1, -1).clone()
        rows[torch.arange(n), pos[:n]] = out[:n]
        return rows

    def _decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """First decoder step (BOS cross-attending to the encoder output): logits [B, V] (float32),
        one row per encoder output [B, T, D].

        Mirrors the decoder's layers in the same operation order as modeling_blip_text and, per row,
        with the reference's products: one row for the token's own linear layers, T rows for the keys
        and values of the encoder output. Exact shortcuts: self-attention over one token has weight
        exactly 1, so its output is the value projection; and every row is the BOS token's until the
        first cross-attention, so that part is computed once.
        """
        decoder = self.adapter.model.text_decoder
        B = encoded.shape[0]
        bos = torch.full((1, 1), self.adapter.model.config.text_config.bos_token_id, device=encoded.device)
        h = decoder.bert.embeddings(input_ids=bos)  # [1, 1, D] until the first cross-attention
        # The question's mask, the same for every row (broadcast over them).
        mask = cast(
            torch.Tensor | None,
            create_bidirectional_mask(
                config=decoder.config,
                inputs_embeds=h,
                attention_mask=self.question_mask,
                encoder_hidden_states=encoded[:1],
            ),
        )
        for block in decoder.bert.encoder.layer:
            own = _one_row_products(block.attention.output.dense, _one_row_products(block.attention.self.value, h))
            a1 = block.attention.output.LayerNorm(own + h)
            attn = block.crossattention.self
            q = self._heads(_one_row_products(attn.query, a1))
            # Contiguous keys, as in `_self_attention`.
            k, v = self._heads(attn.key(encoded)).contiguous(), self._heads(attn.value(encoded))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(B, 1, -1)
            a2 = block.crossattention.output.LayerNorm(_one_row_products(block.crossattention.output.dense, ctx) + a1)
            inter = block.intermediate.intermediate_act_fn(_one_row_products(block.intermediate.dense, a2))
            h = block.output.LayerNorm(_one_row_products(block.output.dense, inter) + a2)
        if self.adapter.upcast_scores:  # half precision: the score head in float32, as the reference's
            return self.adapter.final_logits(h[:, 0])
        head = decoder.cls.predictions
        h = head.transform.LayerNorm(head.transform.transform_act_fn(_one_row_products(head.transform.dense, h)))
        return _one_row_products(head.decoder, h, VOCAB_BLOCK)[:, 0].float()

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
        assert h is not None, "no patch at a layer of the model"
        return self._decode(h)[rows_by_index(order, h.device)]
