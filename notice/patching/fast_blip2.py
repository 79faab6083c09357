"""Fast exact patching for the Q-Former stream of BLIP-2 / InstructBLIP (`adapters.blip2.QFormerStreamAdapter`).

A patch in the Q-Former changes every later query (the queries attend to each other in both
directions) and so the language model's whole prefix (the query tokens are the prompt's first
positions): nothing after the patched Q-Former layer can be shared between rows. What is exact and
shared is everything before it. Per sample the engine runs the clean (unless cached) and the corrupt
input through the model's own forward once, recording the site activations, every Q-Former layer's
input and the arguments the layers were called with (masks, the image embeddings their
cross-attention reads), and the corrupt prompt's token embeddings.

A chunk of rows runs the model's own Q-Former layers from the smallest patched layer on: a row enters
at its layer from the corrupt run's input of that layer, patched by the same forward hook on the
site's module as the reference engine's; the image embeddings stay one copy that every row's
cross-attention broadcasts over (the vision tower never runs again). The query outputs go through
`language_projection` into the `<image>` positions of the corrupt prompt's embeddings, and the
language model's own forward on the batch gives each row's next-token logits at the last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, cast

import torch

from notice.adapters.base import ModelInput, Patch
from notice.adapters.blip2 import QFormerStreamAdapter
from notice.patching.fast_core import FastFamily, Run, rows_by_index
from notice.patching.hooks import CleanRun, ImageFn, hooked, image_embeddings_replaced


class QFormerFast(FastFamily):
    stages = ("self_attn", "cross_attn", "mlp", "layer")
    adapter: QFormerStreamAdapter

    def __init__(
        self,
        adapter: QFormerStreamAdapter,
        clean_inp: ModelInput,
        corrupt_inp: ModelInput,
        image_fn: ImageFn | None = None,
        clean: CleanRun | None = None,
    ):
        self.qformer_layers = adapter.qformer_layers
        self.stream_layers = adapter.stream_layers
        self.queries = adapter.query_positions(corrupt_inp)
        self.attention_mask = corrupt_inp.attention_mask
        super().__init__(adapter, clean_inp, corrupt_inp, image_fn, clean)
        if clean is not None:
            # The Q-Former runs in float32 whatever the model's dtype: cached clean values stay as captured.
            self.sites["clean"] = {key: value.to(adapter.device) for key, value in clean[1].items()}

    # -- cached runs ------------------------------------------------------------------------
    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        if clean_inp is not None:
            self.clean_logits = self._capture("clean", clean_inp, None)
        # Captured last, so the layer inputs and arguments patched rows read are the corrupt run's.
        self.corrupt_logits = self._capture("corrupt", corrupt_inp, image_fn)
        with torch.no_grad():
            self.prompt_embeds = self.adapter.model.get_input_embeddings()(corrupt_inp.input_ids)

    def _capture(self, run: Run, inp: ModelInput, image_fn: ImageFn | None) -> torch.Tensor:
        """The model's own forward of `inp`: record sites, Q-Former layer inputs and call arguments."""
        n = self.adapter.n_layers
        record: dict[str, list[torch.Tensor | None]] = {site: [None] * n for site in self.stages}
        resid: list[torch.Tensor | None] = [None] * len(self.qformer_layers)
        calls: list[tuple[tuple, dict[str, Any]]] = []

        def site_recorder(site: str, layer: int):
            def record_site(x: torch.Tensor) -> torch.Tensor:
                record[site][layer] = x[0].detach()
                return x

            return record_site

        def layer_input(layer: int):
            def hook(_module, args, kwargs):
                resid[layer] = args[0].detach()
                if layer == 0:
                    calls.append((args[1:], kwargs))

            return hook

        with ExitStack() as stack:
            stack.enter_context(image_embeddings_replaced(self.adapter, image_fn))
            for layer, block in enumerate(self.qformer_layers):
                handle = block.register_forward_pre_hook(layer_input(layer), with_kwargs=True)
                stack.callback(handle.remove)
            for layer in range(n):
                for site in self.stages:
                    module, kind = self.adapter.site_module(site, layer)
                    stack.enter_context(hooked(module, kind, site_recorder(site, layer)))
            logits = self.adapter.answer_logits(inp)
        # Every stream layer's sites and every Q-Former layer's input are recorded by now.
        self.record_sites(run, cast(dict[str, list[torch.Tensor]], record))
        self.resid = cast(list[torch.Tensor], resid)
        self.layer_args, self.layer_kwargs = calls[0]
        return logits

    # -- patched rows -----------------------------------------------------------------------
    def order_key(self, patch: Patch) -> tuple:
        # Rows of one chunk then start at the same or neighbouring layers.
        return (patch.layer, patch.position, self.stage(patch.site), patch.head)

    def row_bytes(self, patch: Patch) -> int:
        """The language model's forward dominates; the Q-Former's is added (float32, as it is kept)."""
        text = self.adapter.text_config
        hidden = int(text.hidden_size)
        width = int(getattr(text, "intermediate_size", getattr(text, "ffn_dim", 4 * hidden)))
        T = self.seq_len
        lm = T * (10 * hidden + 3 * width) + 3 * self.adapter.n_heads * T * T
        tokens = self.resid[0].shape[1]
        images = self.layer_args[1].shape[1]
        qformer = tokens * (14 * self.adapter.hidden_size + 3 * self.adapter.n_heads * (tokens + images))
        return lm * self.adapter.dtype.itemsize + 4 * qformer

    @torch.no_grad()
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        entry = [self.stream_layers[p.layer] for p in patches]  # the Q-Former layer each row enters at
        h: torch.Tensor | None = None
        order: list[int] = []
        for qformer_layer in range(min(entry), len(self.qformer_layers)):
            entering = [i for i, layer in enumerate(entry) if layer == qformer_layer]
            first_row = 0 if h is None else h.shape[0]
            if entering:
                new = self.resid[qformer_layer].expand(len(entering), -1, -1)
                h = new if h is None else torch.cat([h, new])
                order += entering
            stream_layer = self.stream_layers.index(qformer_layer) if entering else -1
            with self.clean_value_hooks(stream_layer, [patches[i] for i in entering], first_row):
                h = self.qformer_layers[qformer_layer](cast(torch.Tensor, h), *self.layer_args, **self.layer_kwargs)
        assert h is not None, "no patch at a layer of the Q-Former"
        return self._answer_logits(h)[rows_by_index(order, h.device)]

    def _answer_logits(self, qformer_output: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] (float32) of the corrupt prompt with each row's query outputs."""
        model = self.adapter.model
        projection = model.language_projection
        projected = projection(qformer_output[:, : len(self.queries)].to(projection.weight.dtype))
        embeds = self.prompt_embeds.expand(projected.shape[0], -1, -1).clone()
        embeds[:, self.queries] = projected.to(embeds.dtype)
        mask = self.attention_mask.expand(projected.shape[0], -1)
        return self.adapter.answer_logits_of(
            lambda: model.language_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        )
