"""Choose each sample's distractor (the incorrect option): same/other attribute group, not too similar.

For every sample, the candidates are the other values of its task allowed by the task's group rule
(``same_group``: MIT-States states of the same group; ``other_group``: facial expressions of an
opposing group; ``any``). A candidate is rejected, with a recorded reason, when it is a listed
near-synonym of the answer, has no word vector, or its cosine with the answer exceeds the threshold.
Given the image pool, a candidate is also rejected when the pool has no image of it for the sample's
``pool_key`` (the SIP corrupt image could not exist: most MIT-States nouns come in only a few states,
and the authors chose among the states that exist for the noun). One of the remaining candidates is
drawn with an RNG seeded by (seed, sample_id) only, so a sample's choice does not change when other
samples are added or removed. Samples with nothing left are excluded with a reason. Where the dataset
gives the distractor (``distractor_given``, SVO-Probes'
negative triplet) it is used as is, and its cosine is still recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from gensim.models import KeyedVectors

from notice.files.tables import (
    DISTRACTOR_COLUMNS,
    DISTRACTOR_REJECTION_COLUMNS,
    EXCLUSION_COLUMNS,
    make_table,
    stable_seed,
)
from notice.method.vectors import cosine, phrase_vector

Rule = Literal["same_group", "other_group", "any"]
RULES: tuple[str, ...] = ("same_group", "other_group", "any")
GIVEN_COLUMN = "distractor_given"
STAGE = "distractors"


def choose_distractors(
    samples_df: pd.DataFrame,
    values_by_task: Mapping[str, Sequence[str]],
    groups: Mapping[str, Mapping[str, str]],
    rule: Mapping[str, Rule],
    kv: KeyedVectors,
    cosine_threshold: float,
    near_synonyms: Sequence[Sequence[str]],
    seed: int,
    pool_df: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return (distractors, rejections, exclusions) tables for `samples_df` (SAMPLE_COLUMNS).

    `values_by_task[task]` lists the task's options, `groups[task][value]` their attribute group
    (the answer's group is the sample's ``group``), `rule[task]` the group rule. Candidates are
    considered in the order of `values_by_task`, so the draw is reproducible. With `pool_df`
    (IMAGE_POOL_COLUMNS), only candidates with a pool image for the sample's (task, pool_key) are kept.
    """
    synonyms = _synonym_sets(near_synonyms)
    pictured = None if pool_df is None else pool_values(pool_df)
    filtered: dict[tuple[str, str, str], tuple[list[tuple[str, float]], list[dict], str]] = {}
    chosen: list[dict] = []
    rejections: list[dict] = []
    exclusions: list[dict] = []
    for sample in samples_df.itertuples(index=False):
        sample_id, task, answer = str(sample.sample_id), str(sample.task), str(sample.answer)
        given = _given(sample)
        if given is not None:
            if given == answer:
                exclusions.append(_exclusion(sample_id, f"given distractor equals the answer: {given}"))
                continue
            chosen.append(_distractor_row(sample_id, task, answer, given, _cosine(kv, answer, given)))
            continue
        # The filtering depends only on (task, answer, group): compute it once per combination.
        key = (task, answer, str(sample.group))
        if key not in filtered:
            filtered[key] = _filter_candidates(
                task, answer, str(sample.group), values_by_task, groups, rule, kv, cosine_threshold, synonyms
            )
        kept, rejected, reason = filtered[key]
        if pictured is not None:
            kept, rejected, reason = _with_pool_image(
                kept, rejected, reason, pictured.get((task, str(sample.pool_key)), frozenset()), str(sample.pool_key)
            )
        rejections.extend({"sample_id": sample_id, **row} for row in rejected)
        if not kept:
            exclusions.append(_exclusion(sample_id, reason))
            continue
        rng = np.random.default_rng(stable_seed(seed, sample_id))
        distractor, cos = kept[int(rng.integers(len(kept)))]
        chosen.append(_distractor_row(sample_id, task, answer, distractor, cos))
    return (
        make_table(chosen, DISTRACTOR_COLUMNS, {"cosine": "float64"}),
        make_table(rejections, DISTRACTOR_REJECTION_COLUMNS, {"cosine": "float64"}),
        make_table(exclusions, EXCLUSION_COLUMNS, {}),
    )


