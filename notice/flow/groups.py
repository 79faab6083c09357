"""Token groups of one sample: where the image, the object, the question and the answer's position sit.

Positions are those of the patched stream (the adapter's `stream_positions`); the image and the object are keys
of the fusion attention (token fusion: positions of the sequence; cross-attention: the cross-attention's keys).
What each group is in a family comes from its adapter; a group a family has no place for is empty (e.g. no
single answer position in a text encoder read by a decoder, no question in a Q-Former's query tokens, no object
among query tokens that have no place on the image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from notice.adapters.base import ModelInput, VLMAdapter

GROUPS: tuple[str, ...] = ("image", "object", "question", "last", "text")


@dataclass(frozen=True)
class TokenGroups:
    """group -> sorted positions; for "image"/"object" the key indices of the image in the fusion attention."""

    positions: dict[str, tuple[int, ...]]
    image_keys_are_positions: bool  # True for token fusion (image tokens sit in the sequence)

    def keys_in_stream(self, group: str) -> bool:
        """True when `group`'s indices are positions of the stream (False: cross-attention keys)."""
        return self.image_keys_are_positions or group not in ("image", "object")


def token_groups(
    adapter: VLMAdapter, inp: ModelInput, question: str, object_mask: np.ndarray | None = None
) -> TokenGroups:
    """The groups of `inp`: `image` every image key; `object` the image keys whose patch overlaps `object_mask`
    (float [H, W] in [0, 1], as `adapter.mask_view` gives it; None: no object known, empty); `question` the
    question's own tokens in the prompt (not the answer position); `last` the position the answer is read at;
    `text` every other stream position that is not an image token."""
    image = sorted(adapter.image_keys(inp))
    objects = [] if object_mask is None else adapter.object_keys(inp, object_mask)
    answer = adapter.answer_position(inp)
    last = [] if answer is None else [answer]
    asked = [p for p in adapter.question_positions(inp, question) if p not in last]
    taken = set(asked) | set(last) | (set(image) if adapter.image_keys_are_positions else set())
    text = [p for p in adapter.stream_positions(inp) if p not in taken]
    positions = {"image": image, "object": sorted(objects), "question": asked, "last": last, "text": text}
    return TokenGroups({group: tuple(positions[group]) for group in GROUPS}, adapter.image_keys_are_positions)
