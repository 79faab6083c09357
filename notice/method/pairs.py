"""Corruption manifests: what the corrupt run of each (correctly answered) sample sees.

One row per (sample, corruption[, noise draw]) with PAIR_COLUMNS. Only one modality is corrupted:

- SIP (image): the pool image of the sample's ``pool_key`` showing the distractor; prompt unchanged.
- STR (text): both options replaced by the two options of another sample of the task, such that the
  corrupt prompt has the clean prompt's token count under the model's tokenizer and differs from it
  only at the option tokens, so clean and corrupt positions line up one to one. Image unchanged.
- Gaussian noise (image, baseline): the clean image; noise is drawn later on the image embeddings from
  the row's ``noise_seed``.

Samples that cannot be paired are returned as exclusion rows with the reason; kept + excluded = input.
All functions are pure and deterministic in their inputs and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import pandas as pd

from notice.files.tables import (
    EXCLUSION_COLUMNS,
    PAIR_COLUMNS,
    PROMPT_COLUMNS,
    check_columns,
    make_table,
    stable_seed,
)

Tokenize = Callable[[str], list[int]]
# (sample_id, first option, second option) -> that sample's question with these options, in this order.
FormatQuestion = Callable[[str, str, str], str]
FormatPrompt = Callable[[str], str]

PAIR_DTYPES = {
    "correct_first": "bool",
    "answer_token_id": "int64",
    "distractor_token_id": "int64",
    "noise_seed": "int64",
}
GAUSSIAN_CORRUPTIONS = {"multiplicative": "gn_mult", "additive": "gn_add"}
NO_NOISE = -1
# Private-use characters: cannot occur in real questions, so they locate the option slots exactly.
_SLOT_A, _SLOT_B = "\ue000", "\ue001"


def sip_pairs(
    prompts_df: pd.DataFrame, samples_df: pd.DataFrame, pool_df: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Semantic image pairs: corrupt image = the pool image with the sample's pool_key showing the distractor."""
    check_columns(prompts_df, PROMPT_COLUMNS, "sip_pairs prompts")
    check_columns(samples_df, ("sample_id", "dataset", "task", "pool_key"), "sip_pairs samples")
    if samples_df["sample_id"].duplicated().any():
        raise ValueError("sip_pairs: the samples table has duplicate sample_id values")
    pool_key_of = {
        sid: (dataset, task, pool_key)
        for sid, dataset, task, pool_key in samples_df[["sample_id", "dataset", "task", "pool_key"]].itertuples(
            index=False, name=None
        )
    }
    duplicated = pool_df.duplicated(["dataset", "task", "pool_key", "value"], keep=False)
    if duplicated.any():
        rows = pool_df.loc[duplicated, ["dataset", "task", "pool_key", "value"]].drop_duplicates()
        raise ValueError(f"sip_pairs: image pool has several images for {rows.to_dict('records')[:5]}")
    pool = {
        (row.dataset, row.task, row.pool_key, row.value): (row.image_path, row.mask_path)
        for row in pool_df.itertuples(index=False)
    }
    pairs, exclusions = [], []
    for prompt in prompts_df.itertuples(index=False):
        if prompt.sample_id not in pool_key_of:
            raise ValueError(f"sip_pairs: sample {prompt.sample_id!r} of the prompts is not in the samples table")
        key = pool_key_of[prompt.sample_id]
        found = pool.get((*key, prompt.distractor))
        if found is None:
            reason = f"no pool image for pool_key {key[2]!r} and value {prompt.distractor!r}"
        elif found[0] == prompt.image_path:
            reason = f"pool image for {prompt.distractor!r} is the clean image {found[0]}"
        else:
            pairs.append(_pair(prompt, "sip", "image", found[0], found[1], prompt.prompt, NO_NOISE))
            continue
        exclusions.append({"sample_id": prompt.sample_id, "stage": "pairs:sip", "reason": reason})
    return _pairs_table(pairs), make_table(exclusions, EXCLUSION_COLUMNS, {})