def _filter_candidates(
    task: str,
    answer: str,
    answer_group: str,
    values_by_task: Mapping[str, Sequence[str]],
    groups: Mapping[str, Mapping[str, str]],
    rule: Mapping[str, Rule],
    kv: KeyedVectors,
    threshold: float,
    synonyms: list[frozenset[str]],
) -> tuple[list[tuple[str, float]], list[dict], str]:
    """(kept (candidate, cosine) pairs, rejection rows without sample_id, exclusion reason if none kept)."""
    if task not in values_by_task:
        raise KeyError(f"distractors: task {task!r} has no values (values_by_task has {sorted(values_by_task)})")
    task_rule = rule.get(task)
    if task_rule not in RULES:
        raise ValueError(f"distractors: task {task!r} needs a rule in {RULES}, got {task_rule!r}")
    task_groups = groups.get(task, {})
    if task_rule != "any" and answer in task_groups and task_groups[answer] != answer_group:
        raise ValueError(
            f"distractors: task {task!r}: sample group {answer_group!r} of {answer!r} disagrees with "
            f"the configured group {task_groups[answer]!r}"
        )
    candidates = [
        v
        for v in dict.fromkeys(values_by_task[task])
        if v != answer and _allowed(task, v, answer_group, task_rule, task_groups)
    ]
    if not candidates:
        return [], [], f"no candidate value for rule {task_rule} (answer {answer}, group {answer_group})"
    answer_vec, answer_missing = phrase_vector(kv, answer)
    if answer_vec is None:
        return [], [], f"answer {answer_missing}"
    kept, rejected = [], []
    for candidate in candidates:
        vec, missing = phrase_vector(kv, candidate)
        cos = cosine(answer_vec, vec) if vec is not None else math.nan
        if _are_synonyms(answer, candidate, synonyms):
            reason = "near-synonym"
        elif vec is None:
            reason = missing
        elif cos > threshold:
            reason = f"cosine {cos:.3f} > threshold {threshold:g}"
        else:
            kept.append((candidate, cos))
            continue
        rejected.append({"candidate": candidate, "cosine": cos, "reason": reason})
    return kept, rejected, "" if kept else _all_rejected(rejected)


def pool_values(pool_df: pd.DataFrame) -> dict[tuple[str, str], frozenset[str]]:
    """(task, pool_key) -> the values the image pool has an image of."""
    values: dict[tuple[str, str], set[str]] = {}
    for task, pool_key, value in pool_df[["task", "pool_key", "value"]].itertuples(index=False, name=None):
        values.setdefault((str(task), str(pool_key)), set()).add(str(value))
    return {key: frozenset(found) for key, found in values.items()}


def _with_pool_image(
    kept: list[tuple[str, float]], rejected: list[dict], reason: str, pictured: frozenset[str], pool_key: str
) -> tuple[list[tuple[str, float]], list[dict], str]:
    """Reject the kept candidates without a pool image (an earlier rejection's reason stays)."""
    if not kept:
        return kept, rejected, reason
    without = [(c, cos) for c, cos in kept if c not in pictured]
    if not without:
        return kept, rejected, reason
    rejected = rejected + [
        {"candidate": c, "cosine": cos, "reason": f"no image of {c} for {pool_key}"} for c, cos in without
    ]
    kept = [(c, cos) for c, cos in kept if c in pictured]
    return kept, rejected, "" if kept else _all_rejected(rejected)


def _all_rejected(rejected: list[dict]) -> str:
    """E.g. "all 3 candidates rejected: 2 cosine above threshold, 1 near-synonym"."""
    kinds = [row["reason"].split(" ")[0] for row in rejected]
    labels = {
        "cosine": "cosine above threshold",
        "near-synonym": "near-synonym",
        "not": "not in vocabulary",
        "no": "no pool image",
    }
    counts = ", ".join(f"{kinds.count(kind)} {labels.get(kind, kind)}" for kind in dict.fromkeys(kinds))
    return f"all {len(rejected)} candidates rejected: {counts}"


def _allowed(task: str, value: str, answer_group: str, task_rule: str, task_groups: Mapping[str, str]) -> bool:
    if task_rule == "any":
        return True
    if value not in task_groups:
        raise KeyError(f"distractors: task {task!r}: value {value!r} has no group (rule {task_rule})")
    same = task_groups[value] == answer_group
    return same if task_rule == "same_group" else not same


def _synonym_sets(near_synonyms: Sequence[Sequence[str]]) -> list[frozenset[str]]:
    return [frozenset(word.strip().lower() for word in words) for words in near_synonyms]


def _are_synonyms(a: str, b: str, synonyms: list[frozenset[str]]) -> bool:
    a, b = a.strip().lower(), b.strip().lower()
    return any(a in words and b in words for words in synonyms)


def _given(sample) -> str | None:
    """The dataset's own distractor for this sample, or None when there is none."""
    value = getattr(sample, GIVEN_COLUMN, None)
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return str(value)


def _cosine(kv: KeyedVectors, a: str, b: str) -> float:
    u, _ = phrase_vector(kv, a)
    v, _ = phrase_vector(kv, b)
    return cosine(u, v) if u is not None and v is not None else math.nan


def _distractor_row(sample_id: str, task: str, answer: str, distractor: str, cos: float) -> dict:
    return {"sample_id": sample_id, "task": task, "answer": answer, "distractor": distractor, "cosine": cos}


def _exclusion(sample_id: str, reason: str) -> dict:
    return {"sample_id": sample_id, "stage": STAGE, "reason": reason}
