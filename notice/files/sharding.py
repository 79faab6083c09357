"""Split per-sample GPU work into shards and gather it back, deterministically.

A shard is a contiguous block of the sorted sample ids, so every stage (evaluation, clean cache,
patching) puts a sample in the same shard, and a sample's rows (e.g. several noise draws) are never
split. Shard files are named `shard<k>-of<n>`, so shards of another shard count are never mixed in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def shard_name(index: int, count: int) -> str:
    return f"shard{index}-of{count}"


def shard_ids(sample_ids: Iterable[str], index: int, count: int) -> set[str]:
    """The sample ids of shard `index` of `count` (contiguous blocks of the sorted unique ids)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside 0..{count - 1}")
    ids = sorted(set(map(str, sample_ids)))
    return set(np.array_split(np.array(ids, dtype=object), count)[index].tolist()) if ids else set()


def take_shard(df: pd.DataFrame, index: int, count: int, universe: Iterable[str] | None = None) -> pd.DataFrame:
    """Rows of `df` whose sample_id falls in shard `index` of `count`.

    `universe` is the id list the shards are cut from (default: df's own ids), so that tables holding
    different subsets of samples (pairs with exclusions) shard consistently with the selection.
    """
    ids = shard_ids(df["sample_id"] if universe is None else universe, index, count)
    return df[df["sample_id"].astype(str).isin(ids)].reset_index(drop=True)


def gather_tables(paths: Sequence[str | os.PathLike], columns: Sequence[str]) -> pd.DataFrame:
    """Concatenate shard tables in shard order (the order the paths are given in)."""
    frames = [pd.read_parquet(path) for path in paths]
    frames = [frame for frame in frames if len(frame)] or frames[:1]
    return pd.concat(frames, ignore_index=True)[list(columns)]


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: a killed job leaves no half file."""
    import torch  # here, not at the top: the gathering jobs import this module and need no torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
