"""Readers of the paper's datasets in the formats users have on disk (see each module).

Every reader returns three tables: samples (SAMPLE_COLUMNS, plus reader-specific extra columns),
image pool (IMAGE_POOL_COLUMNS: the SIP corrupt images) and exclusions (EXCLUSION_COLUMNS, stage
``read:<dataset>``): one row for every sample it read but could not use, with the reason, so that
kept + excluded = read. Readers are deterministic: the same files and seed give byte-identical tables.

Conventions shared by the readers: a CSV row is named by its file line as an editor shows it (line 1
is the header line), e.g. ``svo_probes.csv line 5: ...``; a file under a folder tree is named by its
path under the tree, and every file found there (hidden ones and those in nested sub-folders too) is
either a sample or an exclusion.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pandas as pd
from PIL import Image

from notice.files.tables import (
    EXCLUSION_COLUMNS,
    IMAGE_POOL_COLUMNS,
    SAMPLE_COLUMNS,
    TableError,
    make_table,
    stable_seed,
    write_table,
)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
# csv's message for a quoted field still open at the end of the file (strict mode).
_EOF_IN_QUOTES = "unexpected end of data"


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
    if path.stat().st_size == 0:
        return f"{path.name}: empty file (0 bytes)"
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


# -- folder trees ---------------------------------------------------------------------------------------
def tree_files(root: Path) -> list[Path]:
    """Every regular file under `root` at any depth, hidden ones included, in sorted (folder, name) order.

    Readers walk the whole tree so that a file they do not use becomes an exclusion, never a silent skip.
    """
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).parts)


def layout_problem(relative: Path, depth: int, layout: str) -> str:
    """Why the file at `relative` (under the tree's root) is not where a sample is ("" when it is).

    A sample sits exactly `depth` levels down (`layout` says where, e.g. "'<split>/<emotion>/'"); hidden
    files and folders (".DS_Store", "._x.jpg", ".ipynb_checkpoints/") are system or editor litter.
    """
    parts = relative.parts
    if relative.name.startswith("."):
        return f"{relative.name}: hidden file (name starts with '.'), not read as an image"
    if hidden := [part for part in parts[:-1] if part.startswith(".")]:
        return f"inside hidden folder {hidden[0]!r}, not read"
    if len(parts) < depth:
        return f"file outside {layout} folder"
    if len(parts) > depth:
        nested = "/".join(parts[depth - 1 : -1])
        return f"in nested sub-folder {nested!r}; images are read only directly inside {layout} folder"
    return ""


# -- CSV files ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsvRow:
    """One data record of a CSV file: its values by (stripped) header name, or why it cannot be parsed."""

    index: int  # 0-based data record (sample ids)
    line: int  # file line where the record starts; line 1 is the header line
    values: Mapping[str, str]  # empty when `problem` is set
    problem: str  # "" for a well-formed record


def csv_rows(path: Path, columns: Sequence[str], max_rows: int | None = None) -> list[CsvRow]:
    """The first `max_rows` data records of `path` (all when None); blank lines are not records.

    UTF-8 with or without a byte-order mark, LF or CRLF line ends; header names are stripped (some copies
    write " pixels"). A record with another number of fields than the header, or bad quoting, comes back
    with its `problem` (the reader excludes it); a file that cannot be parsed at all (empty, not UTF-8, a
    quote never closed, missing columns) raises a TableError naming the file and the reason.
    """
    with open(path, encoding="utf-8-sig", newline="") as stream:
        records = _records(path, stream)
        header_line, header = next(records, (0, None))
        if header is None or isinstance(header, csv.Error):
            raise TableError(
                f"{path}: cannot parse as CSV: {'empty file' if header is None else header} "
                f"(expected a header line with columns {list(columns)})"
            )
        names = [name.strip() for name in header]
        missing = [c for c in columns if c not in names]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; has {names}")
        rows: list[CsvRow] = []
        for line, record in records:
            if max_rows is not None and len(rows) >= max_rows:
                break
            rows.append(_row(len(rows), line, record, names, columns))
    return rows


def _records(path: Path, stream: TextIO) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(start line, fields or the csv error) of every non-blank record; TableError when parsing must stop."""
    reader = csv.reader(stream, strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            record: list[str] | csv.Error = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if str(error) == _EOF_IN_QUOTES:
                raise TableError(
                    f"{path}: cannot parse as CSV: the quoted field opened on line {start} is never "
                    "closed (unexpected end of file)"
                ) from None
            record = error
        except UnicodeDecodeError as error:
            byte = error.object[error.start : error.start + 1]
            raise TableError(
                f"{path}: cannot parse as CSV: not UTF-8 text (byte {byte!r}: {error.reason}, at or "
                f"after line {end + 1}); save it as UTF-8"
            ) from None
        end = reader.line_num
        if record != []:
            yield start, record


def _row(index: int, line: int, record: list[str] | csv.Error, names: list[str], columns: Sequence[str]) -> CsvRow:
    if isinstance(record, csv.Error):
        return CsvRow(index, line, {}, f"cannot parse the line ({record})")
    if len(record) != len(names):
        return CsvRow(index, line, {}, f"{len(record)} fields, expected {len(names)} like the header")
    values = dict(zip(names, record))
    return CsvRow(index, line, {c: values[c] for c in columns}, "")


def row_reason(path: Path, line: int, reason: object) -> str:
    """The exclusion reason of a CSV row: file name and file line (1 = header), as an editor shows them."""
    return f"{path.name} line {line}: {reason}"


# -- too few samples ------------------------------------------------------------------------------------
def task_counts(samples: pd.DataFrame, tasks: Sequence[str]) -> dict[str, int]:
    """Samples per expected task, 0 for a task that has none (value_counts alone would leave it out)."""
    counts = samples["task"].value_counts()
    return {task: int(counts.get(task, 0)) for task in sorted(tasks)}


def too_few(counts: Mapping[str, int], minimum: int, what: str) -> str:
    """The tasks below `minimum` as "task 'x' has 0 <what>, ..." ("" when every task has enough)."""
    short = [f"task {task!r} has {n} {what}" for task, n in counts.items() if n < minimum]
    return "; ".join(short)


def write_read_tables(
    samples: pd.DataFrame,
    pool: pd.DataFrame,
    exclusions: pd.DataFrame,
    outputs: Mapping[str, str],
    dataset: str,
    tasks: Sequence[str],
    min_per_task: int,
) -> None:
    """Write a reader's three tables, or, when a task has fewer than `min_per_task` samples, raise.

    Before raising, the exclusions go to ``<exclusions>.failed.parquet``: Snakemake deletes a failed
    job's declared outputs, and the reasons are what the user needs to fix the source.
    """
    failed = failed_table(outputs["exclusions"])
    if short := too_few(task_counts(samples, tasks), min_per_task, "usable samples"):
        write_table(exclusions, failed, EXCLUSION_COLUMNS)
        raise ValueError(
            f"dataset {dataset!r}, stage {read_stage(dataset)}: {short} (selection.min_per_task = {min_per_task}); "
            f"the reason for each of the {len(exclusions)} excluded samples is in {failed}"
        )
    failed.unlink(missing_ok=True)  # a previous failure's table would mislead once the read succeeds
    write_table(samples, outputs["samples"], SAMPLE_COLUMNS)
    write_table(pool, outputs["pool"], IMAGE_POOL_COLUMNS)
    write_table(exclusions, outputs["exclusions"], EXCLUSION_COLUMNS)


def failed_table(path: str | Path) -> Path:
    """Where a failed job leaves the table it would have written at `path` (not a declared output)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.failed{path.suffix}")


def selection_problem(
    selected: pd.DataFrame,
    tasks: Sequence[str],
    min_per_task: int,
    n_per_task: int,
    answers_path: str | Path,
) -> str:
    """Why a (model, dataset) selection cannot be patched ("" when every task has `min_per_task` samples).

    Only correctly answered samples are selected, so the answers table says why a task came up short
    (its `correct` column), and the prompts stage's exclusions next to it say what never got a prompt.
    """
    if min_per_task > n_per_task:
        return (
            f"config: selection.min_per_task = {min_per_task} is larger than selection.n_per_task = "
            f"{n_per_task}, so no selection can reach it"
        )
    short = too_few(task_counts(selected, tasks), min_per_task, "selected samples")
    if not short:
        return ""
    answers_path = Path(answers_path)
    return (
        f"{short} (selection.min_per_task = {min_per_task}); only correctly answered samples are selected: "
        f"see {answers_path} (column correct) and, for samples without a prompt, "
        f"{answers_path.with_name('prompt_exclusions.parquet')}"
    )
