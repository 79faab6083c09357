import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from notice.data.synthetic import (
    COLOURS,
    SHAPES,
    TASK_VALUES,
    VALUE_GROUPS,
    draw_question,
    generate_dataset,
    make_question,
    render_array,
    render_scene,
    sample_scene,
    sample_training_batch,
    shape_mask,
    stream_rng,
)
from notice.files.tables import IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, read_table


def _scenes(n: int = 20, seed: int = 0):
    return [sample_scene(stream_rng(seed, "dataset", i), f"s{i}") for i in range(n)]


def test_colour_variants_differ_exactly_on_the_mask():
    for scene in _scenes():
        img, mask = render_array(scene)
        assert mask.any()
        assert (img[mask] == COLOURS[scene.colour]).all()
        for colour in COLOURS:
            if colour == scene.colour:
                continue
            other, other_mask = render_array(scene, colour=colour)
            assert np.array_equal(other_mask, mask)
            changed = (other != img).any(-1)
            assert np.array_equal(changed, mask)
            assert (other[mask] == COLOURS[colour]).all()


def test_shape_variants_differ_only_inside_the_mask_union():
    for scene in _scenes():
        img, mask = render_array(scene)
        for shape in SHAPES:
            if shape == scene.shape:
                continue
            other, other_mask = render_array(scene, shape=shape)
            assert not np.array_equal(other_mask, mask)
            changed = (other != img).any(-1)
            # Everything in the symmetric difference changes, nothing outside the union does.
            assert np.array_equal(changed, mask ^ other_mask)
            assert (other[other_mask] == COLOURS[scene.colour]).all()


def test_masks_are_exactly_the_object_colour_pixels():
    # Nothing else in the image (background, clutter) has an object colour.
    for scene in _scenes():
        img, mask = render_array(scene)
        object_coloured = np.zeros(mask.shape, dtype=bool)
        for rgb in COLOURS.values():
            object_coloured |= (img == rgb).all(-1)
        assert np.array_equal(object_coloured, mask)


def test_shapes_have_comparable_area_and_stay_inside_the_image():
    areas = {s: shape_mask(s, (32.0, 32.0), 10.0, 64).sum() for s in SHAPES}
    assert max(areas.values()) / min(areas.values()) < 2.0
    for scene in _scenes(50):
        for shape in SHAPES:
            m = shape_mask(shape, scene.center, scene.radius, scene.image_size)
            assert 0.02 < m.mean() < 0.2
            # No object pixel on the image border: the whole object is visible.
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_clutter_never_touches_any_possible_object_and_render_scene_returns_pil():
    for scene in _scenes():
        image, mask = render_scene(scene, colour="blue")
        assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
        assert mask.dtype == bool and mask.shape == (64, 64)
        img = render_array(scene)[0]
        clutter = (img != render_array(dataclasses.replace(scene, clutter=()))[0]).any(-1)
        assert clutter.any()
        union = np.zeros(mask.shape, dtype=bool)
        for shape in SHAPES:
            union |= shape_mask(shape, scene.center, scene.radius, scene.image_size)
        assert not (clutter & union).any()


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    samples, pool = generate_dataset(out, n_scenes=12, seed=3)
    return out, samples, pool


def test_dataset_is_byte_identical_on_rerun_with_paths_as_given(tmp_path, monkeypatch):
    digests = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        samples, pool = generate_dataset("data", n_scenes=6, seed=seed)
        # Paths are stored as built from out_dir, here relative to the working directory.
        assert samples.image_path.str.startswith("data/images/").all()
        assert pool.image_path.str.startswith("data/").all() and Path(pool.image_path[1]).is_file()
        digests.append(_digest(tmp_path / run / "data"))
    assert digests[0] == digests[1]
    assert all(digests[0][k] != digests[2][k] for k in digests[0] if k.startswith("images/"))


