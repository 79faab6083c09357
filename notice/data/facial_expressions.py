"""Facial expressions: FER-2013 (Goodfellow et al., 2013) as a CSV file or as an image folder tree.

Supported sources:

- the challenge's ``fer2013.csv`` (columns ``emotion,pixels,Usage``) or the Kaggle competition's
  ``icml_face_data.csv`` (``emotion, Usage, pixels``: other order, leading spaces in the header names);
  columns are found by (stripped) name. emotion 0-6 = angry, disgusted, fearful, happy, sad, surprised,
  neutral; ``pixels`` = 48 x 48 = 2304 space-separated grey values. Data row ``i`` (0-based, sample id
  ``row<i:05d>``) is decoded to ``<out_dir>/images/<Usage>/<i:05d>.png``; a row with a malformed emotion,
  pixel list or Usage, or that cannot be parsed as CSV (wrong number of fields, bad quoting), is
  excluded with the reason, which names the file line (line 1 = the header line, as an editor shows);
- a directory holding ``<split>/<emotion>/*.jpg``, directly (the common Kaggle copy: ``train/``,
  ``test/``) or under ``images/`` (e.g. the "facial emotion expressions" copy the authors used: splits
  ``train`` / ``validation``). Any split names; emotion folders angry, disgust, fear, happy, neutral,
  sad, surprise (any case; the adjective forms are accepted too). Images are used in place. Every other
  file of the tree (hidden, in a nested sub-folder, outside an emotion folder) is excluded with the reason.

One task, ``facial_expressions``: "Is this person feeling <a> or <b>?" (``subject`` = "person",
``answer`` = ``category`` = the emotion adjective). Emotions are grouped positive / negative /
neutral (``EMOTION_GROUPS``; the distractor comes from another group, rule ``other_group``); an
emotion in no configured group, or a split not in `splits`, is excluded with the reason.

SIP corrupt image: ``pool_key`` is the sample itself, and its pool rows hold, for every other
emotion, one image of that emotion from the same split, drawn with a seeded choice per (sample,
emotion), so different samples get different corrupt faces.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from notice.data import (
    IMAGE_SUFFIXES,
    RowError,
    csv_rows,
    exclusion,
    exclusions_frame,
    image_problem,
    layout_problem,
    pick,
    pool_frame,
    row_reason,
    samples_frame,
    tree_files,
)
from notice.data.download import write_atomically

TASK = "facial_expressions"
SUBJECT = "person"
QUESTION_TEMPLATE = "Is this {subject} feeling {a} or {b}?"
CSV_COLUMNS: tuple[str, ...] = ("emotion", "pixels", "Usage")
# FER-2013 label i is EMOTIONS[i]; options are adjectives ("Is this person feeling fearful ...").
EMOTIONS: tuple[str, ...] = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
FOLDER_LAYOUT = "a '<split>/<emotion>/'"
# Folder names of the image-folder copies (lower-cased) -> adjective.
FOLDER_EMOTIONS: dict[str, str] = {
    **{emotion: emotion for emotion in EMOTIONS},
    "anger": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happiness": "happy",
    "sadness": "sad",
    "surprise": "surprised",
}
# The paper groups the seven emotions into positive / negative / neutral without listing them; surprise
# counts as positive here (as in valence-based groupings of FER-2013).
EMOTION_GROUPS: dict[str, str] = {
    "happy": "positive",
    "surprised": "positive",
    "neutral": "neutral",
    "angry": "negative",
    "disgusted": "negative",
    "fearful": "negative",
    "sad": "negative",
}
SIDE = 48


@dataclass(frozen=True)
class Record:
    """One usable image before grouping: what the samples and pool tables are built from."""

    sample_id: str
    image_id: str
    split: str
    emotion: str
    image_path: str


def decode_pixels(pixels: str) -> np.ndarray:
    """The 48 x 48 uint8 image of a ``pixels`` field, or RowError saying what is wrong with it."""
    values = pixels.split()
    if len(values) != SIDE * SIDE:
        raise RowError(f"{len(values)} pixel values, expected {SIDE * SIDE}")
    try:
        array = np.array(values, dtype=np.int64)
    except ValueError:
        raise RowError("pixel values are not all integers") from None
    if array.min() < 0 or array.max() > 255:
        raise RowError(f"pixel values outside 0-255 (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8).reshape(SIDE, SIDE)


def parse_emotion(value: str) -> str:
    text = value.strip()
    if not text.isdigit() or int(text) >= len(EMOTIONS):
        raise RowError(f"emotion {value!r} is not an integer 0-{len(EMOTIONS) - 1}")
    return EMOTIONS[int(text)]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_facial_expressions(
    source: str | Path,
    out_dir: str | Path,
    dataset: str = "facial_expressions",
    groups: Mapping[str, str] = EMOTION_GROUPS,
    splits: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(samples, image pool, exclusions) of `source`: a FER-2013 CSV file or a directory of split folders.

    `out_dir` receives the PNGs decoded from a CSV; `splits` keeps only these Usage values / split folders
    (None: all); `seed` picks the pool images.
    """
    source = Path(source)
    if source.is_file():
        records, exclusions = _csv_records(source, Path(out_dir), dataset, groups, splits)
    elif source.is_dir():
        records, exclusions = _folder_records(source, dataset, groups, splits)
    else:
        raise FileNotFoundError(
            f"{source}: neither a fer2013.csv file nor a directory with [images/]<split>/<emotion>/*.jpg"
        )
    samples = [
        {
            "sample_id": r.sample_id,
            "dataset": dataset,
            "task": TASK,
            "image_id": r.image_id,
            "image_path": r.image_path,
            "mask_path": "",
            "subject": SUBJECT,
            "answer": r.emotion,
            "category": r.emotion,
            "group": groups[r.emotion],
            "pool_key": r.sample_id,
        }
        for r in records
    ]
    return samples_frame(samples), pool_frame(_pool(records, dataset, seed)), exclusions_frame(exclusions)


