"""The measurements of `make bench`: the fast engine against (a) one hooked forward per patched run and (b) the
published code's 3-row batch per patch, the attribution screen against exact patching of its sites, and at real
size the precision audit of the engine's half-precision rows, the attention-knockout sweep against one hooked
forward per knocked-out run, and circuits (EAP-IG's cost, a faithfulness curve batched against one forward per
circuit)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.bench.case import Case, float32_twin, in_dtype
from notice.circuits.ablation import record_pair
from notice.circuits.attribution import edge_scores
from notice.circuits.faithfulness import circuit_lds, edge_table, kept_mask, log_grid, top_edges
from notice.files.tables import RESULT_COLUMNS
from notice.flow.groups import GROUPS, TokenGroups
from notice.flow.knockout import (
    DEFAULT_EDGES,
    default_window,
    edge_blocks,
    knockout_rows,
    parse_edges,
    reference_logits,
)
from notice.flow.knockout_suffix import Knockout
from notice.method.precision import KEY_COLUMNS, audit_sample, summarise_audit
from notice.patching import fast, reference
from notice.patching.attribution import IMAGE_SITE, attribution_estimates, screen_sites
from notice.patching.fast_core import FastFamily
from notice.patching.hooks import hooked
from notice.patching.query_keys import qk_sites
from notice.patching.scores import Scores, answer_prob, logit_diff, result_row, scores
from notice.patching.sites import activation_key, has_site, head_sites

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


# -- the fast engine's cost, extrapolated from a stratified sample of the chunks it runs ----------
ERROR_FLOOR = 1.0  # |x − ref| / max(|ref|, 1), as the contract test compares the engines


def relative_error(x: float, ref: float) -> float:
    """|x − ref| / max(|ref|, 1): relative for scores beyond ±1, absolute below, so that a probability near 0
    compares by its float error, not by its size."""
    return abs(x - ref) / max(abs(ref), ERROR_FLOOR)


def rows_error(rows: Sequence[dict], reference_rows: Sequence[dict]) -> float:
    """The largest `relative_error` over the LD and P(τ) columns of matching rows (`fast.max_relative_error`)."""
    return fast.max_relative_error(rows, reference_rows, floor=ERROR_FLOOR)


@dataclass(frozen=True)
class FastCost:
    """The fast engine's cost of one patch set, and the scores of the rows it ran."""

    n_patches: int  # the whole set
    n_noop: int  # patches whose clean value equals the corrupt one: no row is run for them
    n_chunks: int  # chunks of rows that `fast.patch_sample` runs for the whole set
    chunks_run: tuple[int, ...]  # the chunks timed (indices into those chunks)
    n_run: int  # rows timed
    t_setup: float  # seconds: the engine's clean and corrupt runs and caches
    t_rows: float  # seconds: the chunks timed
    t_total: float  # seconds, estimated for the whole set: t_setup + each stratum's rows at its chunk's cost
    clean: Scores
    corrupt: Scores
    patched: dict[int, Scores]  # index into the patch set -> scores of its row, for every row timed

    @property
    def per_run(self) -> float:
        return self.t_total / self.n_patches


@dataclass(frozen=True)
class EngineSetup:
    """The fast engine built for a case's sample (clean and corrupt runs, image encoder, every cache) and the
    seconds that took; one serves every patch set of the sample."""

    engine: FastFamily
    seconds: float


def engine_setup(case: Case) -> EngineSetup:
    """The case's engine, built and timed as `fast.patch_sample` builds it before its first chunk."""
    adapter = case.adapter
    engine, seconds = _timed(lambda: fast.family_engine(adapter)(adapter, case.clean, case.corrupt))
    return EngineSetup(engine, seconds)


