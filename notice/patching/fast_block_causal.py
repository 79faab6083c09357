"""Fast exact patching for decoders whose attention is causal except within blocks of positions that attend to
each other in both directions (an image's tokens), under whatever sliding windows the model's masks hold.

A patch at position p changes, from the next layer on, every position that attends to a changed one: under such
masks the positions from p on and the earlier positions of p's block, never one before the block. So a row
recomputes only the positions from its start on (`row_start`): the least position s such that no position before
s attends, in any layer, to one at or after s (p itself for a text position, the block's first position for an
image token), and shares the corrupt run's keys/values of the positions before it, as the decoder engine does
(`DecoderFast`: the same layers, hooks and chunks of rows). Its suffix attention applies the mask the model built
for each layer, rows start.. of it (blocks, causal text, each layer type's window) instead of the causal one. The
corrupt run's cache keeps every position of a sliding-window layer: a suffix query may read keys that the model's
generation cache drops.

Under masks that let a patch reach far back (a bidirectional prefix) rows start at 0: still exact, but no faster
than the prefix-LM engine (notice.patching.fast_prefix_lm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from notice.adapters.base import ModelInput, Patch
from notice.patching.fast_decoder import DecoderFast, allowed_keys
from notice.patching.hooks import ImageFn


def row_starts(allowed: Sequence[torch.Tensor]) -> list[int]:
    """Per position p, the first position a change at p can reach through the layers (`allowed`: per layer, bool
    [T, T], query q attends to key k): the largest s <= p such that no position before s attends, in any layer, to
    a position at or after s."""
    union = torch.stack(list(allowed)).any(0)
    positions = torch.arange(union.shape[0], device=union.device)
    # The last key each query attends to in any layer (at least itself).
    farthest = torch.maximum(torch.where(union, positions, -1).amax(1), positions)
    # first[e]: the first query attending to a position >= e (argmax gives the first True).
    first = (farthest[None, :] >= positions[:, None]).int().argmax(1).tolist()
    starts = []
    for position in range(len(first)):
        start = position
        while first[start] < start:  # what the earlier query reaches is changed too: follow it
            start = first[start]
        starts.append(start)
    return starts


class BlockCausalFast(DecoderFast):
    # -- cached runs ------------------------------------------------------------------------
    def key_value_cache(self) -> DynamicCache:
        cache = super().key_value_cache()
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.activate_past_recording()  # keep every position, not only the window's last ones
        return cache

    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        super().capture_runs(clean_inp, corrupt_inp, image_fn)
        for layer, keys in enumerate(self.prefix.keys):
            if keys.shape[2] != self.seq_len:
                raise NotImplementedError(
                    f"layer {layer}'s cache holds {keys.shape[2]} of the prompt's {self.seq_len} keys (a cache that "
                    "drops positions, e.g. chunked attention): the block-causal engine needs them all; use engine "
                    "'reference'"
                )

    def take_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Any mask the model builds: the suffix attention applies it, and a row starts where it lets the patch
        reach."""
        self.suffix_allowed = [allowed_keys(mask) for mask in masks]
        self.starts = row_starts(self.suffix_allowed)

    # -- patched rows -----------------------------------------------------------------------
    def row_start(self, patch: Patch) -> int:
        return self.starts[patch.position]
