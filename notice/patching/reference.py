"""Reference patching engine (the oracle): one full hooked forward pass per patched run.

This is the oracle that faster engines are tested against, so it trades every optimisation for
obviousness: capture the clean activations with hooks on one clean forward, then for each patch run
the corrupt input once more with a hook that overwrites the site's activation at one position (and
one head's slice for head sites) with the clean value. The corrupt run and every patched run apply
`corrupt_image_fn` (Gaussian noise, `notice.patching.corruptions`) to the image embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch

from notice.adapters.base import ModelInput, Patch, VLMAdapter
from notice.patching.hooks import CleanRun, ImageFn, capture, hooked, image_embeddings_replaced
from notice.patching.scores import result_row, scores
from notice.patching.sites import SiteKey, activation_key, check_patch, check_patches


def _overwrite(patch: Patch, clean: torch.Tensor, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x) = x with x[0, position, slice] taken from clean[position, slice]."""
    dims = slice(None) if patch.head < 0 else slice(patch.head * head_dim, (patch.head + 1) * head_dim)

    def overwrite(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()  # never modify a tensor the model may still read elsewhere
        x[0, patch.position, dims] = clean[patch.position, dims].to(x.dtype)
        return x

    return overwrite


def run_patched(
    adapter: VLMAdapter,
    corrupt_inp: ModelInput,
    patch: Patch | Sequence[Patch],
    clean_acts: dict[SiteKey, torch.Tensor],
    corrupt_image_fn: ImageFn | None = None,
) -> torch.Tensor:
    """Answer logits [V] of ONE forward of the corrupt input with the patch(es) applied.

    Several patches are applied together in the same run; patches on the same module compose in
    order (each hook sees the previous one's result).
    """
    patches = [patch] if isinstance(patch, Patch) else list(patch)
    with ExitStack() as stack:
        stack.enter_context(image_embeddings_replaced(adapter, corrupt_image_fn))
        for p in patches:
            check_patch(adapter, p, corrupt_inp.input_ids.shape[1])
            key = activation_key(p.site, p.layer)
            module, kind = adapter.site_module(*key)
            stack.enter_context(hooked(module, kind, _overwrite(p, clean_acts[key], adapter.head_dim)))
        return adapter.answer_logits(corrupt_inp)


def patch_sample(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
    clean: CleanRun | None = None,
) -> list[dict]:
    """One result row (scores.ROW_COLUMNS) per patch, in the order of `patches`.

    The clean run is `clean_inp` as is; the corrupt run is `corrupt_inp` with `corrupt_image_fn`
    (SIP: other image; STR: other prompt of equal token length; noise: same input plus the fn).
    `clean` is the clean run's (logits, activations) when already computed (the workflow's clean
    cache); it must hold every patched site. `token` is the clean prompt's token at the patched position.
    """
    check_patches(adapter, clean_inp, corrupt_inp, patches)
    if clean is None:
        clean = capture(adapter, clean_inp, [(p.site, p.layer) for p in patches])
    clean_logits, clean_acts = clean
    with image_embeddings_replaced(adapter, corrupt_image_fn):
        corrupt_logits = adapter.answer_logits(corrupt_inp)
    clean_scores, corrupt_scores = scores(clean_logits, tau, tau_p), scores(corrupt_logits, tau, tau_p)
    return [
        result_row(
            p.site,
            p.layer,
            p.head,
            p.position,
            clean_inp.tokens[p.position],
            clean_scores,
            corrupt_scores,
            scores(run_patched(adapter, corrupt_inp, p, clean_acts, corrupt_image_fn), tau, tau_p),
        )
        for p in patches
    ]
