"""Choose a patching engine by name: `reference` (the oracle: one hooked forward per patched run) or `fast`.

Every engine is a function with the signature of `reference.patch_sample`:
``engine(adapter, clean_inp, corrupt_inp, patches, tau, tau_p, corrupt_image_fn=None, clean=None)`` → one
result row (`scores.ROW_COLUMNS`) per patch, in the order of `patches`; `clean` is an optional precomputed
clean run (logits, activations) from the clean cache. The fusion attention's query and key sites, which no
module's input or output holds, go to `query_keys.patch_queries_keys` whatever the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    tapped = [i for i, p in enumerate(patches) if p.site in qk]
    if not tapped:
        return engine(adapter, clean_inp, corrupt_inp, patches, tau, tau_p, corrupt_image_fn, clean)
    hooked = [i for i, p in enumerate(patches) if p.site not in qk]
    rows: list[dict] = [{}] * len(patches)
    if hooked:
        found = engine(
            adapter, clean_inp, corrupt_inp, [patches[i] for i in hooked], tau, tau_p, corrupt_image_fn, clean
        )
        for i, row in zip(hooked, found):
            rows[i] = row
    found = patch_queries_keys(
        adapter, clean_inp, corrupt_inp, [patches[i] for i in tapped], tau, tau_p, corrupt_image_fn
    )
    for i, row in zip(tapped, found):
        rows[i] = row
    return rows