def chunk_plan(engine: FastFamily, patches: Sequence[Patch], batch_size: int, memory_budget: int) -> list[list[int]]:
    """The chunks (indices into `patches`) that `fast.patch_sample` runs for `patches`, in its order: the patches
    that are not no-ops, sorted by the engine's `order_key`, cut by `fast.chunks`."""
    todo = [i for i, patch in enumerate(patches) if not engine.is_noop(patch)]
    todo.sort(key=lambda i: engine.order_key(patches[i]))
    return list(fast.chunks(engine, patches, todo, batch_size, memory_budget))


def stratified_chunks(chunk_rows: Sequence[int], n_strata: int, seed: int) -> list[tuple[int, float]]:
    """(chunk, weight) pairs: the chunks (given by their row counts, in run order) cut into `n_strata` strata of
    consecutive chunks (each chunk its own when there are no more chunks than that) and one seeded random chunk
    drawn from each; its weight = its stratum's rows / its own rows."""
    if n_strata < 1:
        raise ValueError(f"n_strata must be at least 1, got {n_strata}")
    m = len(chunk_rows)
    if m == 0:  # every patch a no-op
        return []
    k = min(m, n_strata)
    bounds = [round(j * m / k) for j in range(k + 1)]
    rng = random.Random(seed)
    drawn = []
    for lo, hi in zip(bounds, bounds[1:]):
        chunk = rng.randrange(lo, hi)
        drawn.append((chunk, sum(chunk_rows[lo:hi]) / chunk_rows[chunk]))
    return drawn


def fast_cost(
    case: Case, patches: Sequence[Patch], n_chunks: int, batch_size: int, seed: int, setup: EngineSetup | None = None
) -> FastCost:
    """What `fast.patch_sample(case.adapter, case.clean, case.corrupt, patches, ...)` costs, run piece by piece:
    the engine's setup (`setup`, else built and timed here), then `n_chunks` of the chunks that call would run,
    one per stratum of its run order (`stratified_chunks`), each timed and counted for its stratum. Whole chunks
    keep each row's company (which rows share a chunk sets how much work they share), so a row costs what it
    costs in the full run."""
    setup = setup or engine_setup(case)
    engine = setup.engine
    chunks = chunk_plan(engine, patches, batch_size, fast.default_memory_budget(case.adapter.device))
    drawn = stratified_chunks([len(chunk) for chunk in chunks], n_chunks, seed)
    patched: dict[int, Scores] = {}
    t_rows = t_estimated = 0.0
    for chunk, weight in drawn:
        logits, seconds = _timed(partial(engine.run_rows, [patches[i] for i in chunks[chunk]]))
        t_rows += seconds
        t_estimated += weight * seconds
        lds, ps = logit_diff(logits, case.tau, case.tau_p).tolist(), answer_prob(logits, case.tau).tolist()
        patched.update((i, Scores(ld, p)) for i, ld, p in zip(chunks[chunk], lds, ps))
    return FastCost(
        n_patches=len(patches),
        n_noop=len(patches) - sum(len(chunk) for chunk in chunks),
        n_chunks=len(chunks),
        chunks_run=tuple(chunk for chunk, _ in drawn),
        n_run=len(patched),
        t_setup=setup.seconds,
        t_rows=t_rows,
        t_total=setup.seconds + t_estimated,
        clean=scores(engine.clean_logits, case.tau, case.tau_p),
        corrupt=scores(engine.corrupt_logits, case.tau, case.tau_p),
        patched=patched,
    )


def patch_row(case: Case, patch: Patch, clean: Scores, corrupt: Scores, patched: Scores) -> dict:
    return result_row(
        patch.site, patch.layer, patch.head, patch.position, case.clean.tokens[patch.position], clean, corrupt, patched
    )