def test_samples_table(dataset):
    out, samples, _ = dataset
    on_disk = read_table(out / "samples.parquet", SAMPLE_COLUMNS)
    pd.testing.assert_frame_equal(on_disk, samples)
    assert list(samples.columns) == list(SAMPLE_COLUMNS)
    assert len(samples) == 12 * len(TASK_VALUES) and samples.sample_id.is_unique
    for row in samples.itertuples():
        assert row.answer in TASK_VALUES[row.task] and row.category == row.answer
        assert row.group == VALUE_GROUPS[row.answer]
        assert row.pool_key == f"{row.image_id}_{row.task}"
        assert row.image_path.startswith(str(out))
        img = np.asarray(Image.open(row.image_path))
        mask = np.asarray(Image.open(row.mask_path))
        assert set(np.unique(mask)) <= {0, 255}
        if row.task == "colour":
            assert (img[mask == 255] == COLOURS[row.answer]).all()


def test_pool_has_every_value_and_true_minimal_pairs(dataset):
    out, samples, pool = dataset
    pd.testing.assert_frame_equal(read_table(out / "image_pool.parquet", IMAGE_POOL_COLUMNS), pool)
    for row in samples.itertuples():
        rows = pool[pool.pool_key == row.pool_key]
        assert sorted(rows.value) == sorted(TASK_VALUES[row.task])
        clean = np.asarray(Image.open(row.image_path))
        clean_mask = np.asarray(Image.open(row.mask_path)) == 255
        for v in rows.itertuples():
            img = np.asarray(Image.open(v.image_path))
            mask = np.asarray(Image.open(v.mask_path)) == 255
            changed = (img != clean).any(-1)
            if v.value == row.answer:
                assert not changed.any()
            elif row.task == "colour":
                assert np.array_equal(mask, clean_mask) and np.array_equal(changed, clean_mask)
                assert (img[mask] == COLOURS[v.value]).all()
            else:
                assert np.array_equal(changed, mask ^ clean_mask)


def test_training_stream_is_disjoint_from_the_dataset_and_seeded():
    batch = sample_training_batch(stream_rng(3, "train"), 16, shape_fraction=0.75)
    again = sample_training_batch(stream_rng(3, "train"), 16, shape_fraction=0.75)
    assert all(np.array_equal(a.image, b.image) and a.question == b.question for a, b in zip(batch, again))
    dataset_centers = {sample_scene(stream_rng(3, "dataset", i), "x").center for i in range(200)}
    assert not dataset_centers & {ex.scene.center for ex in batch}
    for ex in batch:
        q = ex.question
        assert q.answer == getattr(ex.scene, q.task) and q.distractor != q.answer
        assert q.distractor in TASK_VALUES[q.task]
        first, second = (q.answer, q.distractor) if q.correct_first else (q.distractor, q.answer)
        assert q.text == make_question(q.task, first, second)


def test_question_draws_cover_tasks_orders_and_distractors():
    rng = stream_rng(0, "train")
    scene = _scenes(1)[0]
    qs = [draw_question(rng, scene, shape_fraction=0.75) for _ in range(2000)]
    shape_share = np.mean([q.task == "shape" for q in qs])
    assert 0.72 < shape_share < 0.78
    assert 0.45 < np.mean([q.correct_first for q in qs]) < 0.55
    for task in TASK_VALUES:
        answer = getattr(scene, task)
        assert {q.distractor for q in qs if q.task == task} == set(TASK_VALUES[task]) - {answer}
    assert make_question("colour", "red", "blue") == "is the object red or blue?"
    assert make_question("shape", "circle", "cross") == "is the object a circle or a cross?"


# -- a subset of the tasks and values ----------------------------------------------------------------------
def content_digest(samples: pd.DataFrame, pool: pd.DataFrame, out: Path) -> str:
    """sha256 of both tables (paths relative to `out`) and of the decoded pixels of every image and mask they
    name: what a later stage reads, whatever PNG encoder wrote the files."""
    digest = hashlib.sha256()
    for table in (samples, pool):
        rows = table.astype(str).apply(lambda column: column.str.replace(str(out), "", regex=False))
        digest.update(rows.to_csv(index=False).encode())
    for path in sorted(set(pool["image_path"]) | set(pool["mask_path"]) | set(samples["mask_path"])):
        digest.update(np.asarray(Image.open(path)).tobytes())
    return digest.hexdigest()


