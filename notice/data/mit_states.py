"""MIT-States (Isola et al., 2015) from the release's folder tree.

Supported layouts, under the directory given (the unzipped release): ``images/<adjective> <noun>/*``
(the published release) and ``images/<adjective>_<noun>/*`` (some re-distributed copies); a folder
name is split at its first space, or, without a space, at its first underscore. The release's
``adj <noun>`` folders hold images of the noun without a state label: they are excluded, with that
reason. Every file directly inside a state folder is read as one sample (extensions in any case:
``.JPG``); files that are not jpg/jpeg/png, are empty or do not decode are excluded with the reason, and
so is every other file of the tree: hidden files (``.DS_Store``), files in nested sub-folders and files
outside a state folder.

One task, ``mit_states``: "Is this <noun> <a> or <b>?" (``subject`` = noun, ``answer`` = adjective).
States are grouped into colour / shape / texture (``STATE_GROUPS``, the authors' lists); the group is
the sample's ``category`` and ``group`` (the distractor comes from the same group, rule
``same_group``), and a sample whose state is in no configured group is excluded. The SIP corrupt
image shows the same noun in the distractor state: ``pool_key`` = noun, and the pool has one image per
(noun, state), drawn from the state folder with a seeded choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from notice.data import (
    IMAGE_SUFFIXES,
    exclusion,
    exclusions_frame,
    image_problem,
    layout_problem,
    pick,
    pool_frame,
    samples_frame,
    tree_files,
)

TASK = "mit_states"
QUESTION_TEMPLATE = "Is this {subject} {a} or {b}?"
UNLABELLED = "adj"  # the release's folder prefix for images without a state
FOLDER_LAYOUT = "an '<adjective> <noun>'"

# The authors' state groups (NOTICE preprocessing of MIT-States), as state -> group.
_GROUP_LISTS: dict[str, tuple[str, ...]] = {
    "colour": (
        "caramelized",
        "painted",
        "bright",
        "dark",
        "unpainted",
        "engraved",
        "wet",
        "burnt",
        "weathered",
        "rusty",
        "old",
        "new",
        "dry",
        "verdant",
        "clean",
        "frozen",
        "thawed",
        "ancient",
        "moldy",
        "muddy",
        "fresh",
    ),
    "shape": (
        "small",
        "large",
        "thick",
        "thin",
        "coiled",
        "cracked",
        "folded",
        "sliced",
        "dented",
        "chipped",
        "shattered",
        "diced",
        "straight",
        "empty",
        "cut",
        "pressed",
        "torn",
        "broken",
        "tiny",
        "huge",
        "melted",
        "draped",
        "scratched",
    ),
    "texture": (
        "crushed",
        "crumpled",
        "splintered",
        "wrinkled",
        "ruffled",
        "mossy",
        "molten",
        "windblown",
        "eroded",
        "pureed",
        "crinkled",
        "frayed",
        "brushed",
        "barren",
    ),
}
STATE_GROUPS: dict[str, str] = {state: group for group, states in _GROUP_LISTS.items() for state in states}


def split_folder(name: str) -> tuple[str, str] | None:
    """(adjective, noun) of a state folder name, or None when it has neither a space nor an underscore."""
    for separator in (" ", "_"):
        if separator in name:
            adjective, noun = name.split(separator, 1)
            if adjective and noun:
                return adjective, noun
    return None


def read_mit_states(
    source_dir: str | Path,
    dataset: str = "mit_states",
    groups: Mapping[str, str] = STATE_GROUPS,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(samples, image pool, exclusions) of the MIT-States tree under `source_dir`.

    `groups` maps each state to its group (states outside it are excluded); `seed` picks the pool image
    of each (noun, state).
    """
    images_dir = Path(source_dir) / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"{source_dir}: no images/ directory; expected the MIT-States layout "
            f"{Path(source_dir) / 'images'}/<adjective> <noun>/*.jpg"
        )
    samples, exclusions = [], []
    usable: dict[tuple[str, str], list[str]] = {}  # (noun, state) -> image paths
    for path in tree_files(images_dir):
        relative = path.relative_to(images_dir)
        sample_id, image_id = f"{dataset}/{relative.as_posix()}", relative.as_posix()
        folder = relative.parts[0]
        parsed = split_folder(folder)
        reason = (
            layout_problem(relative, 2, FOLDER_LAYOUT) or _folder_problem(folder, parsed, groups) or _file_problem(path)
        )
        if reason:
            exclusions.append(exclusion(sample_id, dataset, reason))
            continue
        assert parsed is not None  # else _folder_problem gave a reason
        adjective, noun = parsed
        group = groups[adjective]
        samples.append(
            {
                "sample_id": sample_id,
                "dataset": dataset,
                "task": TASK,
                "image_id": image_id,
                "image_path": str(path),
                "mask_path": "",
                "subject": noun,
                "answer": adjective,
                "category": group,
                "group": group,
                "pool_key": noun,
            }
        )
        usable.setdefault((noun, adjective), []).append(str(path))
    pool = [
        {
            "dataset": dataset,
            "task": TASK,
            "pool_key": noun,
            "value": adjective,
            "image_path": paths[pick(seed, len(paths), dataset, noun, adjective)],
            "mask_path": "",
        }
        for (noun, adjective), paths in sorted(usable.items())
    ]
    return samples_frame(samples), pool_frame(pool), exclusions_frame(exclusions)


def _folder_problem(name: str, parsed: tuple[str, str] | None, groups: Mapping[str, str]) -> str:
    if parsed is None:
        return f"folder {name!r} is not '<adjective> <noun>'"
    if parsed[0] == UNLABELLED:
        return f"folder {name!r}: image of the noun without a state label"
    if parsed[0] not in groups:
        return f"state {parsed[0]!r} is not in any configured group"
    return ""


def _file_problem(path: Path) -> str:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{path.name}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})"
    return image_problem(path)
