"""Fast exact patching for every token-fusion family: a decoder language model reads the image tokens.

Built on the model's own decoder layers: projections, rotary embeddings (multimodal RoPE included:
the position embeddings are the ones the model computed for the prompt), norms and MLPs are the
model's code. Only the attention function is ours, registered with transformers'
`AttentionInterface` and switched on while patched rows run, so that the rows of a sample attend to
one shared copy of the corrupt run's prefix keys/values.

Per sample the engine runs the clean (unless cached) and the corrupt input through the model's own
forward once, recording the site activations, every layer's input (the residual stream), the
position embeddings the layers were given and the key/value cache.

A row patched at (layer L, position p) changes nothing before p (causal attention). A chunk of rows
with smallest patched position s runs layers from the smallest patched layer on, for positions
s..T-1 only: a row enters at its own layer from the corrupt run's residual stream, the patch is the
same forward hook on the site's module as the reference engine's, and its queries attend to the
corrupt run's cached keys/values of positions < s (held once, not copied per row) and to the row's own
keys/values of positions >= s under the causal mask. Positions the patch cannot change keep the
corrupt run's values: those before the row's own patched position, and in the layer it enters at,
all but the patched one. What a model adds to the residual stream between layers besides their outputs
(`DecoderVLMAdapter.residual_additions_recorded`: DeepStack's image features) is the corrupt run's, added
after each layer as the model adds it. The score is the next-token logits at the last position. (A subclass
whose masks are not causal says where a row starts, `row_start`, and gives the suffix attention the model's
masks, `suffix_allowed`: notice.patching.fast_block_causal.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

import torch
from transformers import AttentionInterface, DynamicCache

from notice.adapters.attention_taps import attention_switched
from notice.adapters.base import ModelInput, Patch
from notice.adapters.decoder import DecoderVLMAdapter, ResidualAddition, residual_added
from notice.patching.fast_core import FastFamily, Run, main_output, rows_by_index
from notice.patching.hooks import ImageFn, hooked, image_embeddings_replaced

ATTENTION_NAME = "notice_shared_prefix"


@dataclass
class SharedPrefix:
    """The corrupt run's keys/values [1, H_kv, T, d] per layer; positions < `start` are attended to."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int
    # Per layer, bool [T, T]: query q attends to key k (the model's own masks); None: causal, no window.
    allowed: list[torch.Tensor] | None = None


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefix | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of the suffix positions start..T-1 over the shared prefix and their own keys: causal, or
    under the model's own masks where `shared_prefix.allowed` holds them (their rows start.. of each layer's).

    query [B, H, S, d], key/value [B, H_kv, S, d] (after the model's own RoPE); returns [B, S, H, d]
    as transformers' eager attention does. Query heads of one key/value head are grouped as
    `repeat_kv` does (head h reads key/value head h // (H / H_kv)); rows and heads of a key/value
    head are stacked into one matrix against the prefix, so the prefix is never expanded per row.
    """
    if shared_prefix is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the fast engine's patched rows")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the fast engine")
    window = kwargs.get("sliding_window")
    start = shared_prefix.start
    layer_idx = cast(int, module.layer_idx)  # set by transformers on every attention module
    B, H, S, d = query.shape
    n_kv = key.shape[1]
    n_rep = H // n_kv
    if shared_prefix.allowed is None:
        if window is not None and start + key.shape[2] > window:
            raise NotImplementedError(f"sliding-window attention (window {window}) is not supported by the fast engine")
        blocked = torch.ones(S, S, dtype=torch.bool, device=query.device).triu(1).repeat(n_rep, 1)
        prefix_blocked = None
    else:  # the window, if any, is in the model's mask
        allowed = shared_prefix.allowed[layer_idx][start:]
        blocked = ~allowed[:, start:].repeat(n_rep, 1)
        prefix_blocked = ~allowed[:, :start].repeat(n_rep, 1)
    scale = scaling if scaling is not None else d**-0.5
    grouped = query.reshape(B, n_kv, n_rep * S, d)
    scores = (torch.matmul(grouped, key.transpose(-1, -2)) * scale).masked_fill(blocked, torch.finfo(query.dtype).min)
    prefix_k = shared_prefix.keys[layer_idx][0, :, :start]
    prefix_v = shared_prefix.values[layer_idx][0, :, :start]
    if start:
        stacked = grouped.transpose(0, 1).reshape(n_kv, B * n_rep * S, d)
        prefix = (torch.matmul(stacked, prefix_k.transpose(-1, -2)) * scale).view(n_kv, B, n_rep * S, start)
        if prefix_blocked is not None:
            prefix = prefix.masked_fill(prefix_blocked, torch.finfo(query.dtype).min)
        scores = torch.cat([prefix.transpose(0, 1), scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., start:], value)
    if start:
        stacked = probs[..., :start].transpose(0, 1).reshape(n_kv, B * n_rep * S, start)
        out = out + torch.matmul(stacked, prefix_v).view(n_kv, B, n_rep * S, d).transpose(0, 1)
    return out.reshape(B, H, S, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


def allowed_keys(mask: torch.Tensor | None) -> torch.Tensor:
    """Bool [T, T]: query q attends to key k, from a layer's materialised mask ([1, 1, T, T]: bool, or
    additive with 0 where allowed)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            "the fast engine needs the attention mask as a tensor (eager or sdpa attention); "
            f"the layers were given {type(mask).__name__}"
        )
    return mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0


