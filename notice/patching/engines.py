"""Choose a patching engine by name: `reference` (the oracle: one hooked forward per patched run) or `fast`.

Every engine is a function with the signature of `reference.patch_sample`:
``engine(adapter, clean_inp, corrupt_inp, patches, tau, tau_p, corrupt_image_fn=None, clean=None)`` → one
result row (`scores.ROW_COLUMNS`) per patch, in the order of `patches`; `clean` is an optional precomputed
clean run (logits, activations) from the clean cache. The fusion attention's query and key sites, which no
module's input or output holds, go to `query_keys.patch_queries_keys` whatever the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

from notice.adapters.base import ModelInput, Patch, VLMAdapter
from notice.patching.hooks import CleanRun, ImageFn
from notice.patching.query_keys import patch_queries_keys, qk_sites

ENGINES = ("reference", "fast")
Engine = Callable[..., list[dict]]


def get_engine(name: str, batch_size: int) -> Engine:
    """The engine `name`; `batch_size` is the fast engine's most rows per forward pass."""
    if name == "reference":
        from notice.patching.reference import patch_sample
    elif name == "fast":
        from notice.patching.fast import patch_sample as fast_patch_sample

        patch_sample = partial(fast_patch_sample, batch_size=batch_size)
    else:
        raise ValueError(f"config: patching.engine = {name!r}; expected one of {ENGINES}")
    return partial(patch_routed, patch_sample)


def patch_routed(
    engine: Engine,
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
    clean: CleanRun | None = None,
) -> list[dict]:
    """`engine`'s rows for the module and head sites and `patch_queries_keys`'s for query and key sites, in
    the order of `patches`."""
    qk = set(qk_sites(adapter))
    tapped = [p.site in qk for p in patches]
    hooked_rows: Iterator[dict] = iter(())
    tapped_rows: Iterator[dict] = iter(())
    if not all(tapped):  # each engine runs only when it has patches: its clean and corrupt runs cost forwards
        hooked = [p for p, t in zip(patches, tapped) if not t]
        hooked_rows = iter(engine(adapter, clean_inp, corrupt_inp, hooked, tau, tau_p, corrupt_image_fn, clean))
    if any(tapped):
        chosen = [p for p, t in zip(patches, tapped) if t]
        tapped_rows = iter(patch_queries_keys(adapter, clean_inp, corrupt_inp, chosen, tau, tau_p, corrupt_image_fn))
    return [next(tapped_rows) if t else next(hooked_rows) for t in tapped]
