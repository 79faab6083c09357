"""The measurements of `make bench`: the fast engine against (a) one hooked forward per patched run and (b) the
published code's 3-row batch per patch, and the attribution screen against exact patching of its sites."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.bench.case import Case
from notice.patching import fast, reference
from notice.patching.attribution import IMAGE_SITE, attribution_estimates, screen_sites
from notice.patching.hooks import capture, hooked
from notice.patching.query_keys import qk_sites
from notice.patching.scores import result_row, scores

T = TypeVar("T")


# -- (b) the published method: a batch of (clean, corrupt, patched) rows per patch ---------------
def stack_rows(inputs: Sequence[ModelInput]) -> ModelInput:
    """One batch of single-sample inputs: every tensor concatenated along its first dimension (rows,
    tiles or flattened patches alike, as a processor batches them)."""
    first = inputs[0]
    return ModelInput(
        torch.cat([i.input_ids for i in inputs]),
        torch.cat([i.attention_mask for i in inputs]),
        torch.cat([i.pixel_values for i in inputs]),
        first.tokens,
        {key: torch.cat([i.extra[key] for i in inputs]) for key in first.extra},
    )


@torch.no_grad()
def three_row_patch(case: Case, patch: Patch) -> torch.Tensor:
    """Logits [V] of the patched row of one (clean, corrupt, patched) batch, as the published code does."""
    adapter = case.adapter
    batch = stack_rows([case.clean, case.corrupt, case.corrupt])
    module, kind = adapter.site_module(HEAD_SITE_PARENT.get(patch.site, patch.site), patch.layer)
    dims = slice(None) if patch.head < 0 else slice(patch.head * adapter.head_dim, (patch.head + 1) * adapter.head_dim)

    def copy_clean_row(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[2, patch.position, dims] = x[0, patch.position, dims]
        return x

    with hooked(module, kind, copy_clean_row):
        return case.rows_logits(adapter, batch)[2]


# -- measurement ----------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    _sync()
    start = time.perf_counter()
    value = fn()
    _sync()
    return value, time.perf_counter() - start


def measure(case: Case, n_hooked: int, n_three_row: int, batch_size: int, seed: int) -> dict:
    adapter, clean, corrupt = case.adapter, case.clean, case.corrupt
    rows, t_fast = _timed(
        lambda: fast.patch_sample(adapter, clean, corrupt, case.patches, case.tau, case.tau_p, batch_size=batch_size)
    )
    subset = sorted(random.Random(seed).sample(range(len(case.patches)), n_hooked))

    # (a): clean activations captured once; one hooked forward of the corrupt input per patch.
    clean_logits, clean_acts = capture(adapter, clean, [(p.site, p.layer) for p in case.patches])
    corrupt_logits = adapter.answer_logits(corrupt)
    s_clean, s_corrupt = scores(clean_logits, case.tau, case.tau_p), scores(corrupt_logits, case.tau, case.tau_p)
    reference_rows, t_hooked = [], []
    for i in subset:
        p = case.patches[i]
        logits, seconds = _timed(partial(reference.run_patched, adapter, corrupt, p, clean_acts))
        t_hooked.append(seconds)
        reference_rows.append(
            result_row(
                p.site,
                p.layer,
                p.head,
                p.position,
                clean.tokens[p.position],
                s_clean,
                s_corrupt,
                scores(logits, case.tau, case.tau_p),
            )
        )
    err = fast.max_relative_error([rows[i] for i in subset], reference_rows)

    # (b): the 3-row batch per patch; its patched row must agree with (a) too.
    t_three, err_three = [], 0.0
    for k, i in enumerate(subset[:n_three_row]):
        logits, seconds = _timed(partial(three_row_patch, case, case.patches[i]))
        t_three.append(seconds)
        ld, ref = scores(logits, case.tau, case.tau_p).ld, reference_rows[k]["ld_patched"]
        err_three = max(err_three, abs(ld - ref) / max(abs(ref), 1e-6))
    n_noop = sum(r["ld_patched"] == r["ld_corrupt"] for r in rows)
    return dict(
        name=case.name,
        description=case.description,
        n_patches=len(case.patches),
        n_noop=n_noop,
        t_fast=t_fast,
        per_fast=t_fast / len(case.patches),
        per_hooked=sum(t_hooked) / len(t_hooked),
        per_three=sum(t_three) / len(t_three) if t_three else float("nan"),
        n_hooked=len(t_hooked),
        n_three=len(t_three),
        err=err,
        err_three=err_three,
        ld_clean=s_clean.ld,
        ld_corrupt=s_corrupt.ld,
    )


def _median_timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """The last value of `repeats` timed calls of `fn` and their median time."""
    runs = [_timed(fn) for _ in range(max(repeats, 1))]
    return runs[-1][0], statistics.median(seconds for _, seconds in runs)


def engine_sites(adapter: VLMAdapter) -> list[str]:
    """The default screen's sites that the patching engines patch: module sites and the head site."""
    return [site for site in screen_sites(adapter) if site in (*adapter.module_sites, adapter.head_site)]


