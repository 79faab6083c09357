"""Review issue 16 (1, 7): Snakemake's own plan reruns what changed, and only that.

(1) A folder dataset (MIT-States, a FER-2013 image-folder copy) reruns its reader when an image or a
state folder is added below it, which the folder's own mtime does not show; nothing reruns when nothing
changed. (7) Every leaf key of a small finished config, changed alone, changes the params of exactly the
rules whose scripts read it: the status "params changed" of their outputs in `snakemake --summary`.
(`--list-changes params` cannot tell: in Snakemake 9.27 it lists every output of the jobs in the DAG, as
ParamsChange.__or__ returns an empty change that still carries its files.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workflow_helpers import SYNTHETIC_TASKS, planned, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


def jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)


# -- (1) folder datasets -------------------------------------------------------------------------------------
MIT_GROUPS = {"old": "colour", "new": "colour", "small": "shape", "large": "shape"}
FER_GROUPS = {"happy": "positive", "sad": "negative", "angry": "negative"}
# dataset -> (kind, images relative to its root, the task's groups)
FOLDER_DATASETS = {
    "mit": (
        "mit_states",
        ["images/old building/a.jpg", "images/new building/a.jpg", "images/small apple/a.jpg"],
        MIT_GROUPS,
    ),
    "fer_plain": ("facial_expressions", ["train/happy/a.jpg", "train/sad/a.jpg"], FER_GROUPS),  # <split>/<emotion>
    "fer_images": ("facial_expressions", ["images/train/happy/a.jpg", "images/train/sad/a.jpg"], FER_GROUPS),
}
READ_RULE = {"mit_states": "read_dataset_mit_states", "facial_expressions": "read_dataset_facial_expressions"}


def folder_config(root: Path) -> dict:
    datasets = {
        name: {
            "kind": kind,
            "path": str(root / name),
            "tasks": {kind: {"question": "Is this {subject} {a} or {b}?", "values": sorted(groups), "groups": groups}},
        }
        for name, (kind, _, groups) in FOLDER_DATASETS.items()
    }
    return {
        "seed": 0,
        "datasets": datasets,  # the model is never trained: only the readers are targeted
        "models": {"toy_blip": {"train": {"family": "blip", "dataset": "mit"}}},
        "corruptions": {"sip": {}},
        "selection": {"n_per_task": 1},
        "patching": {},
        "analysis": {},
    }


READ_TARGETS = [f"resources/datasets/{name}/samples.parquet" for name in FOLDER_DATASETS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A workdir whose three folder datasets have been read."""
    work = tmp_path_factory.mktemp("folders")
    for n, (name, (_, images, _)) in enumerate(FOLDER_DATASETS.items()):
        for k, image in enumerate(images):
            jpeg(work / "sources" / name / image, 10 * n + k)
    write_config(work / "config.yaml", folder_config(work / "sources"))
    settle(work)
    return work


