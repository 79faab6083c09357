"""Activation-patching engines: `reference` (the oracle: one hooked forward per patched run) and `fast`.

Both take the same arguments and return the same rows (see `reference.patch_sample`):
``patch_sample(adapter, clean_inp, corrupt_inp, patches, tau, tau_p, corrupt_image_fn=None, clean=None)``
where `clean` is an optional precomputed clean run (logits, activations) from the clean cache.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

ENGINES = ("reference", "fast")


def get_engine(name: str, batch_size: int = 64) -> Callable[..., list[dict]]:
    """The `patch_sample` of engine `name`; `batch_size` is the fast engine's rows per forward pass."""
    if name == "reference":
        from notice.patching.reference import patch_sample

        return patch_sample
    if name == "fast":
        from notice.patching.fast import patch_sample as fast_patch_sample

        return partial(fast_patch_sample, batch_size=batch_size)
    raise ValueError(f"config: patching.engine = {name!r}; expected one of {ENGINES}")