def _pool(records: list[Record], dataset: str, seed: int) -> list[dict]:
    """For every sample and every other emotion: one image of that emotion from the sample's split."""
    by_split_emotion: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        by_split_emotion.setdefault((record.split, record.emotion), []).append(record)
    emotions = sorted({r.emotion for r in records})
    pool = []
    for record in records:
        for emotion in emotions:
            candidates = by_split_emotion.get((record.split, emotion), [])
            if emotion == record.emotion or not candidates:
                continue
            chosen = candidates[pick(seed, len(candidates), dataset, record.sample_id, emotion)]
            pool.append(
                {
                    "dataset": dataset,
                    "task": TASK,
                    "pool_key": record.sample_id,
                    "value": emotion,
                    "image_path": chosen.image_path,
                    "mask_path": "",
                }
            )
    return pool


def _csv_records(
    path: Path, out_dir: Path, dataset: str, groups: Mapping[str, str], splits: Sequence[str] | None
) -> tuple[list[Record], list[dict]]:
    records, exclusions = [], []
    for row in csv_rows(path, CSV_COLUMNS):
        sample_id = f"{dataset}/row{row.index:05d}"
        try:
            if row.problem:
                raise RowError(row.problem)
            emotion = parse_emotion(row.values["emotion"])
            array = decode_pixels(row.values["pixels"])
            split = _checked_split(row.values["Usage"].strip(), splits)
            _check_group(emotion, groups)
        except RowError as error:
            exclusions.append(exclusion(sample_id, dataset, row_reason(path, row.line, error)))
            continue
        image = out_dir / "images" / re.sub(r"[^A-Za-z0-9_-]", "_", split) / f"{row.index:05d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(png_bytes(array), image)
        records.append(Record(sample_id, f"row{row.index:05d}", split, emotion, str(image)))
    return records, exclusions


def _folder_records(
    root: Path, dataset: str, groups: Mapping[str, str], splits: Sequence[str] | None
) -> tuple[list[Record], list[dict]]:
    base = split_root(root)
    records, exclusions = [], []
    for path in tree_files(base):
        relative = path.relative_to(base)
        image_id = relative.as_posix()
        sample_id = f"{dataset}/{image_id}"
        try:
            if problem := layout_problem(relative, 3, FOLDER_LAYOUT):
                raise RowError(problem)
            split, folder = relative.parts[0], relative.parts[1]
            emotion = FOLDER_EMOTIONS.get(folder.lower())
            if emotion is None:
                raise RowError(f"folder {folder!r} is not a FER-2013 emotion")
            _checked_split(split, splits)
            _check_group(emotion, groups)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise RowError(f"{path.name}: not an image file")
            if problem := image_problem(path):
                raise RowError(problem)
        except RowError as error:
            exclusions.append(exclusion(sample_id, dataset, str(error)))
            continue
        records.append(Record(sample_id, image_id, split, emotion, str(path)))
    return records, exclusions


def split_root(root: Path) -> Path:
    """The folder holding the split folders: ``root/images`` when there is one (some copies), else `root`."""
    base = root / "images" if (root / "images").is_dir() else root
    if not any(p.is_dir() for p in base.iterdir()):
        raise FileNotFoundError(
            f"{root}: no split folders; expected {root}/<split>/<emotion>/*.jpg or "
            f"{root}/images/<split>/<emotion>/*.jpg"
        )
    return base


def _checked_split(split: str, splits: Sequence[str] | None) -> str:
    if not split:
        raise RowError("Usage (split) is empty")
    if splits is not None and split not in splits:
        raise RowError(f"split {split!r} is not in the configured splits {list(splits)}")
    return split


def _check_group(emotion: str, groups: Mapping[str, str]) -> None:
    if emotion not in groups:
        raise RowError(f"emotion {emotion!r} is not in any configured group")
