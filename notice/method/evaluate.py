"""Clean prompts, the model's clean answers and accuracy, and the selection of samples to patch.

Randomness is seeded per task (seed, task name), so adding a task or a dataset does not change the
answer order or the selection of the others.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.files.tables import ANSWER_COLUMNS, EXCLUSION_COLUMNS, PROMPT_COLUMNS

# torch comes with the adapters and metrics; the selection and accuracy jobs use this module without it.
if TYPE_CHECKING:
    from notice.adapters.base import VLMAdapter

ALL_CATEGORIES = "(all)"  # `category` of the per-task rows of the accuracy table
DEFAULT_MAX_NEW_TOKENS = 5  # the schema's default of a model's max_new_tokens, for callers outside the workflow


def task_rng(seed: int, task: str) -> np.random.Generator:
    """Generator that depends only on the seed and the task name (stable across processes)."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def balanced_flags(n: int, rng: np.random.Generator) -> np.ndarray:
    """n booleans, ceil(n/2) True, in a seeded random order."""
    return rng.permutation(np.arange(n) < (n + 1) // 2)


def _exclusion(sample_id: str, reason: str) -> dict:
    return {"sample_id": sample_id, "stage": "prompts", "reason": reason}


def build_prompts(
    samples_df: pd.DataFrame,
    distractors_df: pd.DataFrame,
    adapter: VLMAdapter,
    templates: Mapping[str, str],
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One prompt per usable sample (PROMPT_COLUMNS) and one exclusion row per unusable one.

    Excluded: samples without a distractor, and samples whose answer and distractor share their
    first answer token (the logit difference would be 0 by construction). Among the rest,
    `correct_first` is True for ceil(n/2) of each task's n samples, placed by a seeded permutation
    of the samples sorted by sample_id. The question is the task template with {subject}, {a}, {b}.
    """
    missing = sorted(set(samples_df["task"]) - set(templates))
    if missing:
        raise KeyError(f"no question template for task(s) {missing}; templates exist for {sorted(templates)}")
    merged = samples_df.merge(
        distractors_df[["sample_id", "distractor"]], on="sample_id", how="left", validate="one_to_one"
    )
    exclusions, kept = [], []
    for row in merged.sort_values("sample_id").itertuples(index=False):
        if pd.isna(row.distractor):
            exclusions.append(_exclusion(row.sample_id, "no distractor"))
            continue
        answer_id, distractor_id = adapter.option_token_id(row.answer), adapter.option_token_id(row.distractor)
        if answer_id == distractor_id:
            exclusions.append(
                _exclusion(
                    row.sample_id,
                    f"answer {row.answer!r} and distractor {row.distractor!r} share the first token id {answer_id}",
                )
            )
            continue
        kept.append({**row._asdict(), "answer_token_id": answer_id, "distractor_token_id": distractor_id})

    prompts = pd.DataFrame(kept, columns=[*merged.columns, "answer_token_id", "distractor_token_id"])
    prompts["correct_first"] = False
    for task, index in prompts.groupby("task").groups.items():
        prompts.loc[index, "correct_first"] = balanced_flags(len(index), task_rng(seed, str(task)))
    prompts["correct_first"] = prompts["correct_first"].astype(bool)

    def question(row: pd.Series) -> str:
        a, b = (row.answer, row.distractor) if row.correct_first else (row.distractor, row.answer)
        return templates[row.task].format(subject=row.subject, a=a, b=b)

    prompts["question"] = prompts.apply(question, axis=1) if len(prompts) else pd.Series(dtype=str)
    prompts["prompt"] = prompts["question"].map(adapter.format_prompt)
    return prompts[list(PROMPT_COLUMNS)].reset_index(drop=True), pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)


def is_correct(predicted: str, answer: str) -> bool:
    """Exact match after lowercasing and stripping surrounding whitespace."""
    return predicted.strip().lower() == answer.strip().lower()


def evaluate(
    adapter: VLMAdapter,
    prompts_df: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> pd.DataFrame:
    """The model's clean answer to every prompt (ANSWER_COLUMNS), in the order of `prompts_df`."""
    from notice.patching.scores import scores

    rows = []
    for row in tqdm(prompts_df.itertuples(index=False), total=len(prompts_df), desc="evaluate", file=sys.stderr):
        inp = adapter.prepare(load_image(row.image_path), row.prompt)
        clean = scores(adapter.answer_logits(inp), row.answer_token_id, row.distractor_token_id)
        predicted = adapter.generate_answer(inp, max_new_tokens)
        rows.append(
            {
                "predicted": predicted,
                "correct": is_correct(predicted, row.answer),
                "ld_clean": clean.ld,
                "p_clean": clean.p,
            }
        )
    answers = pd.concat([prompts_df.reset_index(drop=True), pd.DataFrame(rows, index=range(len(prompts_df)))], axis=1)
    return answers[list(ANSWER_COLUMNS)]


def accuracy_table(answers_df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per task (category == "(all)") and per (task, category): n, n_correct, accuracy."""

    def summarise(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        out = df.groupby(keys, sort=True)["correct"].agg(n="size", n_correct="sum").reset_index()
        out["n_correct"] = out["n_correct"].astype(int)
        return out

    per_task = summarise(answers_df, ["task"]).assign(category=ALL_CATEGORIES)
    per_category = summarise(answers_df, ["task", "category"])
    table = pd.concat([per_task, per_category], ignore_index=True)[["task", "category", "n", "n_correct"]]
    table["accuracy"] = table["n_correct"] / table["n"]
    # Per-task row first, then its categories.
    table["_order"] = table["category"] != ALL_CATEGORIES
    return table.sort_values(["task", "_order", "category"]).drop(columns="_order").reset_index(drop=True)


def _cell_order(categories: list[str], rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Visiting order of the (category, correct_first) cells within one round.

    Categories in a seeded order c0..ck; first (c0, True), (c1, False), (c2, True), ... then the
    opposite answer order for each. Any prefix of this order has answer-order counts differing by at
    most one and never repeats a category before all have been visited once.
    """
    order = [categories[i] for i in rng.permutation(len(categories))]
    first = [(c, i % 2 == 0) for i, c in enumerate(order)]
    return first + [(c, not flag) for c, flag in first]


def select_samples(answers_df: pd.DataFrame, n_per_task: int, seed: int) -> pd.DataFrame:
    """Up to `n_per_task` correctly answered samples per task, balanced over categories and answer order.

    Per task, each (category, correct_first) cell is shuffled (seeded), then samples are taken round
    by round, one per cell per round in `_cell_order`. A cell that runs out is skipped from then on,
    so the remaining cells fill its share deterministically; with enough samples in every cell the
    counts per category and per answer order differ by at most one. Rows come out per task (sorted),
    in selection order; no sample is taken twice.
    """
    if answers_df["sample_id"].duplicated().any():
        raise ValueError("answers table has duplicate sample_ids")
    correct = answers_df[answers_df["correct"].astype(bool)]
    selected = []
    for task in sorted(correct["task"].unique()):
        rng = task_rng(seed, str(task))
        df = correct[correct["task"] == task].sort_values("sample_id")
        cells = {
            key: list(rng.permutation(group.index.to_numpy()))
            for key, group in df.groupby(["category", "correct_first"], sort=True)
        }
        order = [key for key in _cell_order(sorted(df["category"].unique()), rng) if key in cells]
        taken: list = []
        while len(taken) < n_per_task and any(cells.values()):
            for key in order:
                if cells[key] and len(taken) < n_per_task:
                    taken.append(cells[key].pop(0))
        selected.append(df.loc[taken])
    columns = answers_df.columns
    return pd.concat(selected, ignore_index=True) if selected else pd.DataFrame(columns=columns)
