"""SVO-Probes reader: the published CSV format, row by row."""

import numpy as np
import pandas as pd
import pytest
from gensim.models import KeyedVectors
from PIL import Image

from notice.data.download import DOWNLOAD_COLUMNS
from notice.data.svo_probes import (
    CSV_COLUMNS,
    EXTRA_COLUMNS,
    QUESTION_TEMPLATES,
    gerund,
    image_urls,
    parse_triplet,
    read_svo_probes,
)
from notice.files.tables import EXCLUSION_COLUMNS, IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, TableError, write_table
from notice.method.distractors import choose_distractors

U = "http://img.example/"
# sentence, pos_triplet, neg_triplet, subj_neg, verb_neg, obj_neg, pos_url, neg_url, pos_image_id, neg_image_id
ROWS = [
    [
        "A child crossing the street.",
        "child,cross,street",
        "lady,cross,street",
        "True",
        "False",
        "False",
        U + "1.jpg",
        U + "2.jpg",
        "1",
        "2",
    ],
    [
        "A man riding a horse.",
        "man,ride,horse",
        "man,feed,horse",
        "False",
        "True",
        "False",
        U + "3.jpg",
        U + "4.jpg",
        "3",
        "4",
    ],
    [
        "A child crossing the road.",
        "['child,cross,road']",
        "['child,cross,bridge']",
        "False",
        "False",
        "True",
        U + "5.jpg",
        U + "6.jpg",
        "5",
        "6",
    ],
    ["A dog sitting.", "dog,sit", "cat,sit,grass", "True", "False", "False", U + "7.jpg", U + "8.jpg", "7", "8"],
    ["Two flags.", "dog,sit,grass", "cat,sit,grass", "True", "True", "False", U + "7.jpg", U + "8.jpg", "7", "8"],
    ["Wrong flag.", "dog,sit,grass", "cat,sit,grass", "False", "True", "False", U + "7.jpg", U + "8.jpg", "7", "8"],
    [
        "A person running.",
        "person,run,beach",
        "dog,run,beach",
        "True",
        "False",
        "False",
        U + "9.jpg",
        U + "10.jpg",
        "9",
        "10",
    ],
    [
        "A child crossing the street.",
        "child,cross,street",
        "lady,cross,street",
        "True",
        "False",
        "False",
        U + "1.jpg",
        U + "2.jpg",
        "1",
        "2",
    ],  # the same questions as row 0
    [
        "A dog swimming.",
        "dog,swim,lake",
        "dog,walk,lake",
        "False",
        "True",
        "False",
        U + "11.jpg",
        U + "404.jpg",
        "11",
        "12",
    ],
    ["A bad flag.", "dog,swim,lake", "cat,swim,lake", "maybe", "False", "False", U + "11.jpg", U + "2.jpg", "11", "2"],
]


def _write_csv(path, rows=ROWS):
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(path, index=False)
    return path


def _downloads(tmp_path):
    """A downloads table as notice.data.download writes it: every URL ok but 404.jpg."""
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    rows = []
    for url in image_urls(tmp_path / "svo_probes.csv"):
        if url.endswith("404.jpg"):
            rows.append(dict(url=url, ok=False, path="", sha256="", reason="HTTP 404", attempts=1, cached=False))
            continue
        path = cache / (url.rsplit("/", 1)[1].replace(".jpg", ".png"))
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
        rows.append(dict(url=url, ok=True, path=str(path), sha256="x", reason="", attempts=1, cached=False))
    return pd.DataFrame(rows, columns=list(DOWNLOAD_COLUMNS))


@pytest.fixture
def read(tmp_path):
    _write_csv(tmp_path / "svo_probes.csv")
    downloads = _downloads(tmp_path)
    return lambda **kw: read_svo_probes(tmp_path / "svo_probes.csv", downloads, dataset="svo", **kw)


