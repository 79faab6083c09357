"""SVO-Probes (Hendricks & Nematzadeh, 2021) from the published ``svo_probes.csv`` and downloaded images.

Each CSV row has a positive and a negative image whose subject-verb-object triplets differ in exactly
one role (``subj_neg`` / ``verb_neg`` / ``obj_neg``). As in the authors' preprocessing, a row gives
two samples, one per image: the clean image's own word of that role is the answer and the other
image's word is the distractor (column ``distractor_given``), so each image is once the clean and
once the SIP corrupt image. One task per role, because each role needs its own question template
(and STR partners should come from questions of the same form):

- task ``svo_subject``: ``Is the {a} or the {b} {subject}?``, subject = "crossing the street":
  "Is the child or the lady crossing the street?"
- task ``svo_verb``: ``Is the {subject} {a} or {b}?``, subject = "child": "Is the child crossing or walking?"
- task ``svo_object``: ``Is the {subject} the {a} or the {b}?``, subject = "child crossing":
  "Is the child crossing the street or the road?"

Triplets are base forms ("child,cross,street"); verbs become -ing forms (`gerund`), which is also the
answer of a verb sample. The verb question leaves the object out: the template has one context slot
before the options. The paper had GPT-3.5 correct the grammar (prepositions, articles); we do not,
so some questions read like "Is the dog or the cat lying the grass?".

``category`` is the role; ``group`` is the role too (the distractor is given, no group rule applies);
``pool_key`` is the CSV row: the pool holds that row's two images, keyed by their word. Images come
from the downloader's table (notice.data.download); a sample whose clean or corrupt image failed is
excluded with the download's reason. Exclusions per sample: kept + excluded = 2 x rows read.

The CSV is read as published (UTF-8 with or without a byte-order mark, LF or CRLF, ``True``/``False``
flags); sample ids count data rows from 0 (``<dataset>_r000000_pos``), and exclusion reasons name the
file line (line 1 = the header line, as an editor shows), e.g. ``svo_probes.csv line 2: ...``. A row
that cannot be parsed (wrong number of fields, bad quoting) is excluded with that reason.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from notice.data import RowError, csv_rows, exclusion, exclusions_frame, pool_frame, row_reason, samples_frame
from notice.files.tables import check_columns

CSV_COLUMNS: tuple[str, ...] = (
    "sentence",
    "pos_triplet",
    "neg_triplet",
    "subj_neg",
    "verb_neg",
    "obj_neg",
    "pos_url",
    "neg_url",
    "pos_image_id",
    "neg_image_id",
)
ROLES: tuple[str, ...] = ("subject", "verb", "object")
ROLE_FLAGS: dict[str, str] = {"subject": "subj_neg", "verb": "verb_neg", "object": "obj_neg"}
TASKS: dict[str, str] = {role: f"svo_{role}" for role in ROLES}
QUESTION_TEMPLATES: dict[str, str] = {
    "svo_subject": "Is the {a} or the {b} {subject}?",
    "svo_verb": "Is the {subject} {a} or {b}?",
    "svo_object": "Is the {subject} the {a} or the {b}?",
}
# Extra samples columns: the given distractor, and the triplets that the SD-inpainting SIP needs.
EXTRA_COLUMNS: tuple[str, ...] = ("distractor_given", "triplet", "corrupt_triplet")

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no", ""}
# -ing forms that the spelling rules below get wrong.
_IRREGULAR_ING = {
    "be": "being",
    "see": "seeing",
    "flee": "fleeing",
    "ski": "skiing",
    "dye": "dyeing",
    "hoe": "hoeing",
    "canoe": "canoeing",
    "panic": "panicking",
    "picnic": "picnicking",
    "begin": "beginning",
    "forget": "forgetting",
    "admit": "admitting",
    "control": "controlling",
    "patrol": "patrolling",
    "equip": "equipping",
    "permit": "permitting",
    "regret": "regretting",
    "upset": "upsetting",
}


@dataclass(frozen=True)
class Triplet:
    subject: str
    verb: str
    object: str

    def role(self, role: str) -> str:
        return getattr(self, role)

    def text(self) -> str:
        return f"{self.subject},{self.verb},{self.object}"


def gerund(verb: str) -> str:
    """-ing form of a base-form verb (first word of a phrasal verb): cross -> crossing, sit -> sitting."""
    head, *rest = verb.split(" ")
    word = head.lower()
    if word in _IRREGULAR_ING:
        ing = _IRREGULAR_ING[word]
    elif word.endswith("ie"):
        ing = word[:-2] + "ying"
    elif word.endswith("e") and not word.endswith(("ee", "ye", "oe")) and len(word) > 2:
        ing = word[:-1] + "ing"
    elif len(re.findall(r"[aeiou]+", word)) == 1 and re.search(r"[^aeiou][aeiou][^aeiouwxy]$", word):
        ing = word + word[-1] + "ing"  # one syllable ending consonant-vowel-consonant: sit -> sitting
    else:
        ing = word + "ing"
    return " ".join([ing, *rest])


def parse_triplet(text: str, column: str) -> Triplet:
    """'child,cross,street' (or the list form "['child,cross,street']" found in some copies)."""
    raw = text.strip()
    if raw.startswith("["):
        try:
            items = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise RowError(f"{column} {text!r} is not 'subject,verb,object'") from None
        raw = items[0] if isinstance(items, list) and len(items) == 1 and isinstance(items[0], str) else ""
    parts = [part.strip() for part in raw.split(",")]
    if len(parts) != 3 or not all(parts):
        raise RowError(f"{column} {text!r} is not 'subject,verb,object'")
    return Triplet(*parts)


def parse_flag(value: str, column: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowError(f"{column} = {value!r} is not a boolean")


def negated_role(row: Mapping[str, str]) -> str:
    flags = [role for role in ROLES if parse_flag(row[ROLE_FLAGS[role]], ROLE_FLAGS[role])]
    if len(flags) != 1:
        raise RowError(
            f"expected exactly one of subj_neg/verb_neg/obj_neg true, got {len(flags)}"
            + (f" ({', '.join(ROLE_FLAGS[r] for r in flags)})" if flags else "")
        )
    return flags[0]


def question_context(triplet: Triplet, role: str) -> str:
    """The ``subject`` column: the words of the other roles, in the form the role's template needs."""
    if role == "subject":
        return f"{gerund(triplet.verb)} the {triplet.object}"
    if role == "verb":
        return triplet.subject
    return f"{triplet.subject} {gerund(triplet.verb)}"