def screen_patches(adapter: VLMAdapter, inp: ModelInput) -> list[Patch]:
    """Every site of the default attribution screen that an engine can patch: each module site at each
    layer and each position 0..T-1, each head at each layer and position (image positions included).

    Left out, though the screen estimates them too: the image-embedding rows (site "image"), which no
    engine patches (they are the image encoder's output, not a site of the patched stream), and the
    fusion attention's query and key sites (`attribution.qk_sites`), which only `patch_queries_keys`
    patches, one full forward each. So the exact cost extrapolated from these is a lower bound.
    """
    positions = range(inp.input_ids.shape[1])
    layers = range(adapter.n_layers)
    patches: list[Patch] = []
    for site in engine_sites(adapter):
        if site in HEAD_SITE_PARENT:
            heads = range(adapter.n_heads)
            patches += [
                Patch(site, layer, position, head) for layer in layers for position in positions for head in heads
            ]
        else:
            patches += [Patch(site, layer, position) for layer in layers for position in positions]
    return patches


def measure_screen(case: Case, n_patches: int, repeats: int, batch_size: int, seed: int) -> dict:
    """Cost of one default AtP screen of the case's sample (every site it covers), in seconds and in
    forward-equivalents, against exact patching of its engine-patchable sites (`screen_patches`),
    extrapolated from a random subset of `n_patches` of them."""
    adapter, clean, corrupt = case.adapter, case.clean, case.corrupt
    estimates, t_screen = _median_timed(
        lambda: attribution_estimates(adapter, clean, corrupt, case.tau, case.tau_p, method="atp"), repeats
    )
    # After the screens: every timing below runs on a warm allocator (glibc's heap grown and its mmap
    # threshold raised by the screen's large buffers, as it is a few chunks into a long exact run; cold,
    # a fresh process ran its first 128 sites of the decoder layout ~1.7× slower; docs/performance.md).
    _, t_forward = _median_timed(lambda: adapter.answer_logits(corrupt), repeats)
    patches = screen_patches(adapter, clean)
    counts = {site: 0 for site in screen_sites(adapter)}
    for (site, _), value in estimates.values.items():
        counts[site] += value.numel()
    n_patchable = sum(counts[site] for site in engine_sites(adapter))
    if n_patchable != len(patches):
        raise RuntimeError(
            f"{case.name}: the screen gave {n_patchable} estimates of engine-patchable sites, "
            f"the bench enumerates {len(patches)}"
        )
    n_image_rows = counts.get(IMAGE_SITE, 0)
    n_query_key = sum(n for site, n in counts.items() if site in qk_sites(adapter))
    subset = random.Random(seed).sample(patches, min(n_patches, len(patches)))

    def exact(chosen: list[Patch]) -> list[dict]:
        return fast.patch_sample(adapter, clean, corrupt, chosen, case.tau, case.tau_p, batch_size=batch_size)

    _, t_setup = _timed(partial(exact, []))  # the engine's clean and corrupt runs and caches, no patch
    _, t_subset = _timed(partial(exact, subset))
    per_patch = max(t_subset - t_setup, 0.0) / len(subset)
    t_exact = t_setup + per_patch * len(patches)
    return dict(
        name=case.name,
        seq_len=clean.input_ids.shape[1],
        t_forward=t_forward,
        t_screen=t_screen,
        forwards=t_screen / t_forward,
        repeats=max(repeats, 1),
        n_estimates=sum(counts.values()),
        n_image_rows=n_image_rows,
        n_query_key=n_query_key,
        n_sites=len(patches),
        n_subset=len(subset),
        t_setup=t_setup,
        t_subset=t_subset,
        per_patch=per_patch,
        t_exact=t_exact,
        speedup=t_exact / t_screen,
    )
