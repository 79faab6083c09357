"""The precision audit of a half-precision run (docs/method.md, §6 "Precision"): its tables.

A model patched in float16 / bfloat16 computes every activation in that dtype; only its score head runs in
float32. The audit measures what that rounding does to the effects: a seeded sample of the results table's
rows (at least one of each site kind) is patched again by the reference engine on the same model in float32
(`notice.method.precision_audit`), and per site kind it reports the median, 95th percentile and maximum of
|logit_diff − float32 logit_diff| next to the spread of the effects. The analysis then marks a head or module
whose mean effect is not above `precision_k` × that 95th percentile as `below_precision`, and never counts it
as significant. The attribution screen's estimates are audited the same way (`estimate` for `logit_diff`).

This module reads and writes tables only (no torch): the Snakefile and the analysis import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from notice.files.tables import RESULT_COLUMNS, check_columns

# The dtypes the audit checks: the names of notice.adapters.base.HALF_PRECISION (tests/test_precision.py).
HALF_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
# What the audit measures the rounding of: the effect in logit difference (a head's `below_precision` is
# judged on its mean logit_diff, whatever metric the analysis ranks heads by).
AUDITED_METRIC = "logit_diff"
KEY_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[: RESULT_COLUMNS.index("token")]
# One row per audited patched run: its keys, which of its sample's pairs it came from (`draws`), the run's
# effect and the float32 reference's.
AUDIT_ROW_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "draw", "logit_diff", "logit_diff_float32", "abs_error")
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
    "median",  # of |value − float32 value| over the audited rows
    "p95",
    "max",
    "effect_spread",  # standard deviation of the value (logit_diff, the screen's estimate) over the table's rows
)
GROUP_KEYS = ["model", "dataset", "corruption", "site"]


def is_half(dtype: str) -> bool:
    """Whether a model section's `dtype` is one the audit checks (float16, bfloat16)."""
    return dtype in HALF_DTYPES


def draws(table: pd.DataFrame) -> pd.Series:
    """Which of its sample's pairs each row of a results (or screen) table came from: the rank of the row among
    the rows with its keys. A sample's pairs are patched in the manifest's order, each once for every site."""
    check_columns(table, KEY_COLUMNS, "results table")
    return table.groupby(list(KEY_COLUMNS), sort=False, dropna=False).cumcount().rename("draw")


def audit_sample(results: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `n` rows of a results table (every row when it has fewer), at least one of each
    site kind (of each model, dataset and corruption, even beyond `n`): one drawn per site kind first, the rest
    drawn from all the others; in the table's order, with each row's `draw`."""
    check_columns(results, [*KEY_COLUMNS, "logit_diff"], "results table")
    if n < 1:
        raise ValueError(f"the precision audit needs at least one row, got {n}")
    rng = np.random.default_rng(seed)
    strata = results.groupby(GROUP_KEYS, sort=True)
    chosen = {int(rng.choice(rows.index)) for _, rows in strata}
    rest = results.index.difference(sorted(chosen))
    extra = rng.choice(rest, size=min(max(n - len(chosen), 0), len(rest)), replace=False)
    return results.assign(draw=draws(results)).loc[sorted(chosen | {int(i) for i in extra})]


def summarise_audit(
    audited: pd.DataFrame,
    table: pd.DataFrame,
    dtype: str,
    device: str,
    audit_dtype: str = "float32",
    value: str = AUDITED_METRIC,
) -> pd.DataFrame:
    """AUDIT_COLUMNS per site kind (and model, dataset, corruption) of `table` (the results table, or with
    `value` "estimate" a screen table): the audited rows' `abs_error` and the spread of the table's `value`."""
    check_columns(audited, [*GROUP_KEYS, "abs_error"], "audited rows")
    check_columns(table, [*GROUP_KEYS, value], "audited table")
    errors_of = {key: group["abs_error"].to_numpy(np.float64) for key, group in audited.groupby(GROUP_KEYS, sort=True)}
    rows = []
    for (model, dataset, corruption, site), rows_of in table.groupby(GROUP_KEYS, sort=True):
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
                "n_rows": len(rows_of),
                "n_audited": len(errors),
                "median": float(np.median(errors)) if len(errors) else np.nan,
                "p95": float(np.percentile(errors, 95)) if len(errors) else np.nan,
                "max": float(errors.max()) if len(errors) else np.nan,
                "effect_spread": float(rows_of[value].std(ddof=0)),
            }
        )
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS))


def read_audits(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The audit files (`*.precision.csv`) at `paths`, concatenated (AUDIT_COLUMNS; none: no row)."""
    frames = [
        check_columns(pd.read_csv(path, dtype={key: str for key in (*GROUP_KEYS, "dtype")}), AUDIT_COLUMNS, str(path))
        for path in paths
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(AUDIT_COLUMNS))


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
    """`effects` (rows keyed by model, task, corruption, site) with `below_precision`: the magnitude of the effect
    `column` is not above its condition's precision floor (rounding moves an effect either way). Rows without an
    audit (full-precision runs) are never marked."""
    check_columns(effects, ["model", "task", "corruption", "site", column], "effects")
    merged = effects.merge(floors, on=["model", "task", "corruption", "site"], how="left", validate="many_to_one")
    below = merged["floor"].notna() & ~(merged[column].abs() > merged["floor"])
    return effects.assign(below_precision=below.to_numpy())


def audit_summary_lines(summary: pd.DataFrame) -> Sequence[str]:
    """The audit as text lines, one per site kind (for `python -m notice patch-pair --audit`)."""
    return [
        f"{r.site}: {r.n_audited} of {r.n_rows} rows, |logit_diff - float32| median {r.median:.2e}, "
        f"p95 {r.p95:.2e}, max {r.max:.2e}; effect spread {r.effect_spread:.2e} ({r.dtype} on "
        f"{r.audit_device})"
        for r in summary.itertuples()
    ]
