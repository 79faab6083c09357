"""The precision audit of a half-precision run (docs/method.md, §6 "Precision").

A model patched in float16 / bfloat16 computes every activation in that dtype; only its score head runs in
float32. The audit measures what that rounding does to the effects: a seeded sample of the results table's
rows (at least one of each site kind) is patched again by the reference engine on the same model in float32,
and per site kind it reports the median, 95th percentile and maximum of |logit_diff − float32 logit_diff|
next to the spread of the effects. The analysis then marks a head or module whose mean effect is not above
`precision_k` × that 95th percentile as `below_precision`, and never counts it as significant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import HALF_PRECISION, Patch, VLMAdapter
from notice.files.tables import RESULT_COLUMNS, check_columns
from notice.patching import reference
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.experiment import concat_or_empty, pair_inputs

KEY_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[: RESULT_COLUMNS.index("token")]
# One row per audited patched run: its keys, the run's effect and the float32 reference's.
AUDIT_ROW_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "logit_diff", "logit_diff_float32", "abs_error")
# One row per site kind of one (model, dataset, corruption).
AUDIT_COLUMNS: tuple[str, ...] = (
    "model",
    "dataset",
    "corruption",
    "site",
    "dtype",  # the run's
    "audit_dtype",  # the reference's: float32
    "audit_device",  # where the float32 reference ran
    "n_rows",  # rows of the results table of that site kind
    "n_audited",
    "median",  # of |logit_diff − float32 logit_diff| over the audited rows
    "p95",
    "max",
    "effect_spread",  # standard deviation of logit_diff over the table's rows of that site kind
)


def is_half(dtype: str) -> bool:
    """Whether a model section's `dtype` is one the audit checks (float16, bfloat16)."""
    return dtype in {str(d).removeprefix("torch.") for d in HALF_PRECISION}


def audit_sample(results: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `n` rows of a results table (every row when it has fewer), at least one of each
    site kind (of each model, dataset and corruption, even beyond `n`): one drawn per site kind first, the rest
    drawn from all the others; in the table's order."""
    check_columns(results, [*KEY_COLUMNS, "logit_diff"], "results table")
    if n < 1:
        raise ValueError(f"the precision audit needs at least one row, got {n}")
    rng = np.random.default_rng(seed)
    strata = results.groupby(["model", "dataset", "corruption", "site"], sort=True)
    chosen = {int(rng.choice(rows.index)) for _, rows in strata}
    rest = results.index.difference(sorted(chosen))
    extra = rng.choice(rest, size=min(max(n - len(chosen), 0), len(rest)), replace=False)
    return results.loc[sorted(chosen | {int(i) for i in extra})]


def audit_rows(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    sample: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    corruption_settings: Mapping,
) -> pd.DataFrame:
    """AUDIT_ROW_COLUMNS of every sampled row: its `logit_diff` and the reference engine's on `adapter` (the
    model in float32) for the same patch of the same pair (`pairs`: PAIR_COLUMNS rows of the table's samples)."""
    by_sample = pairs.set_index(pairs["sample_id"].astype(str))
    frames = []
    groups = sample.groupby(sample["sample_id"].astype(str), sort=False)
    for sample_id, rows in tqdm(groups, total=groups.ngroups, desc="precision audit", mininterval=5):
        if sample_id not in by_sample.index:
            raise ValueError(f"precision audit: sample {sample_id!r} of the results table is not in the pairs manifest")
        pair = next(by_sample.loc[[sample_id]].itertuples(index=False))
        clean_inp, corrupt_inp = pair_inputs(adapter, pair, load_image)
        patches = [Patch(str(r.site), int(r.layer), int(r.position), int(r.head)) for r in rows.itertuples()]
        exact = reference.patch_sample(
            adapter,
            clean_inp,
            corrupt_inp,
            patches,
            int(pair.answer_token_id),
            int(pair.distractor_token_id),
            corrupt_image_fn=corrupt_image_fn(pair.corruption, corruption_settings, int(pair.noise_seed)),
        )
        float32 = np.asarray([row["logit_diff"] for row in exact], dtype=np.float64)
        frame = rows[list(KEY_COLUMNS)].assign(logit_diff=rows["logit_diff"].to_numpy(np.float64))
        frames.append(frame.assign(logit_diff_float32=float32, abs_error=np.abs(frame["logit_diff"] - float32)))
    return concat_or_empty(frames, AUDIT_ROW_COLUMNS)


def summarise_audit(
    audited: pd.DataFrame, results: pd.DataFrame, dtype: str, device: str, audit_dtype: str = "float32"
) -> pd.DataFrame:
    """AUDIT_COLUMNS per site kind (and model, dataset, corruption) of the results table."""
    check_columns(audited, AUDIT_ROW_COLUMNS, "audited rows")
    keys = ["model", "dataset", "corruption", "site"]
    errors_of = {key: group["abs_error"].to_numpy(np.float64) for key, group in audited.groupby(keys, sort=True)}
    rows = []
    for (model, dataset, corruption, site), table in results.groupby(keys, sort=True):
        errors = errors_of.get((model, dataset, corruption, site), np.empty(0))
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "corruption": corruption,
                "site": site,
                "dtype": dtype,
                "audit_dtype": audit_dtype,
                "audit_device": device,
                "n_rows": len(table),
                "n_audited": len(errors),
                "median": float(np.median(errors)) if len(errors) else np.nan,
                "p95": float(np.percentile(errors, 95)) if len(errors) else np.nan,
                "max": float(errors.max()) if len(errors) else np.nan,
                "effect_spread": float(table["logit_diff"].std(ddof=0)),
            }
        )
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS))


def precision_floors(audits: pd.DataFrame, results: pd.DataFrame, k: float) -> pd.DataFrame:
    """Per (model, task, corruption, site): `k` × the audit's 95th percentile, the largest over the datasets
    that hold the task (a task's rows come from one dataset in every config this workflow writes)."""
    check_columns(audits, AUDIT_COLUMNS, "precision audit")
    tasks = results[["model", "dataset", "task", "corruption"]].drop_duplicates()
    floors = tasks.merge(
        audits[["model", "dataset", "corruption", "site", "p95"]], on=["model", "dataset", "corruption"]
    )
    floors = floors.groupby(["model", "task", "corruption", "site"], as_index=False)["p95"].max()
    return floors.assign(floor=k * floors["p95"])[["model", "task", "corruption", "site", "floor"]]


def mark_below_precision(effects: pd.DataFrame, floors: pd.DataFrame, column: str = "mean") -> pd.DataFrame:
    """`effects` (rows keyed by model, task, corruption, site) with `below_precision`: the effect `column` is
    not above its condition's precision floor. Rows without an audit (full-precision runs) are never marked."""
    check_columns(effects, ["model", "task", "corruption", "site", column], "effects")
    merged = effects.merge(floors, on=["model", "task", "corruption", "site"], how="left", validate="many_to_one")
    below = merged["floor"].notna() & ~(merged[column] > merged["floor"])
    return effects.assign(below_precision=below.to_numpy())


def audit_summary_lines(summary: pd.DataFrame) -> Sequence[str]:
    """The audit as text lines, one per site kind (for `python -m notice patch-pair --audit`)."""
    return [
        f"{r.site}: {r.n_audited} of {r.n_rows} rows, |logit_diff - float32| median {r.median:.2e}, "
        f"p95 {r.p95:.2e}, max {r.max:.2e}; effect spread {r.effect_spread:.2e} ({r.dtype} on "
        f"{r.audit_device})"
        for r in summary.itertuples()
    ]