def test_samples_pool_and_questions_row_by_row(read, tmp_path):
    samples, pool, exclusions = read(exclude_words=["person"])
    assert list(samples.columns) == [*SAMPLE_COLUMNS, *EXTRA_COLUMNS]
    cache = tmp_path / "cache"
    expected = [
        # sample_id, task, image, subject, answer, distractor, question
        (
            "svo_r000000_pos",
            "svo_subject",
            "1",
            "crossing the street",
            "child",
            "lady",
            "Is the child or the lady crossing the street?",
        ),
        (
            "svo_r000000_neg",
            "svo_subject",
            "2",
            "crossing the street",
            "lady",
            "child",
            "Is the lady or the child crossing the street?",
        ),
        ("svo_r000001_pos", "svo_verb", "3", "man", "riding", "feeding", "Is the man riding or feeding?"),
        ("svo_r000001_neg", "svo_verb", "4", "man", "feeding", "riding", "Is the man feeding or riding?"),
        (
            "svo_r000002_pos",
            "svo_object",
            "5",
            "child crossing",
            "road",
            "bridge",
            "Is the child crossing the road or the bridge?",
        ),
        (
            "svo_r000002_neg",
            "svo_object",
            "6",
            "child crossing",
            "bridge",
            "road",
            "Is the child crossing the bridge or the road?",
        ),
    ]
    assert len(samples) == len(expected)
    for row, (sample_id, task, image, subject, answer, distractor, question) in zip(
        samples.itertuples(index=False), expected
    ):
        assert (row.sample_id, row.task, row.image_id, row.subject, row.answer, row.distractor_given) == (
            sample_id,
            task,
            image,
            subject,
            answer,
            distractor,
        )
        assert row.image_path == str(cache / f"{image}.png")
        assert row.category == row.group == task.removeprefix("svo_")
        assert row.pool_key == sample_id.rsplit("_", 1)[0]
        assert row.mask_path == ""
        assert QUESTION_TEMPLATES[task].format(subject=row.subject, a=row.answer, b=row.distractor_given) == question
    assert samples.loc[:1, ["triplet", "corrupt_triplet"]].values.tolist() == [
        ["child,cross,street", "lady,cross,street"],
        ["lady,cross,street", "child,cross,street"],
    ]

    # SIP: the pool row (pool_key, distractor) is the other image of the row.
    assert list(pool.columns) == list(IMAGE_POOL_COLUMNS)
    lookup = {(r.pool_key, r.value): r.image_path for r in pool.itertuples(index=False)}
    for row in samples.itertuples(index=False):
        other_side = "neg" if row.sample_id.endswith("_pos") else "pos"
        other = samples.loc[samples["sample_id"] == f"{row.pool_key}_{other_side}", "image_path"].item()
        assert lookup[(row.pool_key, row.distractor_given)] == other
        assert lookup[(row.pool_key, row.answer)] == row.image_path

    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    assert list(exclusions.columns) == list(EXCLUSION_COLUMNS) and set(exclusions["stage"]) == {"read:svo"}
    for side in ("pos", "neg"):
        assert reasons[f"svo_r000003_{side}"] == (
            "svo_probes.csv line 5: pos_triplet 'dog,sit' is not 'subject,verb,object'"
        )
        assert reasons[f"svo_r000004_{side}"] == (
            "svo_probes.csv line 6: expected exactly one of subj_neg/verb_neg/obj_neg true, got 2 (subj_neg, verb_neg)"
        )
        assert reasons[f"svo_r000005_{side}"] == (
            "svo_probes.csv line 7: triplets dog,sit,grass / cat,sit,grass differ in subject, but verb_neg says verb"
        )
        assert reasons[f"svo_r000006_{side}"] == "svo_probes.csv line 8: contains excluded word(s) ['person']"
        assert reasons[f"svo_r000007_{side}"] == f"svo_probes.csv line 9: duplicate of svo_r000000_{side}"
        assert reasons[f"svo_r000008_{side}"] == (
            "svo_probes.csv line 10: negative image failed to download: HTTP 404 (http://img.example/404.jpg)"
        )
        assert reasons[f"svo_r000009_{side}"] == "svo_probes.csv line 11: subj_neg = 'maybe' is not a boolean"
    assert len(samples) + len(exclusions) == 2 * len(ROWS)


