"""Review issue 16: the readers on the datasets as published, with what users' copies really contain.

SVO-Probes CSV with a byte-order mark, CRLF line ends and True/False flags; MIT-States
``release_dataset/images/`` with ``adj <noun>`` folders, ``.JPG`` files, zero-byte and hidden files;
FER-2013 as ``fer2013.csv``, as Kaggle's ``icml_face_data.csv`` and as both folder layouts. Every file
or row a reader does not use is an exclusion with its reason; CSV reasons name the file line (1 = header).
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from notice.data.download import DOWNLOAD_COLUMNS
from notice.data.facial_expressions import read_facial_expressions
from notice.data.mit_states import read_mit_states
from notice.data.svo_probes import CSV_COLUMNS, image_urls, read_svo_probes
from notice.files.tables import TableError

U = "https://example.org/svo/"


# -- SVO-Probes ---------------------------------------------------------------------------------------------
def svo_line(index: int, pos: str, neg: str, flags: str) -> str:
    return f'"A scene, number {index}.",{pos},{neg},{flags},{U}{index}p.jpg,{U}{index}n.jpg,{index}p,{index}n'


def write_svo(path: Path, lines: list[str]) -> Path:
    """The CSV as published: UTF-8 with a byte-order mark, CRLF line ends, quoted sentences."""
    text = "\r\n".join([",".join(CSV_COLUMNS), *lines]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    return path


SVO_LINES = [  # file lines 2-7
    svo_line(0, '"child,cross,street"', '"lady,cross,street"', "True,False,False"),
    svo_line(1, '"man,ride,horse"', '"man,feed,horse"', "False,True,False"),
    svo_line(2, "dog,swim,lake", "dog,walk,lake", "False,True,False"),  # unquoted triplets: 14 fields
    svo_line(3, '"dog,sit,grass"', '"cat,sit,grass"', 'True,False,"False"x'),  # bad quoting
    svo_line(4, '"dog,run,beach"', '"dog,run,park"', "False,False,True") + ",extra",  # 11 fields
    svo_line(5, '"girl,eat,apple"', '"girl,eat,cake"', "False,False,True"),
]


def downloads_for(csv_path: Path, cache: Path) -> pd.DataFrame:
    cache.mkdir(exist_ok=True)
    rows = []
    for k, url in enumerate(image_urls(csv_path)):
        path = cache / f"{k}.png"
        Image.fromarray(np.full((4, 4, 3), k, dtype=np.uint8)).save(path)
        rows.append(dict(url=url, ok=True, path=str(path), sha256="x", reason="", attempts=1, cached=False))
    return pd.DataFrame(rows, columns=list(DOWNLOAD_COLUMNS))


def test_svo_published_csv_with_bom_crlf_and_malformed_rows(tmp_path):
    path = write_svo(tmp_path / "svo_probes.csv", SVO_LINES)
    urls = image_urls(path)
    assert urls == sorted(f"{U}{i}{side}.jpg" for i in (0, 1, 5) for side in "pn")  # parsed rows only
    samples, pool, exclusions = read_svo_probes(path, downloads_for(path, tmp_path / "cache"), dataset="svo")
    assert samples["sample_id"].tolist() == [f"svo_r00000{i}_{side}" for i in (0, 1, 5) for side in ("pos", "neg")]
    assert samples["task"].tolist() == ["svo_subject"] * 2 + ["svo_verb"] * 2 + ["svo_object"] * 2
    assert samples["answer"].tolist()[:4] == ["child", "lady", "riding", "feeding"]
    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    for side in ("pos", "neg"):
        assert reasons[f"svo_r000002_{side}"] == "svo_probes.csv line 4: 14 fields, expected 10 like the header"
        assert reasons[f"svo_r000003_{side}"] == (
            "svo_probes.csv line 5: cannot parse the line (',' expected after '\"')"
        )
        assert reasons[f"svo_r000004_{side}"] == "svo_probes.csv line 6: 11 fields, expected 10 like the header"
    assert len(samples) + len(exclusions) == 2 * len(SVO_LINES)
    assert len(pool) == len(samples)

    # max_rows counts malformed rows too: the first 3 data rows are lines 2-4.
    samples, _, exclusions = read_svo_probes(path, downloads_for(path, tmp_path / "cache"), dataset="svo", max_rows=3)
    assert len(samples) == 4 and len(exclusions) == 2


def test_svo_multiline_sentence_keeps_line_numbers(tmp_path):
    lines = [
        svo_line(0, '"child,cross,street"', '"lady,cross,street"', "True,False,False").replace(
            "A scene,", "A scene\r\non two lines,"
        ),
        svo_line(1, "dog,swim,lake", "dog,walk,lake", "False,True,False"),
    ]
    path = write_svo(tmp_path / "svo_probes.csv", lines)
    samples, _, exclusions = read_svo_probes(path, downloads_for(path, tmp_path / "cache"), dataset="svo")
    assert len(samples) == 2
    assert set(exclusions["reason"]) == {"svo_probes.csv line 4: 14 fields, expected 10 like the header"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "svo_probes.csv: cannot parse as CSV: empty file (expected a header line with columns ['sentence', "),
        (
            b"sentence,pos_triplet,neg_triplet,subj_neg,verb_neg,obj_neg,pos_url,neg_url,pos_image_id,neg_image_id\n"
            b'"unclosed,a,b,True,False,False,u,v,1,2\nx,y\n',
            "svo_probes.csv: cannot parse as CSV: the quoted field opened on line 2 is never closed "
            "(unexpected end of file)",
        ),
        (
            b"sentence,pos_triplet\n\xff\xfe,x\n",
            "svo_probes.csv: cannot parse as CSV: not UTF-8 text (byte b'\\xff': invalid start byte, "
            "at or after line 1); save it as UTF-8",
        ),
    ],
)
def test_svo_file_that_cannot_be_parsed_names_the_file(tmp_path, content, message):
    path = tmp_path / "svo_probes.csv"
    path.write_bytes(content)
    with pytest.raises(TableError) as caught:
        read_svo_probes(path, pd.DataFrame(columns=list(DOWNLOAD_COLUMNS)))
    assert str(caught.value).startswith(f"{path.parent}/{message}") and "\n" not in str(caught.value)


# -- MIT-States ---------------------------------------------------------------------------------------------
def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_mit_states_release_layout(tmp_path):
    images = tmp_path / "release_dataset" / "images"
    files = {
        "ancient building/ancient_building_1.JPG": jpeg_bytes(1),
        "ancient building/ancient_building_2.jpg": jpeg_bytes(2),
        "new building/new_building_1.JPG": jpeg_bytes(3),
        "new building/new_building_2.JPG": b"",  # zero bytes
        "new building/._new_building_1.JPG": b"\0\5\26\7",  # macOS AppleDouble
        "new building/.DS_Store": b"\0",
        "adj building/adj_building_1.JPG": jpeg_bytes(4),
        "ancient building/thumbs/ancient_building_1.JPG": jpeg_bytes(5),
        ".cache/ancient building/x.JPG": jpeg_bytes(6),
    }
    for name, data in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    samples, pool, exclusions = read_mit_states(tmp_path / "release_dataset", dataset="mit")
    assert samples["image_id"].tolist() == [
        "ancient building/ancient_building_1.JPG",
        "ancient building/ancient_building_2.jpg",
        "new building/new_building_1.JPG",
    ]
    assert dict(zip(exclusions["sample_id"], exclusions["reason"])) == {
        "mit/.cache/ancient building/x.JPG": "inside hidden folder '.cache', not read",
        "mit/adj building/adj_building_1.JPG": "folder 'adj building': image of the noun without a state label",
        "mit/ancient building/thumbs/ancient_building_1.JPG": (
            "in nested sub-folder 'thumbs'; images are read only directly inside an '<adjective> <noun>' folder"
        ),
        "mit/new building/._new_building_1.JPG": (
            "._new_building_1.JPG: hidden file (name starts with '.'), not read as an image"
        ),
        "mit/new building/.DS_Store": ".DS_Store: hidden file (name starts with '.'), not read as an image",
        "mit/new building/new_building_2.JPG": "new_building_2.JPG: empty file (0 bytes)",
    }
    assert len(samples) + len(exclusions) == len(files)
    assert pool[["pool_key", "value"]].values.tolist() == [["building", "ancient"], ["building", "new"]]


# -- FER-2013 -----------------------------------------------------------------------------------------------
def pixels(seed: int, n: int = 48 * 48) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, n)))


FER_ROWS = [
    ("0", pixels(0), "Training"),
    ("3", pixels(1), "Training"),
    ("3", pixels(2), "PublicTest"),
    ("6", pixels(3), "PrivateTest"),
]


def write_fer2013(path: Path, rows=FER_ROWS) -> Path:
    """fer2013.csv as published: `emotion,pixels,Usage`, LF line ends."""
    path.write_text("emotion,pixels,Usage\n" + "".join(f"{e},{p},{u}\n" for e, p, u in rows))
    return path


def write_icml(path: Path, rows=FER_ROWS) -> Path:
    """Kaggle's icml_face_data.csv: `emotion, Usage, pixels` (leading spaces in the header names)."""
    path.write_text("emotion, Usage, pixels\n" + "".join(f"{e},{u},{p}\n" for e, p, u in rows))
    return path