def measure(
    case: Case,
    fast_chunks: int,
    n_hooked: int,
    n_three_row: int,
    batch_size: int,
    seed: int,
    setup: EngineSetup | None = None,
) -> dict:
    """The fast engine's cost per patched run of the case's patch set (`fast_cost` on `fast_chunks` chunks)
    against (a) and (b) on `n_hooked` and `n_three_row` seeded random rows of those the engine ran, whose
    rows are checked against (a)'s; `fast_rows`: the result rows of every row the engine ran, in patch order."""
    adapter, corrupt = case.adapter, case.corrupt
    setup = setup or engine_setup(case)
    cost = fast_cost(case, case.patches, fast_chunks, batch_size, seed, setup)
    if not cost.patched:
        raise RuntimeError(f"{case.name}: every patch of the set leaves the corrupt run unchanged; nothing to time")
    subset = sorted(random.Random(seed).sample(sorted(cost.patched), min(n_hooked, len(cost.patched))))

    # (a): one hooked forward of the corrupt input per patch, writing the clean activation the engine cached
    # (the baseline's clean run, cached once, is the engine's: no forward beyond the patched runs).
    clean_acts = {
        activation_key(p.site, p.layer): setup.engine.activation("clean", p.site, p.layer)
        for p in (case.patches[i] for i in subset)
    }
    reference_rows, t_hooked = [], []
    for i in subset:
        p = case.patches[i]
        logits, seconds = _timed(partial(reference.run_patched, adapter, corrupt, p, clean_acts))
        t_hooked.append(seconds)
        reference_rows.append(patch_row(case, p, cost.clean, cost.corrupt, scores(logits, case.tau, case.tau_p)))
    fast_rows = [patch_row(case, case.patches[i], cost.clean, cost.corrupt, cost.patched[i]) for i in subset]
    err = rows_error(fast_rows, reference_rows)

    # (b): the 3-row batch per patch; its patched row must agree with (a) too.
    t_three, err_three = [], 0.0
    for k, i in enumerate(subset[:n_three_row]):
        logits, seconds = _timed(partial(three_row_patch, case, case.patches[i]))
        t_three.append(seconds)
        ld, ref = scores(logits, case.tau, case.tau_p).ld, reference_rows[k]["ld_patched"]
        err_three = max(err_three, relative_error(ld, ref))
    return dict(
        name=case.name,
        description=case.description,
        n_patches=len(case.patches),
        n_noop=cost.n_noop,
        n_fast=cost.n_run,
        n_chunks=cost.n_chunks,
        n_chunks_run=len(cost.chunks_run),
        checked=[case.patches[i] for i in subset],
        t_setup=cost.t_setup,
        t_rows=cost.t_rows,
        t_fast=cost.t_total,
        per_fast=cost.per_run,
        per_hooked=sum(t_hooked) / len(t_hooked),
        per_three=sum(t_three) / len(t_three) if t_three else float("nan"),
        n_hooked=len(t_hooked),
        n_three=len(t_three),
        err=err,
        err_three=err_three,
        ld_clean=cost.clean.ld,
        ld_corrupt=cost.corrupt.ld,
        fast_rows=[
            patch_row(case, case.patches[i], cost.clean, cost.corrupt, cost.patched[i]) for i in sorted(cost.patched)
        ],
    )


# -- the precision audit of a half-precision case -------------------------------------------------
# The bench's one sample as a results table's rows (notice.method.precision groups by these keys).
SAMPLE_LABELS = {"dataset": "bench", "task": "bench", "corruption": "sip", "modality": "image", "sample_id": "bench"}


def results_table(case: Case, rows: Sequence[dict]) -> pd.DataFrame:
    """RESULT_COLUMNS of result rows of the case's sample (model = the case's family, SAMPLE_LABELS)."""
    labels = {"model": case.name, **SAMPLE_LABELS}
    return pd.DataFrame([{**labels, **row} for row in rows], columns=list(RESULT_COLUMNS))