def settle(work: Path) -> None:
    result = snakemake(work, "--cores", "2", *READ_TARGETS, configfile=work / "config.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def planned_reads(work: Path) -> list[tuple[str, dict[str, str]]]:
    result = snakemake(work, "-n", *READ_TARGETS, configfile=work / "config.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return planned(result.stdout + result.stderr)


def test_nothing_is_planned_when_no_folder_changed(folders):
    assert planned_reads(folders) == []


@pytest.mark.parametrize(
    "dataset, added",
    [
        ("mit", "images/old building/b.jpg"),  # an image in a state folder
        ("mit", "images/large apple/a.jpg"),  # a new state folder
        ("fer_plain", "train/happy/b.jpg"),  # an image in a <split>/<emotion> copy
        ("fer_images", "images/train/angry/a.jpg"),  # a new emotion folder in an images/<split>/<emotion> copy
    ],
)
def test_an_added_image_reruns_only_its_reader(folders, dataset, added):
    jpeg(folders / "sources" / dataset / added, 99)
    kind = FOLDER_DATASETS[dataset][0]
    assert planned_reads(folders) == [(READ_RULE[kind], {"dataset": dataset})]
    settle(folders)  # the next case starts from a finished read


def test_a_rewritten_image_reruns_its_reader(folders):
    jpeg(folders / "sources/mit/images/new building/a.jpg", 123)
    assert planned_reads(folders) == [("read_dataset_mit_states", {"dataset": "mit"})]
    settle(folders)


# -- (7) one config key at a time --------------------------------------------------------------------------
# The smallest run through every stage: one barely trained toy BLIP, SIP, 16 scenes. Every key is set
# explicitly (most to the schema's default), so that each one can be changed below.
SMALL = {
    "seed": 0,
    "datasets": {
        "synthetic": {
            "kind": "synthetic",
            "n_scenes": 16,
            "image_size": 64,
            "subject": "object",
            "tasks": {
                task: {**spec, "distractor_rule": "any"} for task, spec in copy.deepcopy(SYNTHETIC_TASKS).items()
            },
            "distractors": {"vectors": "glove-6b-50d", "cosine_threshold": 0.88, "near_synonyms": []},
        }
    },
    "models": {
        "toy_blip": {
            "train": {
                "family": "blip",
                "dataset": "synthetic",
                "steps": 120,
                "batch_size": 32,
                "seed": 0,
                "n_train_images": 2000,
                "n_eval_images": 50,
            },
            "dtype": "float32",
            "device": "cpu",
            "prompt_template": None,
            "max_new_tokens": 5,
        }
    },
    "corruptions": {"sip": {}},
    "selection": {"n_per_task": 2, "min_per_task": 1},
    "sharding": {"n_shards": 1},
    "gpu_jobs": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    "patching": {"engine": "fast", "module_sites": True, "head_sites": True, "batch_size": 64},
    "analysis": {
        "metric": "logit_diff",
        "k_sigma": 2.0,
        "bootstrap_draws": 5,
        "universal_corruptions": ["sip", "str"],
        "attention_samples": 4,
        "overlay_samples": 3,
        "overlay_heads": 4,
        "head_functions": {
            "outlier_z": 3.0,
            "outlier_min_ratio": 2.0,
            "object_patch_fraction": 0.5,
            "detection_threshold": 2.0,
            "lift_threshold": 1.5,
            "outlier_lift_threshold": 1.5,
            "entropy_margin": 0.05,
        },
    },
}
MODEL_LOADERS = {"evaluate_shard", "attention_patterns", "cache_clean", "patch"}
HEAD_FUNCTIONS = {"head_functions", "report"}
# key path -> (another valid value, the rules whose params hold it). Not changed: datasets.synthetic.kind and
# models.toy_blip.train.dataset (no other valid value in a one-dataset config), sharding.n_shards (new shard
# jobs, no params change of the finished ones).
CHANGES = {
    "seed": (
        1,
        {"synthetic_dataset", "distractors", "prompts", "select_samples", "attention_patterns", "analyse_heads"},
    ),  # SIP pairs draw nothing
    "datasets.synthetic.n_scenes": (17, {"synthetic_dataset"}),
    "datasets.synthetic.image_size": (32, {"synthetic_dataset", "train_toy_model"}),
    "datasets.synthetic.subject": ("shape", set()),  # the synthetic generator's subject is always "object"
    "datasets.synthetic.tasks.colour.question": ("is it {a} or {b}?", {"prompts"}),
    "datasets.synthetic.tasks.colour.values": (["purple", "yellow", "blue", "green", "red"], {"distractors"}),
    "datasets.synthetic.tasks.colour.distractor_rule": ("same_group", {"distractors"}),
    "datasets.synthetic.tasks.shape.question": ("is it a {a} or {b}?", {"prompts"}),
    "datasets.synthetic.tasks.shape.values": (["cross", "triangle", "square", "circle"], {"distractors"}),
    "datasets.synthetic.tasks.shape.distractor_rule": ("other_group", {"distractors"}),
    "datasets.synthetic.distractors.vectors": ("vectors.kv", {"distractors"}),
    "datasets.synthetic.distractors.cosine_threshold": (0.87, {"distractors"}),
    "datasets.synthetic.distractors.near_synonyms": ([["red", "purple"]], {"distractors"}),
    **{
        f"models.toy_blip.train.{key}": (value, {"train_toy_model"})
        for key, value in (
            ("family", "llava"),
            ("steps", 121),
            ("batch_size", 16),
            ("seed", 1),
            ("n_train_images", 1000),
            ("n_eval_images", 40),
        )
    },
    "models.toy_blip.dtype": ("bfloat16", MODEL_LOADERS),
    "models.toy_blip.device": ("auto", MODEL_LOADERS),
    "models.toy_blip.prompt_template": ("Question: {question} Answer:", MODEL_LOADERS | {"prompts"}),
    "models.toy_blip.max_new_tokens": (6, {"evaluate_shard"}),
    "selection.n_per_task": (3, {"select_samples"}),
    "selection.min_per_task": (2, {"select_samples"}),
    "gpu_jobs.threads": (2, set()),
    "gpu_jobs.mem_mb": (2000, set()),
    "gpu_jobs.runtime": (20, set()),
    **{
        f"patching.{key}": (value, {"patch"})
        for key, value in (("engine", "reference"), ("module_sites", False), ("head_sites", False), ("batch_size", 32))
    },
    "analysis.metric": ("prob_restoration", {"analyse_heads"}),
    "analysis.k_sigma": (2.5, {"analyse_heads", "figures", "report"}),
    "analysis.bootstrap_draws": (6, {"analyse_heads"}),
    "analysis.universal_corruptions": (["sip"], {"analyse_heads", "report"}),
    "analysis.attention_samples": (3, {"attention_patterns"}),
    "analysis.overlay_samples": (2, {"figures"}),
    "analysis.overlay_heads": (3, {"figures"}),
    **{
        f"analysis.head_functions.{key}": (value, HEAD_FUNCTIONS)
        for key, value in (
            ("outlier_z", 2.5),
            ("outlier_min_ratio", 2.5),
            ("object_patch_fraction", 0.4),
            ("detection_threshold", 2.5),
            ("lift_threshold", 2.0),
            ("outlier_lift_threshold", 2.0),
            ("entropy_margin", 0.1),
        )
    },
}


def leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys += leaf_keys(value, f"{path}.") if isinstance(value, dict) else [path]  # sip: {} has none
    return keys


def changed(key: str, value) -> dict:
    config = copy.deepcopy(SMALL)
    *parents, last = key.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[last] = value
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workdir with SMALL run to the end."""
    work = tmp_path_factory.mktemp("small")
    result = snakemake(work, "--cores", "2", configfile=write_config(work / "config.yaml", SMALL))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work


def params_changed(work: Path, configfile: Path) -> set[str]:
    """The rules with an output whose status is "params changed" in Snakemake's summary (every rule ran once)."""
    result = snakemake(work, "--summary", configfile=configfile)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:] if "\t" in line]
    assert {row[2] for row in rows} >= {"synthetic_dataset", "train_toy_model", "patch", "report"}, rows
    return {row[2] for row in rows if row[4] == "params changed"}


