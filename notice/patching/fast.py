"""Fast patching engine: the reference engine's numbers at a fraction of the cost.

Same entry point and return contract as `notice.patching.reference.patch_sample` (one result row per
patch, in the order of `patches`, with the keys of `notice.patching.scores.ROW_COLUMNS`), so a workflow can
select either engine by name (`notice.patching.engines.get_engine`). Which engine class patches an adapter is
its family's row of the family table (notice.families). Every shortcut is exact, not an
approximation (docs/method.md, §5 "Engines"):

1. Cache once, patch many: the clean and the corrupt run are computed once per sample; a
   cross-attention family's image encoder once per distinct image and its image keys/values once
   per layer.
2. Start at the patched layer: a patched row starts from the corrupt run's cached values at the
   patched layer.
3. Only the future of a causal patch (decoder language models): positions before the patched one
   reuse the corrupt run's key/value cache, shared by all rows; only positions from the patched one
   to the end are recomputed.
4. Batched interventions: many patched runs of one sample (any mix of site / layer / head / position)
   are rows of one forward pass, in chunks of `batch_size` rows (or as many as fit `memory_budget`).
   Rows are grouped internally to share work, and results are returned in the order of `patches`.

Also exact: a patch whose clean value is bit-identical to the corrupt one (e.g. a decoder's tokens
before the image under SIP) cannot change the corrupt run, so its row is the corrupt run's scores.

Numbers agree with the reference up to floating-point rounding (different matrix shapes sum in a
different order), see `max_relative_error`; the cross-attention engine keeps the reference's
products and its rows are bit-identical on the CPU. Computation runs in the model's dtype (load the model in
bfloat16/float16 on a GPU for speed); logits and metrics are float32.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from notice.adapters.base import ModelInput, Patch, VLMAdapter
from notice.families import family_of
from notice.patching.fast_core import FastFamily
from notice.patching.hooks import CleanRun, ImageFn
from notice.patching.scores import Scores, answer_prob, logit_diff, result_row, scores
from notice.patching.sites import check_patches

DEFAULT_BATCH_ROWS = 64  # the schema's patching.batch_size default, for callers outside the workflow
CPU_MEMORY_BUDGET = 1 << 30  # bytes of working memory for the rows of one chunk on a CPU
COMPARED_COLUMNS = ("ld_clean", "ld_corrupt", "ld_patched", "p_clean", "p_corrupt", "p_patched")


def family_engine(adapter: VLMAdapter) -> type[FastFamily]:
    """The fast engine class of the adapter's family (its row of the family table)."""
    row = family_of(type(adapter))
    if row is None:
        raise ValueError(
            f"adapter {type(adapter).__name__} is not in the family table (notice.families), so it has no fast "
            "engine; use engine 'reference'"
        )
    engine = row.load("engine")
    if not (isinstance(engine, type) and issubclass(engine, FastFamily)):
        raise TypeError(f"family table: {row.name}.engine = {row.engine!r} is not a FastFamily subclass")
    return engine


def default_memory_budget(device: torch.device) -> int:
    """Bytes of working memory for one chunk of rows: half the free GPU memory, or CPU_MEMORY_BUDGET."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return CPU_MEMORY_BUDGET


def chunks(engine: FastFamily, patches: Sequence[Patch], order: Sequence[int], batch_size: int, memory_budget: int):
    """Consecutive runs of `order` (indices into patches) of at most `batch_size` rows whose
    estimated working memory stays within `memory_budget` (at least one row each)."""
    chunk: list[int] = []
    row_bytes = 0
    for i in order:
        row_bytes = max(row_bytes, engine.row_bytes(patches[i]))
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * row_bytes > memory_budget):
            yield chunk
            chunk, row_bytes = [], engine.row_bytes(patches[i])
        chunk.append(i)
    if chunk:
        yield chunk


def _batch_scores(logits: torch.Tensor, tau: int, tau_p: int) -> list[Scores]:
    lds, ps = logit_diff(logits, tau, tau_p).tolist(), answer_prob(logits, tau).tolist()
    return [Scores(ld, p) for ld, p in zip(lds, ps)]


def patch_sample(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
    clean: CleanRun | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_ROWS,
    memory_budget: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """One result row (scores.ROW_COLUMNS) per patch, in the order of `patches`.

    Arguments as in `reference.patch_sample` (`clean`: the clean run's (logits, activations) from
    the workflow's clean cache, else it is computed here); additionally `batch_size` (most rows per forward
    pass), `memory_budget` (bytes of working memory per forward pass, default
    `default_memory_budget`; fewer rows run together when they would not fit) and `progress` (a
    tqdm bar on stderr).
    """
    check_patches(adapter, clean_inp, corrupt_inp, patches)
    engine = family_engine(adapter)(adapter, clean_inp, corrupt_inp, corrupt_image_fn, clean)
    clean_scores, corrupt = scores(engine.clean_logits, tau, tau_p), scores(engine.corrupt_logits, tau, tau_p)

    patched: list[Scores] = [corrupt] * len(patches)
    todo = sorted(
        (i for i, p in enumerate(patches) if not engine.is_noop(p)), key=lambda i: engine.order_key(patches[i])
    )
    budget = memory_budget or default_memory_budget(adapter.device)
    with tqdm(
        total=len(patches),
        desc=f"fast patching ({adapter.family})",
        unit="run",
        file=sys.stderr,
        disable=not progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    ) as bar:
        bar.update(len(patches) - len(todo))
        for chunk in chunks(engine, patches, todo, batch_size, budget):
            logits = engine.run_rows([patches[i] for i in chunk])
            for i, row_scores in zip(chunk, _batch_scores(logits, tau, tau_p)):
                patched[i] = row_scores
            bar.update(len(chunk))
    return [
        result_row(p.site, p.layer, p.head, p.position, clean_inp.tokens[p.position], clean_scores, corrupt, s)
        for p, s in zip(patches, patched)
    ]


def max_relative_error(rows: Sequence[dict], reference_rows: Sequence[dict], floor: float = 1e-6) -> float:
    """max |x − x_ref| / max(|x_ref|, floor) over the LD and P(τ) columns of matching rows.

    Raises if the rows do not describe the same patches in the same order.
    """
    key = ("site", "layer", "head", "position", "token")
    if [tuple(r[k] for k in key) for r in rows] != [tuple(r[k] for k in key) for r in reference_rows]:
        raise ValueError("rows do not describe the same patches in the same order")
    worst = 0.0
    for row, ref in zip(rows, reference_rows):
        for column in COMPARED_COLUMNS:
            worst = max(worst, abs(row[column] - ref[column]) / max(abs(ref[column]), floor))
    return worst