def str_pairs(
    prompts_df: pd.DataFrame,
    tokenize: Tokenize,
    format_question: FormatQuestion,
    format_prompt: FormatPrompt,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Symmetric token replacement with equal token length (see the module docstring).

    `tokenize` is the model's own tokenizer (with special tokens). `format_question(sample_id, a, b)`
    must rebuild each sample's ``question`` and `format_prompt` its ``prompt`` (checked; a mismatch
    raises). Partners are the other samples of the task whose two options both differ from this
    sample's answer and distractor; they are tried in an order seeded by (seed, sample_id, partner
    options), so adding samples only changes a choice when a new partner ranks first. The partner's
    correct option goes into the correct option's slot.
    """
    check_columns(prompts_df, PROMPT_COLUMNS, "str_pairs prompts")
    tokens = lru_cache(maxsize=None)(lambda text: tuple(tokenize(text)))  # many prompts repeat
    empty = tokens("")
    option_pairs = {
        task: sorted(set(zip(group["answer"], group["distractor"])))
        for task, group in prompts_df.groupby("task", sort=True)
    }
    pairs, exclusions = [], []
    for prompt in prompts_df.itertuples(index=False):
        slots = _Slots.of(prompt, format_question, format_prompt)
        clean = _Tokenized.of(
            slots, slots.first_second(prompt.answer, prompt.distractor, prompt.correct_first), tokens, empty
        )
        if clean is None:
            reason = "options do not start and end on token boundaries of the clean prompt"
        else:
            partners = [
                pair for pair in option_pairs[prompt.task] if not {prompt.answer, prompt.distractor} & set(pair)
            ]
            partners.sort(key=lambda pair: (stable_seed(seed, prompt.sample_id, *pair), pair))
            corrupt, reason = _first_aligned(slots, clean, partners, prompt.correct_first, tokens, empty)
            if corrupt is not None:
                pairs.append(_pair(prompt, "str", "text", prompt.image_path, prompt.mask_path, corrupt, NO_NOISE))
                continue
        exclusions.append({"sample_id": prompt.sample_id, "stage": "pairs:str", "reason": reason})
    return _pairs_table(pairs), make_table(exclusions, EXCLUSION_COLUMNS, {})


def gaussian_pairs(
    prompts_df: pd.DataFrame, kind: Literal["multiplicative", "additive"], n_draws: int, seed: int
) -> pd.DataFrame:
    """Gaussian-noise baseline: `n_draws` rows per sample, noise_seed = stable_seed(seed, sample_id, draw)."""
    check_columns(prompts_df, PROMPT_COLUMNS, "gaussian_pairs prompts")
    if kind not in GAUSSIAN_CORRUPTIONS:
        raise ValueError(f"gaussian_pairs: kind must be one of {sorted(GAUSSIAN_CORRUPTIONS)}, got {kind!r}")
    if n_draws < 1:
        raise ValueError(f"gaussian_pairs: n_draws must be >= 1, got {n_draws}")
    pairs = [
        _pair(
            prompt,
            GAUSSIAN_CORRUPTIONS[kind],
            "image",
            prompt.image_path,
            prompt.mask_path,
            prompt.prompt,
            stable_seed(seed, prompt.sample_id, draw),
        )
        for prompt in prompts_df.itertuples(index=False)
        for draw in range(n_draws)
    ]
    return _pairs_table(pairs)


@dataclass(frozen=True)
class _Slots:
    """A sample's prompt as fixed text around two option slots: before + first + middle + second + after."""

    before: str
    middle: str
    after: str

    @classmethod
    def of(cls, prompt, format_question: FormatQuestion, format_prompt: FormatPrompt) -> _Slots:
        first, second = cls.first_second(prompt.answer, prompt.distractor, prompt.correct_first)
        question = format_question(prompt.sample_id, first, second)
        if question != prompt.question or format_prompt(question) != prompt.prompt:
            raise ValueError(
                f"str_pairs: sample {prompt.sample_id!r}: format_question/format_prompt do not rebuild its "
                f"question and prompt: {question!r} / {format_prompt(question)!r} != {prompt.question!r} / "
                f"{prompt.prompt!r}"
            )
        template = format_prompt(format_question(prompt.sample_id, _SLOT_A, _SLOT_B))
        if (
            template.count(_SLOT_A) != 1
            or template.count(_SLOT_B) != 1
            or template.index(_SLOT_A) > template.index(_SLOT_B)
        ):
            raise ValueError(
                f"str_pairs: sample {prompt.sample_id!r}: the options must appear once each, in order: {template!r}"
            )
        before, rest = template.split(_SLOT_A)
        slots = cls(before, *rest.split(_SLOT_B))
        if slots.text(first, second) != prompt.prompt:
            raise ValueError(
                f"str_pairs: sample {prompt.sample_id!r}: the question template must insert the options "
                f"verbatim: {template!r}"
            )
        return slots

    @staticmethod
    def first_second(answer: str, distractor: str, correct_first: bool) -> tuple[str, str]:
        return (answer, distractor) if correct_first else (distractor, answer)

    def text(self, first: str, second: str) -> str:
        return self.before + first + self.middle + second + self.after

    def boundaries(self, first: str, second: str) -> tuple[int, int, int, int]:
        """Character offsets (start1, end1, start2, end2); a start includes the whitespace before the
        option, since BPE/SentencePiece tokenizers attach it to the option's first token."""
        end1 = len(self.before) + len(first)
        end2 = end1 + len(self.middle) + len(second)
        return len(self.before.rstrip()), end1, len((self.before + first + self.middle).rstrip()), end2