def test_fer2013_and_icml_variant_give_the_same_samples(tmp_path):
    tables = [
        read_facial_expressions(write(tmp_path / name), tmp_path / name.split(".")[0], dataset="fer")
        for name, write in (("fer2013.csv", write_fer2013), ("icml_face_data.csv", write_icml))
    ]
    (first, _, none), (second, _, none_either) = tables
    assert none.empty and none_either.empty
    assert first["answer"].tolist() == second["answer"].tolist() == ["angry", "happy", "happy", "neutral"]
    for a, b in zip(first["image_path"], second["image_path"]):
        assert (np.asarray(Image.open(a)) == np.asarray(Image.open(b))).all()
    assert Path(second["image_path"][2]).parts[-3:] == ("images", "PublicTest", "00002.png")


def test_fer_csv_malformed_rows_are_excluded_with_file_and_line(tmp_path):
    path = write_icml(tmp_path / "icml_face_data.csv")
    with open(path, "a") as stream:
        stream.write(f"3,Training,{pixels(4)},surplus\n")  # line 6: 4 fields
        stream.write("\n")  # line 7: blank, not a record
        stream.write(f'3,"Train"ing,{pixels(5)}\n')  # line 8: bad quoting
        stream.write(f"2,Training,{pixels(6)}\n")  # line 9: fine
    samples, _, exclusions = read_facial_expressions(path, tmp_path / "out", dataset="fer")
    assert samples["sample_id"].tolist() == [f"fer/row{i:05d}" for i in (0, 1, 2, 3, 6)]
    assert dict(zip(exclusions["sample_id"], exclusions["reason"])) == {
        "fer/row00004": "icml_face_data.csv line 6: 4 fields, expected 3 like the header",
        "fer/row00005": "icml_face_data.csv line 8: cannot parse the line (',' expected after '\"')",
    }


