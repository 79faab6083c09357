"""Readers of the paper's datasets in the formats users have on disk (see each module).

Every reader returns three tables: samples (SAMPLE_COLUMNS, plus reader-specific extra columns),
image pool (IMAGE_POOL_COLUMNS: the SIP corrupt images) and exclusions (EXCLUSION_COLUMNS, stage
``read:<dataset>``): one row for every sample it read but could not use, with the reason, so that
kept + excluded = read. Readers are deterministic: the same files and seed give byte-identical tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from PIL import Image

from notice.tables import EXCLUSION_COLUMNS, IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, make_table, stable_seed

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})


class RowError(ValueError):
    """A row (or file) that cannot be used; the message is the exclusion reason."""


def read_stage(dataset: str) -> str:
    return f"read:{dataset}"


def exclusion(sample_id: str, dataset: str, reason: str) -> dict:
    return {"sample_id": sample_id, "stage": read_stage(dataset), "reason": reason}


def samples_frame(rows: list[dict], extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    return make_table(rows, (*SAMPLE_COLUMNS, *extra_columns), {})


def pool_frame(rows: list[dict]) -> pd.DataFrame:
    return make_table(rows, IMAGE_POOL_COLUMNS, {})


def exclusions_frame(rows: list[dict]) -> pd.DataFrame:
    return make_table(rows, EXCLUSION_COLUMNS, {})


def image_problem(path: Path) -> str:
    """Why the image file cannot be used ("" when it decodes completely)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Image.UnidentifiedImageError:
        return f"{path.name}: not an image (PIL cannot identify it)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"{path.name}: cannot decode image ({error})"
    return ""


def pick(seed: int, n: int, *keys: object) -> int:
    """A deterministic index in range(n) from (seed, keys): independent of every other choice."""
    return stable_seed(seed, *keys) % n


def files_in(folder: Path) -> list[Path]:
    """Regular files of `folder` in sorted order, without hidden files (.DS_Store and the like)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
