"""What the flow stage writes around the library's rows: label columns, and why a sample's edge or analysis
was skipped (nothing is dropped without a row in the skipped table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

# In front of every flow table's own columns (knockout, logit lens, ablation).
LABEL_COLUMNS: tuple[str, ...] = ("model", "dataset", "task", "sample_id")

# One row per (sample, analysis, item) that could not be computed: analysis "knockout" (item: the edge),
# "ablation" or "logit_lens" (item: what of it is missing).
SKIPPED_COLUMNS: tuple[str, ...] = (*LABEL_COLUMNS, "analysis", "item", "reason")


def edge_name(edge: tuple[str, str]) -> str:
    return f"{edge[0]}:{edge[1]}"


def no_object_reason(has_object_mask: bool) -> str:
    """Why a sample has no object token: no mask, or one that covers no image patch."""
    return "the object mask covers no image patch" if has_object_mask else "no object mask"


def labelled(rows: pd.DataFrame, labels: Mapping[str, Any], columns: Sequence[str]) -> pd.DataFrame:
    """`rows` (a library table with `columns`) with `labels` (LABEL_COLUMNS) in front."""
    return rows.assign(**labels)[[*LABEL_COLUMNS, *columns]]


def skipped_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The skipped table (SKIPPED_COLUMNS) of skip records that already carry their labels."""
    return pd.DataFrame(list(records), columns=list(SKIPPED_COLUMNS)).astype(str)