@contextmanager
def layer_inputs_recorded(
    layers: Iterable[torch.nn.Module], resid: list, masks: list, position_embeddings: list
) -> Iterator[None]:
    """While active, a forward writes each decoder layer's input (the residual stream [T, D] of batch row 0) into
    `resid[layer]`, the attention mask it was given into `masks[layer]`, and its position embeddings (None
    without rotary embeddings; layer types may have their own) into `position_embeddings[layer]`."""

    def layer_input(layer: int):
        def hook(_module, args, kwargs):
            resid[layer] = (args[0] if args else kwargs["hidden_states"])[0].detach()
            masks[layer] = kwargs.get("attention_mask")
            position_embeddings[layer] = kwargs.get("position_embeddings")

        return hook

    with ExitStack() as stack:
        for layer, block in enumerate(layers):
            handle = block.register_forward_pre_hook(layer_input(layer), with_kwargs=True)
            stack.callback(handle.remove)
        yield


class DecoderFast(FastFamily):
    stages: ClassVar[tuple[str, ...]] = ("self_attn", "mlp", "layer")
    adapter: DecoderVLMAdapter
    # Per layer, the masks the suffix attention applies (`SharedPrefix.allowed`); None: causal.
    suffix_allowed: list[torch.Tensor] | None = None

    def __init__(self, adapter: DecoderVLMAdapter, clean_inp: ModelInput, corrupt_inp: ModelInput, *args, **kwargs):
        for inp in (clean_inp, corrupt_inp):
            if not bool(inp.attention_mask.all()):
                raise ValueError("the fast decoder engine takes unpadded prompts (attention mask all ones)")
        self.layers = adapter.layers
        super().__init__(adapter, clean_inp, corrupt_inp, *args, **kwargs)

    # -- cached runs ------------------------------------------------------------------------
    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        if clean_inp is not None:
            self.clean_logits = self._capture("clean", clean_inp, None)
        # Captured last, so the residual stream and keys/values patched rows read are the corrupt run's.
        self.corrupt_logits = self._capture("corrupt", corrupt_inp, image_fn)

    def _capture(self, run: Run, inp: ModelInput, image_fn: ImageFn | None) -> torch.Tensor:
        """The model's own forward of `inp`: record sites, layer inputs, position embeddings, keys/values."""
        record: dict[str, list[torch.Tensor | None]] = {site: [None] * len(self.layers) for site in self.stages}
        resid: list[torch.Tensor | None] = [None] * len(self.layers)
        # Per layer; None without rotary embeddings (learned absolute positions are added before layer 0).
        position_embeddings: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)

        def site_recorder(site: str, layer: int):
            def record_site(x: torch.Tensor) -> torch.Tensor:
                record[site][layer] = x[0].detach()
                return x

            return record_site

        masks: list[torch.Tensor | None] = [None] * len(self.layers)
        additions: list[ResidualAddition] = []
        cache = self.key_value_cache()
        with ExitStack() as stack:
            stack.enter_context(image_embeddings_replaced(self.adapter, image_fn))
            stack.enter_context(layer_inputs_recorded(self.layers, resid, masks, position_embeddings))
            stack.enter_context(self.adapter.residual_additions_recorded(additions))
            for layer in range(len(self.layers)):
                for site in self.layer_stages(layer):
                    module, kind = self.adapter.site_module(site, layer)
                    stack.enter_context(hooked(module, kind, site_recorder(site, layer)))
            logits = self.adapter.answer_logits_of(
                lambda: self.adapter.forward(inp, use_cache=True, past_key_values=cache).logits[0, -1]
            )
        # Every layer's sites, input and mask are recorded by now.
        self.take_masks(masks)
        self.record_sites(run, cast(dict[str, list[torch.Tensor]], record))
        self.cache = cache
        self.additions = {addition.layer: addition for addition in additions}
        output = residual_added(self.additions, len(self.layers) - 1, cast(torch.Tensor, record["layer"][-1])[None])
        self.resid = cast(list[torch.Tensor], resid + [output[0]])
        self.position_embeddings = position_embeddings
        # A decoder's cache layers: keys/values set in attention layers (None in a hybrid model's linear-attention
        # layers, which keep recurrent states instead).
        cached: list[Any] = cache.layers
        keys, values = (
            [getattr(layer, "keys", None) for layer in cached],
            [getattr(layer, "values", None) for layer in cached],
        )
        self.prefix = SharedPrefix(cast(list[torch.Tensor], keys), cast(list[torch.Tensor], values), 0)
        return logits

    def key_value_cache(self) -> DynamicCache:
        """The cache the captured forward fills; patched rows read its keys/values of every position."""
        return DynamicCache(config=self.adapter.model.config)

    def layer_stages(self, layer: int) -> list[str]:
        """The stage sites `layer` has (the adapter's `layer_sites`, and the layer's output)."""
        return [site for site in self.stages if site == "layer" or site in self.adapter.layer_sites(layer)]

    def take_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Refuse a model whose layers let a position attend to a later one: reusing the corrupt run's
        keys/values before the patched position is exact for causal attention only."""
        for layer, mask in enumerate(masks):
            if isinstance(mask, torch.Tensor) and bool(allowed_keys(mask).triu(1).any()):
                raise ValueError(
                    f"layer {layer} attends to later positions (not causal, e.g. prefix-LM attention): the "
                    "decoder fast engine would be wrong; give the family the engine "
                    "notice.patching.fast_block_causal:BlockCausalFast (later positions within blocks, e.g. an "
                    "image's tokens) or notice.patching.fast_prefix_lm:PrefixLMFast (a bidirectional prefix) in "
                    "the family table, or use engine 'reference'"
                )

    # -- patched rows -----------------------------------------------------------------------
    def row_start(self, patch: Patch) -> int:
        """The first position the patch can change (causal attention: the patched one)."""
        return patch.position

    def order_key(self, patch: Patch) -> tuple:
        # Rows of one chunk then share (nearly) the same recomputed suffix.
        return (self.row_start(patch), patch.position, patch.layer, self.stage(patch.site), patch.head)

    def row_bytes(self, patch: Patch) -> int:
        hidden = self.adapter.hidden_size
        width = int(getattr(self.adapter.text_config, "intermediate_size", 4 * hidden))
        S = self.seq_len - self.row_start(patch)
        elements = S * (10 * hidden + 3 * width) + 3 * self.adapter.n_heads * S * self.seq_len  # scores in float32
        return elements * self.adapter.dtype.itemsize

    @torch.no_grad()
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        start = min(self.row_start(p) for p in patches)
        last = len(self.layers) - 1
        prefix = replace(self.prefix, start=start, allowed=self.suffix_allowed)
        h: torch.Tensor | None = None
        order: list[int] = []
        with attention_switched(self.adapter.self_attentions, ATTENTION_NAME):
            for layer in range(min(p.layer for p in patches), last + 1):
                entering = [i for i, p in enumerate(patches) if p.layer == layer]
                first_row = 0 if h is None else h.shape[0]
                if entering:
                    new = self.resid[layer][start:].expand(len(entering), -1, -1)
                    h = new if h is None else torch.cat([h, new])
                    order += entering
                assert h is not None, "the first layer run is some row's entry layer"
                embeddings = self.position_embeddings[layer]
                cos_sin = None if embeddings is None else tuple(x[..., start:, :] for x in embeddings)
                h = self.run_layer(layer, h, [patches[i] for i in entering], first_row, cos_sin, prefix)
                # What the model adds after the layer (DeepStack: the corrupt run's image features), as it adds it;
                # the frozen positions' resid[layer + 1] has it already.
                h = residual_added(self.additions, layer, h, start)
                # Positions the patch cannot have changed keep the corrupt run's values bit-identical,
                # whatever the batch: before a row's start (causality: its patched position) and, in the
                # layer it enters at, every position but the patched one.
                frozen = self._frozen([patches[i] for i in order], layer, start)
                h = torch.where(frozen, self.resid[layer + 1][start:], h)
        assert h is not None, "no patch at a layer of the model"
        return self.adapter.final_logits(h[:, -1])[rows_by_index(order, h.device)]

    def run_layer(
        self,
        layer: int,
        h: torch.Tensor,
        entering: Sequence[Patch],
        first_row: int,
        cos_sin: tuple[torch.Tensor, ...] | None,
        prefix: SharedPrefix,
    ) -> torch.Tensor:
        """Decoder layer `layer` on the rows' positions prefix.start..T-1 [n, S, D], the clean values of the rows
        `first_row`.. entering here (`entering`) written at their sites."""
        with self.clean_value_hooks(layer, entering, first_row, prefix.start):
            return main_output(
                self.layers[layer](h, attention_mask=None, position_embeddings=cos_sin, shared_prefix=prefix)
            )

    def _frozen(self, patches: Sequence[Patch], layer: int, start: int) -> torch.Tensor:
        """Bool [n, S, 1]: the suffix positions of each row that still hold the corrupt run's values
        after `layer`."""
        positions = torch.arange(start, self.seq_len, device=self.adapter.device)[None]
        patched = torch.tensor([p.position for p in patches], device=positions.device)[:, None]
        starts = torch.tensor([self.row_start(p) for p in patches], device=positions.device)[:, None]
        entered_here = torch.tensor([p.layer == layer for p in patches], device=positions.device)[:, None]
        return ((positions < starts) | (entered_here & (positions != patched)))[..., None]
