"""Column contracts of the tables that flow between workflow stages.

Every stage reads and writes Parquet through these helpers so that a missing or misnamed column
fails loudly with the file name, instead of silently producing misaligned results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

# One row per question about one image. Same format for every dataset (synthetic and real).
SAMPLE_COLUMNS: tuple[str, ...] = (
    "sample_id",  # unique, stable across runs
    "dataset",  # dataset name from the config
    "task",  # e.g. "colour", "shape", "svo", "mit_states", "facial_expressions"
    "image_id",  # identity of the clean image (several samples may share one image)
    "image_path",  # path of the clean image
    "mask_path",  # path of the object's mask (PNG, 0/255) or "" when none exists
    "subject",  # noun the question is about, used by question templates ("object", "person")
    "answer",  # correct option, e.g. "red"
    "category",  # category used for accuracy tables and balanced selection (usually == answer)
    "group",  # attribute group of the answer (e.g. "warm"), used by distractor rules
    "pool_key",  # SIP: the corrupt image is the pool image with this key and value == distractor
)

# Images available as SIP corrupt images: one row per (pool_key, value).
IMAGE_POOL_COLUMNS: tuple[str, ...] = ("dataset", "task", "pool_key", "value", "image_path", "mask_path")

# One row per sample: the chosen distractor (incorrect option). Rejected candidates go to a
# separate table with DISTRACTOR_REJECTION_COLUMNS.
DISTRACTOR_COLUMNS: tuple[str, ...] = ("sample_id", "task", "answer", "distractor", "cosine")
DISTRACTOR_REJECTION_COLUMNS: tuple[str, ...] = ("sample_id", "candidate", "cosine", "reason")

# Samples that a stage could not use, with the reason. Nothing is dropped without a row here.
EXCLUSION_COLUMNS: tuple[str, ...] = ("sample_id", "stage", "reason")

# One row per (model, sample): the clean prompt as the model sees it and the scored answer tokens.
PROMPT_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "task",
    "category",
    "image_path",
    "mask_path",
    "answer",
    "distractor",
    "correct_first",  # bool: the correct option is named first in the question
    "question",  # the question (options in the chosen order), before the model's template
    "prompt",  # the full prompt string given to the processor
    "answer_token_id",
    "distractor_token_id",
)

# One row per (model, sample): the model's clean answer.
ANSWER_COLUMNS: tuple[str, ...] = PROMPT_COLUMNS + ("predicted", "correct", "ld_clean", "p_clean")

# One row per (model, selected sample, corruption): what the corrupt run sees.
PAIR_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "task",
    "category",
    "corruption",
    "modality",
    "correct_first",
    "answer",
    "distractor",
    "answer_token_id",
    "distractor_token_id",
    "clean_image_path",
    "corrupt_image_path",
    "clean_mask_path",
    "corrupt_mask_path",
    "clean_prompt",
    "corrupt_prompt",
    "noise_seed",  # gaussian-noise corruptions: seed of this draw, else -1
)

# The results table: one row per patched run. The contract later work and users rely on.
RESULT_COLUMNS: tuple[str, ...] = (
    "model",
    "dataset",
    "task",
    "corruption",
    "modality",
    "sample_id",
    "site",
    "layer",
    "head",
    "position",
    "token",
    "ld_clean",
    "ld_corrupt",
    "ld_patched",
    "p_clean",
    "p_corrupt",
    "p_patched",
    "logit_diff",
    "prob_restoration",
)


class TableError(ValueError):
    """A table on disk does not have the columns or values its stage expects."""


def check_columns(df: pd.DataFrame, columns: Iterable[str], where: str) -> pd.DataFrame:
    """Raise a TableError naming `where` and the missing columns; return df unchanged."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{where}: missing column(s) {missing}; has {list(df.columns)}")
    return df


def read_table(path: str | Path, columns: Iterable[str]) -> pd.DataFrame:
    """Read a Parquet table and check that it has `columns`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: table not found")
    return check_columns(pd.read_parquet(path), columns, str(path))


def write_table(df: pd.DataFrame, path: str | Path, columns: Iterable[str]) -> None:
    """Check columns, then write atomically (temporary file, then rename) so no half file survives."""
    path = Path(path)
    check_columns(df, columns, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.reset_index(drop=True).to_parquet(tmp, index=False)
    tmp.replace(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def stable_seed(seed: int, *keys: object) -> int:
    """A non-negative 63-bit seed from `seed` and `keys`, identical across runs, machines and Pythons.

    (Python's hash() is salted per process, so it cannot be used for this.)
    """
    text = "\x1f".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def make_table(rows: list[dict], columns: Sequence[str], dtypes: Mapping[str, str]) -> pd.DataFrame:
    """A table with exactly `columns`, string columns as str and the given dtypes, even when empty."""
    df = pd.DataFrame(rows, columns=list(columns))
    return df.astype({c: dtypes.get(c, "str") for c in columns})
