"""The precision audit's float32 runs (docs/method.md, §6 "Precision"): the audited rows of a half-precision
run recomputed on the model in float32, by the reference engine (patching) or the attribution screen."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import Patch, VLMAdapter
from notice.files.tables import check_columns
from notice.method.precision import AUDIT_ROW_COLUMNS, KEY_COLUMNS, draws
from notice.method.screen import TABLE_COLUMNS, check_settings, pair_estimates
from notice.patching.attribution import estimates_table
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.engines import get_engine
from notice.patching.experiment import concat_or_empty, pair_inputs, patch_pair

# The reference engine, routed as the workflow's engines are (it patches one run per forward: no batch size).
REFERENCE = get_engine("reference", batch_size=1)
SITE_KEYS = ["site", "layer", "head", "position"]
# One row per audited screen estimate: its keys, the half-precision estimate and the float32 one.
SCREEN_AUDIT_ROW_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "draw", "estimate", "estimate_float32", "abs_error")


def audited_pairs(
    pairs: pd.DataFrame, rows: pd.DataFrame, description: str
) -> Iterator[tuple[str, int, Any, pd.DataFrame]]:
    """(sample_id, draw, its pair, its rows) for every (sample_id, draw) of `rows` (they have a `draw` column),
    in order; `pairs` are PAIR_COLUMNS rows, a sample's draws in the manifest's order."""
    by_sample = {sample_id: group for sample_id, group in pairs.groupby(pairs["sample_id"].astype(str), sort=False)}
    groups = rows.groupby([rows["sample_id"].astype(str), rows["draw"]], sort=False)
    for (sample_id, draw), rows_of in tqdm(groups, total=groups.ngroups, desc=description, mininterval=5):
        if sample_id not in by_sample or draw >= len(by_sample[sample_id]):
            raise ValueError(
                f"{description}: pair {draw} of sample {sample_id!r} is not in the pairs manifest "
                f"({len(by_sample.get(sample_id, []))} pairs of that sample)"
            )
        pair = next(by_sample[sample_id].iloc[[draw]].itertuples(index=False))
        yield sample_id, int(draw), pair, rows_of


def audit_rows(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    sample: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    corruption_settings: Mapping,
) -> pd.DataFrame:
    """AUDIT_ROW_COLUMNS of every sampled row (`notice.method.precision.audit_sample`): its `logit_diff` and the
    reference engine's on `adapter` (the model in float32) for the same patch of the same pair (`pairs`:
    PAIR_COLUMNS rows of the table's samples)."""
    check_columns(sample, [*KEY_COLUMNS, "draw", "logit_diff"], "audit sample")
    frames = []
    for _, _, pair, rows in audited_pairs(pairs, sample, "precision audit"):
        clean_inp, corrupt_inp = pair_inputs(adapter, pair, load_image)
        patches = [Patch(str(r.site), int(r.layer), int(r.position), int(r.head)) for r in rows.itertuples()]
        exact = patch_pair(adapter, pair, clean_inp, corrupt_inp, patches, REFERENCE, corruption_settings)
        float32 = np.asarray([row["logit_diff"] for row in exact], dtype=np.float64)
        frame = rows[[*KEY_COLUMNS, "draw"]].assign(logit_diff=rows["logit_diff"].to_numpy(np.float64))
        frames.append(frame.assign(logit_diff_float32=float32, abs_error=np.abs(frame["logit_diff"] - float32)))
    return concat_or_empty(frames, AUDIT_ROW_COLUMNS)


def audit_screen(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    screen: pd.DataFrame,
    audited: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    settings: Mapping,
    corruption_settings: Mapping,
) -> pd.DataFrame:
    """SCREEN_AUDIT_ROW_COLUMNS of every screen estimate (`screen`: TABLE_COLUMNS, in the model's dtype) of the
    pairs the patching audit recomputed (`audited`: AUDIT_ROW_COLUMNS), next to the screen of the same pair
    with the same `settings` (the config's `screen` section) on `adapter` (the model in float32)."""
    check_columns(screen, TABLE_COLUMNS, "screen table")
    check_columns(audited, AUDIT_ROW_COLUMNS, "audited rows")
    check_settings(adapter, settings)
    screen = screen.assign(draw=draws(screen))
    screen = screen[screen["sample_id"].astype(str).isin(set(audited["sample_id"].astype(str)))]
    by_pair = {key: rows for key, rows in screen.groupby([screen["sample_id"].astype(str), "draw"], sort=False)}
    frames = []
    for sample_id, draw, pair, _ in audited_pairs(pairs, audited, "precision audit of the screen"):
        half = by_pair.get((sample_id, draw))
        if half is None:
            raise ValueError(f"precision audit of the screen: pair {draw} of sample {sample_id!r} has no screen rows")
        clean_inp, corrupt_inp = pair_inputs(adapter, pair, load_image)
        image_fn = corrupt_image_fn(pair.corruption, corruption_settings, int(pair.noise_seed))
        estimates = pair_estimates(adapter, pair, clean_inp, corrupt_inp, settings, image_fn)
        float32 = estimates_table(estimates, clean_inp.tokens)[[*SITE_KEYS, "estimate"]]
        both = half.merge(float32, on=SITE_KEYS, how="outer", suffixes=("", "_float32"), validate="one_to_one")
        if both[["estimate", "estimate_float32"]].isna().any().any():
            raise ValueError(
                f"precision audit of the screen: sample {sample_id!r}, pair {draw}: the float32 screen has other "
                "sites than the screen table (another `screen` setting?)"
            )
        frames.append(both.assign(abs_error=(both["estimate"] - both["estimate_float32"]).abs()))
    return concat_or_empty(frames, SCREEN_AUDIT_ROW_COLUMNS)