# content_digest of generate_dataset(out, 6, seed=3, dataset="demo") before subsets of tasks and values existed.
FULL_DATASET_DIGEST = "09eb591aa6a07ad7e8e29e7c0bc75013e30bf860aec7dddf3c37f589fbab25f4"


def test_every_task_and_value_gives_the_dataset_generated_before_subsets(tmp_path):
    every_value = {"shape": sorted(SHAPES), "colour": sorted(COLOURS)}  # as the rule passes them: sorted
    for name, task_values in (("default", None), ("all", every_value)):
        samples, pool = generate_dataset(tmp_path / name, 6, seed=3, dataset="demo", task_values=task_values)
        assert content_digest(samples, pool, tmp_path / name) == FULL_DATASET_DIGEST


def relative_paths(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    return table.assign(**{column: table[column].str.removeprefix(str(out)) for column in ("image_path", "mask_path")})


def test_one_task_keeps_the_full_datasets_scenes_and_rows(tmp_path):
    full = generate_dataset(tmp_path / "full", 8, seed=1)
    colour = generate_dataset(tmp_path / "colour", 8, seed=1, task_values={"colour": list(COLOURS)})
    for mine, everything in zip(colour, full):
        expected = everything[everything["task"] == "colour"].reset_index(drop=True)
        pd.testing.assert_frame_equal(
            relative_paths(mine, tmp_path / "colour"), relative_paths(expected, tmp_path / "full")
        )
    for path in colour[1]["image_path"]:
        same = str(path).replace(str(tmp_path / "colour"), str(tmp_path / "full"))
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(same)))


def test_a_subset_of_values_is_drawn_and_rendered_only(tmp_path):
    subset = ["triangle", "circle", "square"]  # in another order than the generator's
    samples, pool = generate_dataset(tmp_path / "a", 30, seed=2, task_values={"shape": subset})
    assert set(samples["task"]) == {"shape"} and len(samples) == 30
    assert set(samples["answer"]) == set(subset)  # 30 scenes draw every one of them
    for _, rows in pool.groupby("pool_key"):
        assert list(rows["value"]) == ["circle", "square", "triangle"]  # the generator's order
    for row in samples.itertuples():  # still true minimal pairs
        clean = np.asarray(Image.open(row.image_path))
        clean_mask = np.asarray(Image.open(row.mask_path)) == 255
        for v in pool[pool["pool_key"] == row.pool_key].itertuples():
            changed = (np.asarray(Image.open(v.image_path)) != clean).any(-1)
            assert np.array_equal(changed, (np.asarray(Image.open(v.mask_path)) == 255) ^ clean_mask)
    again = generate_dataset(tmp_path / "b", 30, seed=2, task_values={"shape": sorted(subset)})
    for first, second in zip((samples, pool), again):
        pd.testing.assert_frame_equal(relative_paths(first, tmp_path / "a"), relative_paths(second, tmp_path / "b"))


@pytest.mark.parametrize(
    "task_values, message",
    [
        ({}, "tasks: no task; the synthetic generator asks \\['colour', 'shape'\\], one or both"),
        ({"size": ["big", "small"]}, "tasks.size: the synthetic generator has no task 'size'"),
        ({"shape": ["circle", "hexagon"]}, "tasks.shape.values: \\['hexagon'\\] not known to the synthetic generator"),
        ({"colour": ["red", "red"]}, "tasks.colour.values: \\['red', 'red'\\] has fewer than two different values"),
    ],
)
def test_tasks_and_values_the_generator_cannot_make_are_named(tmp_path, task_values, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, 2, seed=0, task_values=task_values)
    assert not (tmp_path / "samples.parquet").exists()