def precision_audit(case: Case, rows: Sequence[dict], n_rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The precision audit (notice.method.precision) of `rows`, the case's result rows in its model's half
    precision (`measure`'s `fast_rows`): `audit_sample`'s `n_rows` seeded rows patched again by the reference
    engine on the same model rebuilt in float32 (`float32_twin`, freed on return), on the same inputs upcast.
    Returns (AUDIT_ROW_COLUMNS of the audited rows, `summarise_audit`'s AUDIT_COLUMNS per site kind of `rows`)."""
    table = results_table(case, rows)
    sample = audit_sample(table, n_rows, seed)
    full = float32_twin(case.adapter)
    patches = [Patch(str(r.site), int(r.layer), int(r.position), int(r.head)) for r in sample.itertuples()]
    clean, corrupt = in_dtype(case.clean, torch.float32), in_dtype(case.corrupt, torch.float32)
    with torch.no_grad():
        exact = reference.patch_sample(full, clean, corrupt, patches, case.tau, case.tau_p)
    float32 = np.asarray([row["logit_diff"] for row in exact], dtype=np.float64)
    audited = sample[[*KEY_COLUMNS, "draw"]].assign(logit_diff=sample["logit_diff"].to_numpy(np.float64))
    audited = audited.assign(logit_diff_float32=float32, abs_error=np.abs(audited["logit_diff"] - float32))
    dtype = str(case.adapter.dtype).removeprefix("torch.")
    return audited.reset_index(drop=True), summarise_audit(audited, table, dtype, str(full.device))


def _median_timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """The last value of `repeats` timed calls of `fn` and their median time."""
    runs = [_timed(fn) for _ in range(max(repeats, 1))]
    return runs[-1][0], statistics.median(seconds for _, seconds in runs)


def engine_sites(adapter: VLMAdapter) -> list[str]:
    """The default screen's sites that the patching engines patch: module sites and the head site."""
    return [site for site in screen_sites(adapter) if site in (*adapter.module_sites, *head_sites(adapter))]


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
        at = [layer for layer in layers if has_site(adapter, site, layer)]
        if site in HEAD_SITE_PARENT:
            heads = range(adapter.n_heads)
            patches += [Patch(site, layer, position, head) for layer in at for position in positions for head in heads]
        else:
            patches += [Patch(site, layer, position) for layer in at for position in positions]
    return patches


def measure_screen(
    case: Case, n_chunks: int, repeats: int, batch_size: int, seed: int, setup: EngineSetup | None = None
) -> dict:
    """Cost of one default AtP screen of the case's sample (every site it covers), in seconds and in
    forward-equivalents, against exact patching of its engine-patchable sites (`screen_patches`) by the fast
    engine, extrapolated from `n_chunks` chunks of that run (`fast_cost`)."""
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
    cost = fast_cost(case, patches, n_chunks, batch_size, seed, setup)
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
        n_subset=cost.n_run,
        n_chunks=cost.n_chunks,
        n_chunks_run=len(cost.chunks_run),
        t_setup=cost.t_setup,
        per_patch=(cost.t_total - cost.t_setup) / len(patches),
        t_exact=cost.t_total,
        speedup=cost.t_total / t_screen,
    )


# -- attention knockout: the fast sweep against one hooked forward per row ------------------------
def knockout_groups(case: Case, question_tokens: int) -> TokenGroups:
    """Token groups of a layout's random prompt: the question is the `question_tokens` positions after the image
    and the token that follows it (a layout's "\\n"), the object the central quarter of the image grid."""
    adapter, inp = case.adapter, case.clean
    image = adapter.image_keys(inp)
    grid = adapter.image_grid(inp)
    central = [
        grid.keys[r * grid.cols + c]
        for r in range(grid.rows // 4, grid.rows - grid.rows // 4)
        for c in range(grid.cols // 4, grid.cols - grid.cols // 4)
    ]
    answer = adapter.answer_position(inp)
    last = [] if answer is None else [answer]
    question = [p for p in range(max(image) + 2, max(image) + 2 + question_tokens) if p not in last]
    taken = set(image) | set(question) | set(last)
    text = [p for p in adapter.stream_positions(inp) if p not in taken]
    positions = {"image": image, "object": sorted(central), "question": question, "last": last, "text": text}
    return TokenGroups({group: tuple(positions[group]) for group in GROUPS}, adapter.image_keys_are_positions)


def measure_knockout(case: Case, question_tokens: int, n_reference: int, batch_size: int, seed: int) -> dict:
    """The whole default knockout sweep of the case's clean input (DEFAULT_EDGES, `default_window`) by the fast
    engine, timed with its setup (base run, clean-state capture), against `n_reference` seeded rows of it run
    by the reference engine (one hooked forward each), which also check the fast rows."""
    adapter, inp = case.adapter, case.clean
    groups = knockout_groups(case, question_tokens)
    window = default_window(adapter.n_layers)
    edges = parse_edges(DEFAULT_EDGES)
    with torch.inference_mode():
        rows, t_fast = _timed(
            partial(knockout_rows, adapter, inp, case.tau, case.tau_p, groups, edges, window, "fast", batch_size)
        )
        chosen = sorted(random.Random(seed).sample(range(len(rows)), min(n_reference, len(rows))))
        blocks = {edge: edge_blocks(adapter, inp, groups, [edge]) for edge in edges}
        errors, t_reference = [], 0.0
        for i in chosen:
            row = rows.iloc[i]
            own, fusion = blocks[(row.source, row.target)]
            logits, seconds = _timed(
                partial(reference_logits, adapter, inp, Knockout(int(row.layer_start), window, own, fusion))
            )
            t_reference += seconds
            ld, p = float(logit_diff(logits, case.tau, case.tau_p)), float(answer_prob(logits, case.tau))
            errors += [relative_error(row.ld_knock, ld), relative_error(row.p_knock, p)]
    per_fast, per_reference = t_fast / len(rows), t_reference / len(chosen)
    return dict(
        n_rows=len(rows),
        window=window,
        t_fast=t_fast,
        per_fast=per_fast,
        n_reference=len(chosen),
        per_reference=per_reference,
        speedup=per_reference / per_fast,
        err=max(errors),
    )


# -- circuits: EAP-IG's cost in forwards, and one faithfulness curve batched against one forward per circuit ------
def measure_circuits(case: Case, question_tokens: int, ig_steps: int, curve_points: int, repeats: int) -> dict:
    """EAP-IG scores of every edge of the case's pair (its two recorded runs included) against one forward
    (`answer_logits` of the clean input, median of `repeats`): the cost in forward-equivalents; then the exact
    faithfulness of the top-n edge circuits (n on a `curve_points` log grid) computed `CIRCUITS_PER_FORWARD` to a
    forward against one hooked forward per circuit, which also checks them."""
    adapter = case.adapter
    groups = knockout_groups(case, question_tokens)
    with torch.no_grad():
        _, t_forward = _median_timed(partial(adapter.answer_logits, case.clean), repeats)
    pair, t_record = _timed(partial(record_pair, adapter, case.clean, case.corrupt, groups, case.tau, case.tau_p))
    scores, t_scores = _timed(partial(edge_scores, pair, "eap_ig", ig_steps))
    table = edge_table([pair], {"eap_ig": [scores]})
    circuits = [kept_mask(pair, top_edges(table, "score_eap_ig", n)) for n in log_grid(len(table), curve_points)]
    fast_lds, t_fast = _timed(partial(circuit_lds, pair, circuits))
    hooked_lds, t_hooked = _timed(partial(circuit_lds, pair, circuits, 1))
    return dict(
        n_edges=pair.graph.n_edges,
        ig_steps=ig_steps,
        t_forward=t_forward,
        t_scores=t_record + t_scores,
        forwards=(t_record + t_scores) / t_forward,
        n_circuits=len(circuits),
        t_fast=t_fast,
        t_hooked=t_hooked,
        speedup=t_hooked / t_fast,
        err=max(relative_error(a, b) for a, b in zip(fast_lds, hooked_lds)),
    )