def test_max_rows_and_no_excluded_words(read):
    samples, _, exclusions = read(max_rows=3)
    assert len(samples) == 6 and exclusions.empty
    samples, _, exclusions = read()
    assert "svo_r000006_pos" in set(samples["sample_id"])  # "person" is kept unless excluded
    assert len(samples) + len(exclusions) == 2 * len(ROWS)


def test_url_not_in_downloads_table_is_excluded(tmp_path):
    _write_csv(tmp_path / "svo_probes.csv", ROWS[:1])
    downloads = pd.DataFrame(columns=list(DOWNLOAD_COLUMNS))
    samples, pool, exclusions = read_svo_probes(tmp_path / "svo_probes.csv", downloads, dataset="svo")
    assert samples.empty and pool.empty
    assert (
        exclusions["reason"].tolist()
        == [f"svo_probes.csv line 2: positive image not downloaded: {U}1.jpg is not in the downloads table"] * 2
    )


def test_tables_are_byte_identical_on_rerun(read, tmp_path):
    for i in range(2):
        samples, pool, exclusions = read(exclude_words=["person"])
        write_table(samples, tmp_path / f"samples{i}.parquet", SAMPLE_COLUMNS)
        write_table(pool, tmp_path / f"pool{i}.parquet", IMAGE_POOL_COLUMNS)
        write_table(exclusions, tmp_path / f"exclusions{i}.parquet", EXCLUSION_COLUMNS)
    for name in ("samples", "pool", "exclusions"):
        assert (tmp_path / f"{name}0.parquet").read_bytes() == (tmp_path / f"{name}1.parquet").read_bytes()


def test_missing_columns_name_the_file(tmp_path):
    path = tmp_path / "svo_probes.csv"
    pd.DataFrame([ROWS[0][:-1]], columns=list(CSV_COLUMNS[:-1])).to_csv(path, index=False)
    with pytest.raises(TableError, match=r"svo_probes.csv: missing column\(s\) \['neg_image_id'\]"):
        read_svo_probes(path, pd.DataFrame(columns=list(DOWNLOAD_COLUMNS)))


def test_given_distractor_is_used_by_the_distractor_stage(read):
    samples, _, _ = read()
    words = sorted(set(samples["answer"]) | set(samples["distractor_given"]))
    kv = KeyedVectors(vector_size=2)
    kv.add_vectors(words, np.random.default_rng(0).normal(size=(len(words), 2)).astype(np.float32))
    distractors, _, exclusions = choose_distractors(samples, {}, {}, {}, kv, 0.9, [], seed=0)
    assert exclusions.empty
    assert distractors["distractor"].tolist() == samples["distractor_given"].tolist()


@pytest.mark.parametrize(
    "verb, expected",
    [
        ("cross", "crossing"),
        ("ride", "riding"),
        ("sit", "sitting"),
        ("swim", "swimming"),
        ("lie", "lying"),
        ("see", "seeing"),
        ("eat", "eating"),
        ("play", "playing"),
        ("open", "opening"),
        ("fix", "fixing"),
        ("jump over", "jumping over"),
        ("sing", "singing"),
        ("begin", "beginning"),
        ("dance", "dancing"),
    ],
)
def test_gerund(verb, expected):
    assert gerund(verb) == expected


def test_triplet_forms():
    assert parse_triplet(" child , cross , street ", "pos_triplet").text() == "child,cross,street"
    assert parse_triplet("['child,cross,street']", "pos_triplet").text() == "child,cross,street"
    for bad in ("['[]']", "a,b", "a,,c", "[unclosed"):
        with pytest.raises(ValueError, match="is not 'subject,verb,object'"):
            parse_triplet(bad, "pos_triplet")