def test_every_leaf_key_is_in_the_table():
    not_changed = {"datasets.synthetic.kind", "models.toy_blip.train.dataset", "sharding.n_shards"}
    assert set(leaf_keys(SMALL)) == set(CHANGES) | not_changed


def test_nothing_changed_changes_no_params(finished):
    assert params_changed(finished, finished / "config.yaml") == set()


@pytest.mark.parametrize("key", list(CHANGES))
def test_a_key_changes_the_params_of_exactly_the_rules_that_read_it(finished, key):
    value, expected = CHANGES[key]
    assert params_changed(finished, write_config(finished / f"{key}.yaml", changed(key, value))) == expected


@pytest.mark.parametrize(
    "key, reruns",
    [
        # Not the prompts (nor anything before them): the answers and everything after them.
        (
            "models.toy_blip.max_new_tokens",
            {
                "evaluate_shard",
                "gather_answers",
                "select_samples",
                "attention_patterns",
                "cache_clean",
                "pairs",
                "patch",
                "gather_patching",
                "analyse_heads",
                "head_functions",
                "figures",
                "report",
                "all",
            },
        ),
        ("analysis.overlay_heads", {"figures", "report", "all"}),
    ],
)
def test_the_plan_reruns_the_readers_and_their_downstream_only(finished, key, reruns):
    value, _ = CHANGES[key]
    result = snakemake(finished, "-n", configfile=write_config(finished / f"{key}.yaml", changed(key, value)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(planned_jobs(result.stdout + result.stderr)) == reruns