def test_fer_csv_that_cannot_be_parsed_names_the_file(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_text("")
    with pytest.raises(TableError) as caught:
        read_facial_expressions(path, tmp_path / "out")
    assert str(caught.value) == (
        f"{path}: cannot parse as CSV: empty file (expected a header line with columns ['emotion', 'pixels', 'Usage'])"
    )
    path.write_text("emotion,pixels,Usage\n")  # header only: read, no samples (the reader script stops on it)
    samples, pool, exclusions = read_facial_expressions(path, tmp_path / "out")
    assert samples.empty and pool.empty and exclusions.empty


def write_face_folders(root: Path, splits=("train", "test")) -> Path:
    for s, split in enumerate(splits):
        for e, emotion in enumerate(("angry", "happy", "neutral")):
            folder = root / split / emotion
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(
                    np.random.default_rng(100 * s + 10 * e + k).integers(0, 256, (48, 48), dtype=np.uint8)
                ).save(folder / f"im{k}.jpg")
    (root / splits[0] / "happy" / ".DS_Store").write_bytes(b"\0")
    (root / splits[0] / "happy" / "extra").mkdir()
    happy = root / splits[0] / "happy"
    (happy / "extra" / "im9.jpg").write_bytes((happy / "im0.jpg").read_bytes())
    (root / splits[0] / "notes.txt").write_text("x")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "im0.jpg").write_text("x")
    return root


FOLDER_REASONS = {
    "train/happy/.DS_Store": ".DS_Store: hidden file (name starts with '.'), not read as an image",
    "train/happy/extra/im9.jpg": (
        "in nested sub-folder 'extra'; images are read only directly inside a '<split>/<emotion>/' folder"
    ),
    "train/notes.txt": "file outside a '<split>/<emotion>/' folder",
    ".ipynb_checkpoints/im0.jpg": "inside hidden folder '.ipynb_checkpoints', not read",
}


@pytest.mark.parametrize("under_images", [False, True])
def test_fer_folder_copies_with_or_without_images_folder(tmp_path, under_images):
    root = tmp_path / "fer"
    write_face_folders(root / "images" if under_images else root)
    (root / "README.txt").write_text("from Kaggle")  # beside the split folders or beside images/
    base = root / "images" if under_images else root
    samples, pool, exclusions = read_facial_expressions(root, tmp_path / "unused", dataset="fer")
    assert len(samples) == 12 and samples["image_path"].str.startswith(str(base)).all()
    assert sorted(set(samples["image_id"].str.split("/").str[0])) == ["test", "train"]
    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    expected = {f"fer/{name}": reason for name, reason in FOLDER_REASONS.items()}
    if not under_images:  # with images/, files beside it are not part of the tree read
        expected["fer/README.txt"] = "file outside a '<split>/<emotion>/' folder"
    assert reasons == expected
    for sample in samples.itertuples(index=False):  # corrupt faces come from the sample's own split
        assert all(
            Path(p).relative_to(base).parts[0] == sample.image_id.split("/")[0]
            for p in pool.loc[pool["pool_key"] == sample.sample_id, "image_path"]
        )

    samples, _, exclusions = read_facial_expressions(root, tmp_path / "unused", dataset="fer", splits=["test"])
    assert len(samples) == 6 and set(samples["image_id"].str.split("/").str[0]) == {"test"}
    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    assert reasons["fer/train/angry/im0.jpg"] == "split 'train' is not in the configured splits ['test']"
    assert len(samples) + len(exclusions) == 12 + len(expected)
