"""MIT-States reader: the release's images/<adjective> <noun>/ tree."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from notice.data.mit_states import _GROUP_LISTS, QUESTION_TEMPLATE, STATE_GROUPS, read_mit_states
from notice.files.tables import EXCLUSION_COLUMNS, IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, write_table

# folder -> number of good JPEGs
FOLDERS = {
    "ancient building": 3,
    "new building": 4,
    "modern building": 2,
    "adj building": 2,
    "wet_road": 2,
    "broken glass": 1,
    "cracked glass": 5,
    "nospace": 1,
}


def _jpeg(path, seed):
    array = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="JPEG")


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "release" / "images"
    for f, (folder, n) in enumerate(FOLDERS.items()):
        (images / folder).mkdir(parents=True)
        for i in range(n):
            _jpeg(images / folder / f"{folder.replace(' ', '_')}_{i}.jpg", 100 * f + i)
    data = (images / "broken glass" / "broken_glass_0.jpg").read_bytes()
    (images / "broken glass" / "broken_glass_9.jpg").write_bytes(data[: len(data) // 2])
    (images / "new building" / "notes.txt").write_text("not an image")
    (images / "new building" / ".DS_Store").write_bytes(b"\0")  # hidden: excluded, not a sample
    (images / "README").write_text("stray file")
    return tmp_path / "release"


def test_samples_pool_and_exclusions(root):
    samples, pool, exclusions = read_mit_states(root, dataset="mit", seed=0)
    assert list(samples.columns) == list(SAMPLE_COLUMNS)
    assert list(pool.columns) == list(IMAGE_POOL_COLUMNS)
    assert list(exclusions.columns) == list(EXCLUSION_COLUMNS) and set(exclusions["stage"]) == {"read:mit"}

    kept = {"ancient building": 3, "new building": 4, "wet_road": 2, "broken glass": 1, "cracked glass": 5}
    assert samples.groupby(samples["image_id"].str.split("/").str[0]).size().to_dict() == kept
    row = samples.loc[samples["sample_id"] == "mit/ancient building/ancient_building_1.jpg"].iloc[0]
    assert (row.task, row.image_id, row.subject, row.answer, row.category, row.group, row.pool_key, row.mask_path) == (
        "mit_states",
        "ancient building/ancient_building_1.jpg",
        "building",
        "ancient",
        "colour",
        "colour",
        "building",
        "",
    )
    assert row.image_path == str(root / "images" / "ancient building" / "ancient_building_1.jpg")
    assert QUESTION_TEMPLATE.format(subject=row.subject, a="ancient", b="new") == "Is this building ancient or new?"
    wet = samples.loc[samples["answer"] == "wet"].iloc[0]
    assert (wet.subject, wet.pool_key, wet.category) == ("road", "road", "colour")  # underscore layout
    assert set(samples.loc[samples["subject"] == "glass", "category"]) == {"shape"}

    # One pool image per (noun, state), taken from that state's folder.
    assert pool[["pool_key", "value"]].values.tolist() == [
        ["building", "ancient"],
        ["building", "new"],
        ["glass", "broken"],
        ["glass", "cracked"],
        ["road", "wet"],
    ]
    for entry in pool.itertuples(index=False):
        assert (
            f"/{entry.value} {entry.pool_key}/" in entry.image_path
            or f"/{entry.value}_{entry.pool_key}/" in entry.image_path
        )

    reasons = dict(zip(exclusions["sample_id"], exclusions["reason"]))
    assert reasons["mit/modern building/modern_building_0.jpg"] == "state 'modern' is not in any configured group"
    assert reasons["mit/adj building/adj_building_1.jpg"] == (
        "folder 'adj building': image of the noun without a state label"
    )
    assert reasons["mit/nospace/nospace_0.jpg"] == "folder 'nospace' is not '<adjective> <noun>'"
    assert reasons["mit/new building/notes.txt"] == "notes.txt: not an image file (expected .jpeg, .jpg, .png)"
    assert reasons["mit/broken glass/broken_glass_9.jpg"].startswith("broken_glass_9.jpg: cannot decode image (")
    assert "truncated" in reasons["mit/broken glass/broken_glass_9.jpg"].lower()
    assert reasons["mit/README"] == "file outside an '<adjective> <noun>' folder"
    assert reasons["mit/new building/.DS_Store"] == (
        ".DS_Store: hidden file (name starts with '.'), not read as an image"
    )
    files_read = sum(FOLDERS.values()) + 4  # + truncated jpg, notes.txt, README, .DS_Store
    assert len(samples) + len(exclusions) == files_read


def test_configured_groups_decide_what_is_kept(root):
    samples, _, exclusions = read_mit_states(root, dataset="mit", groups={"modern": "style", "ancient": "style"})
    assert sorted(set(samples["answer"])) == ["ancient", "modern"]
    assert set(samples["category"]) == {"style"}
    assert (exclusions["reason"] == "state 'new' is not in any configured group").sum() == 5  # 4 jpgs, notes.txt


def test_deterministic_and_seeded_pool(root, tmp_path):
    paths = []
    for i, seed in enumerate((0, 0)):
        samples, pool, exclusions = read_mit_states(root, dataset="mit", seed=seed)
        write_table(samples, tmp_path / f"s{i}.parquet", SAMPLE_COLUMNS)
        write_table(pool, tmp_path / f"p{i}.parquet", IMAGE_POOL_COLUMNS)
        write_table(exclusions, tmp_path / f"e{i}.parquet", EXCLUSION_COLUMNS)
        paths.append(pool["image_path"].tolist())
    for name in "spe":
        assert (tmp_path / f"{name}0.parquet").read_bytes() == (tmp_path / f"{name}1.parquet").read_bytes()
    others = [read_mit_states(root, dataset="mit", seed=seed)[1]["image_path"].tolist() for seed in range(1, 6)]
    assert any(other != paths[0] for other in others)


def test_missing_images_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no images/ directory.*<adjective> <noun>/\*\.jpg"):
        read_mit_states(tmp_path)


def test_paper_groups_are_disjoint_and_the_paper_config_lists_the_authors_synonyms():
    assert len(STATE_GROUPS) == sum(len(states) for states in _GROUP_LISTS.values())  # no state in two groups
    assert set(STATE_GROUPS.values()) == {"colour", "shape", "texture"}
    assert STATE_GROUPS["huge"] == STATE_GROUPS["large"] == "shape"
    paper = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/paper.yaml").read_text())
    synonyms = paper["datasets"]["mit_states"]["distractors"]["near_synonyms"]
    assert any({"huge", "large"} <= set(words) for words in synonyms)
