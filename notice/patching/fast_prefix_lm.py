"""Fast exact patching for decoder families whose attention is not causal over the prompt: prefix-LM
attention (bidirectional over the image and the prompt, causal over a suffix).

A patch at a prefix position p changes, from the next layer on, every position that attends to p,
those before p included, so the decoder engine's reuse of the corrupt run's keys/values before the
patched position does not hold. Here every row runs the model's own decoder layers (projections,
RoPE, norms, MLPs and attention, soft-capping included) over the whole prompt under the attention mask
the model built for it (recorded per layer: sliding-window layers keep theirs), from its patched
layer on, starting from the corrupt run's layer input; the vision tower and the earlier layers are
skipped. Rows of one chunk are one batch, entering at their own layers.

Positions a patch cannot have changed keep the corrupt run's values bit-identical: in the layer a row
enters at, every position but the patched one; after it, the positions that no changed position
reaches through the layers' masks (the suffix before a patched suffix position; none once a prefix
position is patched). The last layer computes its output at the scored (last) position only, from the
keys and values of every position; a patch there at another position cannot reach the score, so its
row is the corrupt run's.

The clean and corrupt runs are captured as the decoder engine captures them (`DecoderFast`), with the
masks added; its hooks write the clean values into the rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Literal

import torch

from notice.adapters.base import Patch
from notice.adapters.decoder import residual_added
from notice.patching.fast_core import main_output, rows_by_index
from notice.patching.fast_decoder import DecoderFast, allowed_keys
from notice.patching.hooks import hooked

# The modules of a layer whose input (or output) holds the last position only in `_scored_position_only`.
SCORED_ONLY: tuple[tuple[str, Literal["input", "output"]], ...] = (
    ("self_attn", "input"),
    ("mlp", "input"),
    ("layer", "output"),
)


class PrefixLMFast(DecoderFast):
    # -- cached runs ------------------------------------------------------------------------
    def take_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Any mask the model builds; rows run under it, and a change spreads along its allowed keys."""
        self.masks = list(masks)
        self.allowed = [allowed_keys(mask) for mask in masks]

    # -- patched rows -----------------------------------------------------------------------
    def order_key(self, patch: Patch) -> tuple:
        # A row's cost depends on its layer only (it recomputes every position).
        return (patch.layer, self.stage(patch.site), patch.position, patch.head)

    def row_bytes(self, patch: Patch) -> int:
        # Every row holds the whole prompt: the decoder engine's row patched at position 0.
        return super().row_bytes(replace(patch, position=0))

    @contextmanager
    def _scored_position_only(self, layer: int) -> Iterator[None]:
        """While active, the layer computes its attention output projection, MLP and output at the last
        position only ([n, 1, ·]); queries, keys and values are still computed at every position. The
        residual adds broadcast, so the layer's last position is exact and the others are not used."""

        def last_position(x: torch.Tensor) -> torch.Tensor:
            return x[:, -1:]

        with ExitStack() as stack:
            for site, kind in SCORED_ONLY:
                stack.enter_context(hooked(self.adapter.site_module(site, layer)[0], kind, last_position))
            yield

    @torch.no_grad()
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        last, scored = len(self.layers) - 1, self.seq_len - 1
        live = [i for i, p in enumerate(patches) if p.layer < last or p.position == scored]
        logits = self.corrupt_logits.expand(len(patches), -1).clone()
        if live:
            logits[live] = self._run_live([patches[i] for i in live])
        return logits

    def _run_live(self, patches: Sequence[Patch]) -> torch.Tensor:
        """Answer logits [n, V] of rows whose patch can reach the scored position."""
        last = len(self.layers) - 1
        device = self.adapter.device
        h: torch.Tensor | None = None
        changed: torch.Tensor | None = None  # bool [rows, T]: positions that differ from the corrupt run
        order: list[int] = []
        for layer in range(min(p.layer for p in patches), last + 1):
            entering = [i for i, p in enumerate(patches) if p.layer == layer]
            first_row = 0 if h is None else h.shape[0]
            if entering:
                new = self.resid[layer].expand(len(entering), -1, -1)
                h = new if h is None else torch.cat([h, new])
                order += entering
            chosen = [patches[i] for i in entering]
            with ExitStack() as stack:
                start = 0
                if layer == last:
                    stack.enter_context(self._scored_position_only(layer))
                    start = self.seq_len - 1  # the site tensors hold the last position only
                stack.enter_context(self.clean_value_hooks(layer, chosen, first_row, start))
                h = main_output(
                    self.layers[layer](
                        h, attention_mask=self.masks[layer], position_embeddings=self.position_embeddings[layer]
                    )
                )
            h = residual_added(self.additions, layer, h, start)
            if layer == last:
                break
            if changed is not None:
                # A position changes where it attends to a changed position.
                reached = changed.float() @ self.allowed[layer].T.float()
                changed = changed | (reached > 0)
            patched = torch.tensor([p.position for p in chosen], dtype=torch.long, device=device)
            entered = torch.nn.functional.one_hot(patched, self.seq_len).bool()
            changed = entered if changed is None else torch.cat([changed, entered])
            if not bool(changed.all()):
                h = torch.where(changed[..., None], h, self.resid[layer + 1])
        assert h is not None, "no patch at a layer of the model"
        return self.adapter.final_logits(h[:, -1])[rows_by_index(order, device)]
