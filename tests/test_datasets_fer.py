"""Facial expressions reader: FER-2013's fer2013.csv and the images/<split>/<emotion>/ folder layout."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from notice.data.facial_expressions import (
    EMOTION_GROUPS,
    EMOTIONS,
    QUESTION_TEMPLATE,
    read_facial_expressions,
)
from notice.files.tables import EXCLUSION_COLUMNS, IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, TableError, write_table


def _pixels(seed: int, n: int = 2304) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, n)))


def _fer_rows():
    """Two Training and one PublicTest face per emotion, then malformed rows 21-26."""
    rows = [
        [str(label), _pixels(10 * label + k), usage]
        for label in range(7)
        for k, usage in enumerate(("Training", "Training", "PublicTest"))
    ]
    rows += [
        ["3", _pixels(1, 2303), "Training"],  # 21
        ["3", "x7 " + _pixels(2, 2303), "Training"],  # 22
        ["3", "300 " + _pixels(3), "Training"],  # 23 (2305 values)
        ["9", _pixels(4), "Training"],  # 24
        ["happy", _pixels(5), "Training"],  # 25
        ["3", _pixels(6), ""],  # 26
        ["3", "999 " + _pixels(7, 2303), "PrivateTest"],  # 27: out of range
    ]
    return rows


@pytest.fixture
def fer_csv(tmp_path):
    path = tmp_path / "fer2013.csv"
    pd.DataFrame(_fer_rows(), columns=["emotion", "pixels", "Usage"]).to_csv(path, index=False)
    return path


def test_csv_samples_images_and_exclusions(fer_csv, tmp_path):
    out = tmp_path / "out"
    samples, pool, exclusions = read_facial_expressions(fer_csv, out, dataset="fer", seed=0)
    assert list(samples.columns) == list(SAMPLE_COLUMNS)
    assert len(samples) == 21 and len(samples) + len(exclusions) == len(_fer_rows())
    rows = _fer_rows()
    for row in samples.itertuples(index=False):
        index = int(row.image_id.removeprefix("row"))
        label, pixels, usage = rows[index]
        emotion = EMOTIONS[int(label)]
        assert (row.sample_id, row.task, row.subject, row.answer, row.category, row.group, row.pool_key) == (
            f"fer/row{index:05d}",
            "facial_expressions",
            "person",
            emotion,
            emotion,
            EMOTION_GROUPS[emotion],
            row.sample_id,
        )
        assert row.image_path == str(out / "images" / usage / f"{index:05d}.png")
        decoded = np.asarray(Image.open(row.image_path))
        assert decoded.shape == (48, 48)
        assert (decoded.ravel() == np.array(pixels.split(), dtype=int)).all()
    assert QUESTION_TEMPLATE.format(subject="person", a="happy", b="angry") == "Is this person feeling happy or angry?"

    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    assert reasons == {
        "fer/row00021": "fer2013.csv line 23: 2303 pixel values, expected 2304",
        "fer/row00022": "fer2013.csv line 24: pixel values are not all integers",
        "fer/row00023": "fer2013.csv line 25: 2305 pixel values, expected 2304",
        "fer/row00024": "fer2013.csv line 26: emotion '9' is not an integer 0-6",
        "fer/row00025": "fer2013.csv line 27: emotion 'happy' is not an integer 0-6",
        "fer/row00026": "fer2013.csv line 28: Usage (split) is empty",
        "fer/row00027": "fer2013.csv line 29: pixel values outside 0-255 (min 0, max 999)",
    }
    assert set(exclusions["stage"]) == {"read:fer"} and list(exclusions.columns) == list(EXCLUSION_COLUMNS)


def test_pool_has_every_other_emotion_from_the_same_split(fer_csv, tmp_path):
    samples, pool, _ = read_facial_expressions(fer_csv, tmp_path / "out", dataset="fer", seed=0)
    assert list(pool.columns) == list(IMAGE_POOL_COLUMNS)
    emotion_of = dict(zip(samples["image_path"], samples["answer"]))
    split_of = {path: path.split("/")[-2] for path in samples["image_path"]}
    assert not pool.duplicated(["pool_key", "value"]).any()
    for sample in samples.itertuples(index=False):
        rows = pool[pool["pool_key"] == sample.sample_id]
        assert sorted(rows["value"]) == sorted(set(EMOTIONS) - {sample.answer})
        for entry in rows.itertuples(index=False):
            assert emotion_of[entry.image_path] == entry.value
            assert split_of[entry.image_path] == split_of[sample.image_path]


def test_splits_groups_and_determinism(fer_csv, tmp_path):
    samples, pool, exclusions = read_facial_expressions(
        fer_csv, tmp_path / "out", dataset="fer", splits=["Training"], groups={"happy": "positive", "sad": "negative"}
    )
    assert sorted(set(samples["answer"])) == ["happy", "sad"] and len(samples) == 4
    reasons = set(exclusions["reason"])
    assert "fer2013.csv line 4: split 'PublicTest' is not in the configured splits ['Training']" in reasons
    assert "fer2013.csv line 2: emotion 'angry' is not in any configured group" in reasons
    assert sorted(set(pool["value"])) == ["happy", "sad"]

    for i in range(2):
        tables = read_facial_expressions(fer_csv, tmp_path / f"out{i}", dataset="fer", seed=3)
        for name, table, columns in zip("spe", tables, (SAMPLE_COLUMNS, IMAGE_POOL_COLUMNS, EXCLUSION_COLUMNS)):
            write_table(
                table.replace(str(tmp_path / f"out{i}"), "OUT", regex=True), tmp_path / f"{name}{i}.parquet", columns
            )
    for name in "spe":
        assert (tmp_path / f"{name}0.parquet").read_bytes() == (tmp_path / f"{name}1.parquet").read_bytes()
    first = (tmp_path / "out0" / "images" / "Training" / "00000.png").read_bytes()
    assert first == (tmp_path / "out1" / "images" / "Training" / "00000.png").read_bytes()
    pools = [
        read_facial_expressions(fer_csv, tmp_path / "o", dataset="fer", seed=s)[1]["image_path"].tolist()
        for s in (3, 4)
    ]
    assert pools[0] != pools[1]


def test_csv_header_with_spaces_and_missing_column(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion, pixels, Usage\n3," + _pixels(0) + ",Training\n")
    samples, _, _ = read_facial_expressions(path, tmp_path / "out", dataset="fer")
    assert samples["answer"].tolist() == ["happy"]
    path.write_text("emotion,pixels\n3," + _pixels(0) + "\n")
    with pytest.raises(TableError, match=r"fer2013.csv: missing column\(s\) \['Usage'\]"):
        read_facial_expressions(path, tmp_path / "out", dataset="fer")


def test_folder_layout(tmp_path):
    images = tmp_path / "faces" / "images"
    for split in ("train", "validation"):
        for folder in ("angry", "happy", "Surprise", "contempt"):
            (images / split / folder).mkdir(parents=True)
            for i in range(2):
                array = np.random.default_rng(i).integers(0, 256, (48, 48), dtype=np.uint8)
                Image.fromarray(array).save(images / split / folder / f"im{i}.jpg")
    (images / "train" / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (images / "train" / "happy" / "list.csv").write_text("x")
    samples, pool, exclusions = read_facial_expressions(tmp_path / "faces", tmp_path / "unused", dataset="fer")
    assert len(samples) == 12 and len(samples) + len(exclusions) == 18
    row = samples.loc[samples["sample_id"] == "fer/train/Surprise/im1.jpg"].iloc[0]
    assert (row.image_id, row.answer, row.group, row.image_path) == (
        "train/Surprise/im1.jpg",
        "surprised",
        "positive",
        str(images / "train" / "Surprise" / "im1.jpg"),
    )
    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    assert reasons["fer/validation/contempt/im0.jpg"] == "folder 'contempt' is not a FER-2013 emotion"
    assert reasons["fer/train/happy/list.csv"] == "list.csv: not an image file"
    assert reasons["fer/train/happy/broken.jpg"].startswith("broken.jpg: ")
    for sample in samples.itertuples(index=False):
        rows = pool[pool["pool_key"] == sample.sample_id]
        assert sorted(rows["value"]) == sorted({"angry", "happy", "surprised"} - {sample.answer})
        assert all(path.split("/")[-3] == sample.image_id.split("/")[0] for path in rows["image_path"])
    assert not (tmp_path / "unused").exists()


def test_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a fer2013.csv file nor a directory"):
        read_facial_expressions(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"empty: no split folders; expected .*/empty/<split>/<emotion>/\*\.jpg "
        r"or .*/empty/images/<split>/<emotion>/\*\.jpg",
    ):
        read_facial_expressions(tmp_path / "empty", tmp_path / "out")
