"""A family that is not in the family table: what adding one takes, for tests/test_families.py.

Its adapter is a second adapter of LLaVA checkpoints (an opt-in one, as another patched stream would be); it
shares LLaVA's engine, tiny builder and bench layout, so its row is all the rest it needs.
"""

from __future__ import annotations

from notice.adapters.llava import LlavaAdapter
from notice.families import Family


class TwinLlavaAdapter(LlavaAdapter):
    """LLaVA once more, under another name."""


ROW = Family(
    "twin_llava",
    ("llava",),
    adapter="throwaway_family:TwinLlavaAdapter",
    engine="notice.patching.fast_decoder:DecoderFast",
    tiny="notice.testing.tiny_llava:build",
    bench="notice.bench.layouts.llava",
    opt_in=True,
)