@dataclass(frozen=True)
class _Tokenized:
    """A prompt's token ids and the token positions of its two options."""

    ids: tuple[int, ...]
    options: tuple[range, range]

    @classmethod
    def of(
        cls, slots: _Slots, options: tuple[str, str], tokens: Callable[[str], tuple[int, ...]], empty: tuple[int, ...]
    ) -> _Tokenized | None:
        """None when an option does not start and end on a token boundary (a merge across its edge).

        Tokenizing the text up to a boundary must give a prefix of the full tokenization (apart from
        the special tokens that every tokenization ends with); the prefix lengths are the positions.
        """
        text = slots.text(*options)
        ids = tokens(text)
        lead = _common_prefix(empty, ids)
        trail = len(empty) - lead
        if ids[len(ids) - trail :] != empty[lead:]:
            return None
        positions = []
        for boundary in slots.boundaries(*options):
            prefix = tokens(text[:boundary])
            prefix = prefix[: len(prefix) - trail]
            if ids[: len(prefix)] != prefix:
                return None
            positions.append(len(prefix))
        first, second = range(positions[0], positions[1]), range(positions[2], positions[3])
        return cls(ids, (first, second)) if len(first) and len(second) else None


def _first_aligned(
    slots: _Slots,
    clean: _Tokenized,
    partners: Sequence[tuple[str, str]],
    correct_first: bool,
    tokens: Callable[[str], tuple[int, ...]],
    empty: tuple[int, ...],
) -> tuple[str | None, str]:
    """The first partner's corrupt prompt that lines up with the clean one, else (None, reason)."""
    if not partners:
        return None, "no option pair of another sample without this sample's answer or distractor"
    equal_length = 0
    for partner_answer, partner_distractor in partners:
        options = _Slots.first_second(partner_answer, partner_distractor, correct_first)
        text = slots.text(*options)
        if len(tokens(text)) != len(clean.ids):
            continue
        equal_length += 1
        corrupt = _Tokenized.of(slots, options, tokens, empty)
        if corrupt is not None and _aligned(clean, corrupt):
            return text, ""
    if not equal_length:
        return None, "no equal-length option pair"
    return None, (
        f"no equal-length option pair with aligned tokens ({equal_length} tried: tokens outside the "
        "options change, or an option's tokens are unchanged)"
    )


def _aligned(clean: _Tokenized, corrupt: _Tokenized) -> bool:
    """Same option positions, identical tokens elsewhere, and each option changed in at least one token."""
    if clean.options != corrupt.options or len(clean.ids) != len(corrupt.ids):
        return False
    option_positions = set(clean.options[0]) | set(clean.options[1])
    differing = {i for i, (a, b) in enumerate(zip(clean.ids, corrupt.ids)) if a != b}
    return differing <= option_positions and all(differing & set(option) for option in clean.options)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _pair(
    prompt, corruption: str, modality: str, corrupt_image: str, corrupt_mask: str, corrupt_prompt: str, noise_seed: int
) -> dict:
    return {
        "sample_id": prompt.sample_id,
        "task": prompt.task,
        "category": prompt.category,
        "corruption": corruption,
        "modality": modality,
        "correct_first": bool(prompt.correct_first),
        "answer": prompt.answer,
        "distractor": prompt.distractor,
        "answer_token_id": prompt.answer_token_id,
        "distractor_token_id": prompt.distractor_token_id,
        "clean_image_path": prompt.image_path,
        "corrupt_image_path": corrupt_image,
        "clean_mask_path": prompt.mask_path,
        "corrupt_mask_path": corrupt_mask,
        "clean_prompt": prompt.prompt,
        "corrupt_prompt": corrupt_prompt,
        "noise_seed": noise_seed,
    }


def _pairs_table(rows: list[dict]) -> pd.DataFrame:
    return make_table(rows, PAIR_COLUMNS, PAIR_DTYPES)