def option(triplet: Triplet, role: str) -> str:
    """The triplet's word for `role` as it appears among the options (verbs as -ing forms)."""
    word = triplet.role(role)
    return gerund(word) if role == "verb" else word


def read_svo_probes(
    csv_path: str | Path,
    downloads: pd.DataFrame,
    dataset: str = "svo_probes",
    max_rows: int | None = None,
    exclude_words: Sequence[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(samples, image pool, exclusions) of the first `max_rows` rows (all when None) of `csv_path`.

    `downloads` is the downloader's table (notice.data.download.DOWNLOAD_COLUMNS) for the CSV's URLs.
    Rows naming a word of `exclude_words` in either triplet are excluded (the authors dropped
    "person": models answer woman/person inconsistently).
    """
    csv_path = Path(csv_path)
    rows = csv_rows(csv_path, CSV_COLUMNS, max_rows)
    check_columns(downloads, ("url", "ok", "path", "reason"), "downloads table")
    images = {row.url: row for row in downloads.itertuples(index=False)}
    excluded_words = {word.strip().lower() for word in exclude_words}
    samples: list[dict] = []
    pool: list[dict] = []
    exclusions: list[dict] = []
    seen: dict[tuple, str] = {}
    for csv_row in rows:
        row = csv_row.values
        pool_key = f"{dataset}_r{csv_row.index:06d}"
        ids = {side: f"{pool_key}_{side}" for side in ("pos", "neg")}
        try:
            if csv_row.problem:
                raise RowError(csv_row.problem)
            role, triplets = _checked_row(row, excluded_words)
            paths = {side: _image_path(images, row[f"{side}_url"], side) for side in ("pos", "neg")}
        except RowError as error:
            exclusions += [
                exclusion(ids[side], dataset, row_reason(csv_path, csv_row.line, error)) for side in ("pos", "neg")
            ]
            continue
        task = TASKS[role]
        for side, other in (("pos", "neg"), ("neg", "pos")):
            own, corrupt = triplets[side], triplets[other]
            sample = {
                "sample_id": ids[side],
                "dataset": dataset,
                "task": task,
                "image_id": row[f"{side}_image_id"],
                "image_path": paths[side],
                "mask_path": "",
                "subject": question_context(own, role),
                "answer": option(own, role),
                "category": role,
                "group": role,
                "pool_key": pool_key,
                "distractor_given": option(corrupt, role),
                "triplet": own.text(),
                "corrupt_triplet": corrupt.text(),
            }
            # The same question about the same image can come from several rows: keep the first.
            key = (task, paths[side], sample["subject"], sample["answer"], sample["distractor_given"])
            if key in seen:
                exclusions.append(
                    exclusion(ids[side], dataset, row_reason(csv_path, csv_row.line, f"duplicate of {seen[key]}"))
                )
            else:
                seen[key] = ids[side]
                samples.append(sample)
            pool.append(
                {
                    "dataset": dataset,
                    "task": task,
                    "pool_key": pool_key,
                    "value": sample["answer"],
                    "image_path": paths[side],
                    "mask_path": "",
                }
            )
    return samples_frame(samples, EXTRA_COLUMNS), pool_frame(pool), exclusions_frame(exclusions)


def _checked_row(row: Mapping[str, str], excluded_words: set[str]) -> tuple[str, dict[str, Triplet]]:
    """(negated role, {"pos": triplet, "neg": triplet}) of a usable row; RowError otherwise."""
    role = negated_role(row)
    triplets = {side: parse_triplet(row[f"{side}_triplet"], f"{side}_triplet") for side in ("pos", "neg")}
    differ = [r for r in ROLES if triplets["pos"].role(r).lower() != triplets["neg"].role(r).lower()]
    if differ != [role]:
        raise RowError(
            f"triplets {triplets['pos'].text()} / {triplets['neg'].text()} differ in "
            f"{', '.join(differ) or 'nothing'}, but {ROLE_FLAGS[role]} says {role}"
        )
    words = {w.lower() for t in triplets.values() for w in (t.subject, t.verb, t.object)}
    if hit := sorted(words & excluded_words):
        raise RowError(f"contains excluded word(s) {hit}")
    for side in ("pos", "neg"):
        if not row[f"{side}_image_id"].strip():
            raise RowError(f"{side}_image_id is empty")
    return role, triplets


def _image_path(images: Mapping[str, Any], url: str, side: str) -> str:
    """The downloaded file of `url`, or RowError with the download's reason."""
    name = "positive" if side == "pos" else "negative"
    if not url.strip():
        raise RowError(f"{side}_url is empty")
    found = images.get(url)
    if found is None:
        raise RowError(f"{name} image not downloaded: {url} is not in the downloads table")
    if not found.ok:
        raise RowError(f"{name} image failed to download: {found.reason} ({url})")
    return str(found.path)


def image_urls(csv_path: str | Path, max_rows: int | None = None) -> list[str]:
    """The distinct non-empty image URLs of the first `max_rows` rows, sorted (what the downloader fetches).

    Rows that cannot be parsed have no URLs to fetch; the reader excludes them with the reason.
    """
    rows = csv_rows(Path(csv_path), ("pos_url", "neg_url"), max_rows)
    return sorted({url for row in rows for url in row.values.values() if url.strip()})
