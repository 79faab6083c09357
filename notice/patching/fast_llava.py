"""Fast exact patching for LLaVA (`LlavaForConditionalGeneration`, Llama language model).

The patched stream is the causal language model. Per sample the engine caches:
- the projected image features of each distinct image (vision tower + projector run once per image);
- the corrupt run's residual stream at every layer boundary, its per-layer intermediates and its
  key/value cache (keys after RoPE, one entry per key/value head); the clean run's site activations.

A row patched at (layer L, position p) changes nothing before p (causal attention) and, inside layer
L, nothing but position p. So the row takes the corrupt layer-L output with position p recomputed,
and from layer L+1 on recomputes only positions p..T-1: their queries attend to the corrupt run's
cached keys/values of positions < p (shared by every row) and to the row's own keys/values of
positions >= p under the causal mask. Grouped-query attention is handled by grouping the query
heads of each key/value head (head h uses key/value head h // (H / H_kv), as `repeat_kv` does); RoPE
uses the absolute positions p..T-1. In the last layer only the last position's query is computed:
the score is the next-token logits there.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.models.llama.modeling_llama import rotate_half

from notice.adapters.base import ModelInput, Patch
from notice.patching.fast_core import FastFamily, Run, register_fast, rows_by_index

# Recorded per layer by `_layer`; "resid" gets n_layers + 1 entries (layer inputs, then the last
# layer's output), so the output of layer l ("layer") is resid[l + 1].
RECORDED = ("resid", "self_attn", "h_mid", "mlp", "keys", "values")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of [B, heads, S, d] with cos/sin [1, S, d] (as modeling_llama.apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


@register_fast
class LlavaFast(FastFamily):
    family = "llava"
    stages = ("self_attn", "mlp", "layer")

    def __init__(self, adapter, clean_inp: ModelInput, corrupt_inp: ModelInput, *args, **kwargs):
        for inp in (clean_inp, corrupt_inp):
            if not bool(inp.attention_mask.all()):
                raise ValueError("the fast LLaVA engine takes unpadded prompts (attention mask all ones)")
        model = adapter.model
        config = model.config.text_config
        self.language_model = model.model.language_model
        self.layers, self.lm_head = self.language_model.layers, model.lm_head
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        super().__init__(adapter, clean_inp, corrupt_inp, *args, **kwargs)

    # -- cached runs ------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, N, D]: the projector output (vision tower and feature selection as the model does)."""
        features = self.adapter.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(features.pooler_output)

    def _embed(self, inp: ModelInput, image: torch.Tensor) -> torch.Tensor:
        """Token embeddings [1, T, D] with the image features spliced in at the image-token positions."""
        model = self.adapter.model
        embeds = model.model.get_input_embeddings()(inp.input_ids)
        is_image = (inp.input_ids == model.config.image_token_id)[..., None].expand_as(embeds)
        if int(is_image.sum()) != image.numel():
            raise ValueError(f"{int(is_image[..., 0].sum())} image tokens in the prompt but {image.shape[1]} image features")
        return embeds.masked_scatter(is_image, image.to(embeds.dtype))

    def capture(self, run: Run, inp: ModelInput, image: torch.Tensor) -> torch.Tensor:
        h = self._embed(inp, image)
        positions = torch.arange(self.seq_len, device=h.device)[None]
        self.cos, self.sin = self.language_model.rotary_emb(h, positions)  # [1, T, d]
        # Additive causal mask [T, T]: 0 where key <= query, else the dtype's minimum (eager Llama).
        blocked = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=h.device).triu(1)
        self.causal = torch.zeros(blocked.shape, dtype=h.dtype, device=h.device).masked_fill(blocked, torch.finfo(h.dtype).min)
        record: dict[str, list[torch.Tensor]] = {name: [] for name in RECORDED}
        for layer in range(len(self.layers)):
            h = self._layer(layer, h, suffix_start=0, record=record)
        record["resid"].append(h[0])
        record["layer"] = record["resid"][1:]
        self.record_sites(run, record)
        self.corrupt = record  # the last capture is the corrupt run's
        return self._logits(h)[0]

    # -- layer arithmetic (mirrors modeling_llama's eager attention) -------------------------
    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, suffix_start: int) -> torch.Tensor:
        """Concatenated head outputs [B, Sq, H*d] (the input of `o_proj`).

        q: [B, H, Sq, d] for the last Sq positions; k, v: [B, H_kv, S, d] for positions
        suffix_start..T-1. Keys/values of positions < suffix_start come from the corrupt run's cache,
        shared by all rows: rows and query heads of a key/value head are stacked into one matrix.
        """
        B, _, Sq, d = q.shape
        scaling = self.layers[layer].self_attn.scaling
        grouped = q.reshape(B, self.n_kv, self.n_rep * Sq, d)  # head h = g * n_rep + r, as repeat_kv
        mask = self.causal[self.seq_len - Sq:, suffix_start:].repeat(self.n_rep, 1)
        scores = torch.matmul(grouped, k.transpose(-1, -2)) * scaling + mask
        if suffix_start:
            cached_k = self.corrupt["keys"][layer][:, :suffix_start]
            cached_v = self.corrupt["values"][layer][:, :suffix_start]
            stacked = grouped.transpose(0, 1).reshape(self.n_kv, B * self.n_rep * Sq, d)
            prefix = torch.matmul(stacked, cached_k.transpose(-1, -2)) * scaling
            scores = torch.cat([prefix.view(self.n_kv, B, self.n_rep * Sq, -1).transpose(0, 1), scores], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs[..., suffix_start:], v)
        if suffix_start:
            stacked = probs[..., :suffix_start].transpose(0, 1).reshape(self.n_kv, B * self.n_rep * Sq, suffix_start)
            out = out + torch.matmul(stacked, cached_v).view(self.n_kv, B, self.n_rep * Sq, d).transpose(0, 1)
        return out.reshape(B, self.n_heads, Sq, d).transpose(1, 2).reshape(B, Sq, self.n_heads * d)

    def _layer(
        self, layer: int, x: torch.Tensor, suffix_start: int, last_only: bool = False, record: dict | None = None
    ) -> torch.Tensor:
        """One decoder layer on the residual stream x [B, S, D] of positions suffix_start..T-1.

        Returns the layer output for those positions, or for the last one only (`last_only`).
        `record` collects row 0's intermediates (a full-sequence run, suffix_start = 0).
        """
        block, attn = self.layers[layer], self.layers[layer].self_attn
        B, S, _ = x.shape
        Sq = 1 if last_only else S
        d = self.head_dim
        normed = block.input_layernorm(x)
        cos, sin = self.cos[:, suffix_start:], self.sin[:, suffix_start:]
        k = _rope(attn.k_proj(normed).view(B, S, self.n_kv, d).transpose(1, 2), cos, sin)
        v = attn.v_proj(normed).view(B, S, self.n_kv, d).transpose(1, 2)
        q = attn.q_proj(normed[:, S - Sq:]).view(B, Sq, self.n_heads, d).transpose(1, 2)
        q = _rope(q, cos[:, S - Sq:], sin[:, S - Sq:])
        ctx = self._attention(layer, q, k, v, suffix_start)
        h_mid = x[:, S - Sq:] + attn.o_proj(ctx)
        m = block.mlp(block.post_attention_layernorm(h_mid))
        out = h_mid + m
        if record is not None:
            for name, value in zip(RECORDED, (x, ctx, h_mid, m, k, v)):
                record[name].append(value[0])
        return out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] (float32) at the last position of h [B, S, D]."""
        return self.lm_head(self.language_model.norm(h[:, -1:]))[:, -1].float()

    def _enter(self, layer: int, patches: Sequence[Patch], suffix_start: int) -> torch.Tensor:
        """Layer-`layer` outputs [n, T - suffix_start, D] of rows patched at that layer: the corrupt
        output with each row's patched position recomputed from the corrupt run's cached values."""
        block = self.layers[layer]
        corrupt = self.corrupt
        pos = torch.tensor([p.position for p in patches], device=self.adapter.device)
        stage = self.stage_of(patches)
        v = self.patched_inputs(layer, patches)
        own_mid = corrupt["resid"][layer][pos] + block.self_attn.o_proj(v["self_attn"])
        h_mid = torch.where(stage == 0, own_mid, corrupt["h_mid"][layer][pos])
        m = torch.where(stage == 0, block.mlp(block.post_attention_layernorm(h_mid)), v["mlp"])
        out = torch.where(stage <= 1, h_mid + m, v["layer"])
        rows = corrupt["resid"][layer + 1][suffix_start:].expand(len(patches), -1, -1).clone()
        rows[torch.arange(len(patches)), pos - suffix_start] = out
        return rows

    # -- patched rows -----------------------------------------------------------------------
    def order_key(self, patch: Patch) -> tuple:
        # Rows of one chunk then share (nearly) the same recomputed suffix.
        return (patch.position, patch.layer, self.stage(patch.site), patch.head)

    def row_bytes(self, patch: Patch) -> int:
        hidden = self.layers[0].mlp.gate_proj.in_features
        width = self.layers[0].mlp.gate_proj.out_features
        S = self.seq_len - patch.position
        elements = S * (10 * hidden + 3 * width) + 3 * self.n_heads * S * self.seq_len  # scores in float32
        return elements * self.adapter.dtype.itemsize

    @torch.no_grad()
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        suffix_start = min(p.position for p in patches)
        last = len(self.layers) - 1
        resid = self.corrupt["resid"]
        h: torch.Tensor | None = None
        order: list[int] = []
        for layer in range(min(p.layer for p in patches), last + 1):
            if h is not None:
                h = self._layer(layer, h, suffix_start, last_only=layer == last)
                if layer < last:
                    # Positions between the suffix start and a row's own patched position are the
                    # corrupt run's (causality): keep them bit-identical.
                    frozen = self._frozen([patches[i] for i in order], suffix_start)
                    h = torch.where(frozen, resid[layer + 1][suffix_start:], h)
            entering = [i for i, p in enumerate(patches) if p.layer == layer]
            if entering:
                new = self._enter(layer, [patches[i] for i in entering], suffix_start)
                if layer == last and h is not None:
                    new = new[:, -1:]
                h = new if h is None else torch.cat([h, new])
                order += entering
        return self._logits(h)[rows_by_index(order, h.device)]

    def _frozen(self, patches: Sequence[Patch], suffix_start: int) -> torch.Tensor:
        """Bool [n, S, 1]: suffix positions before each row's patched position."""
        positions = torch.arange(suffix_start, self.seq_len, device=self.adapter.device)
        patched = torch.tensor([p.position for p in patches], device=positions.device)
        return (positions[None] < patched[:, None])[..., None]
