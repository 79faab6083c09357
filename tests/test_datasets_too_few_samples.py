"""Review issue 16 (3): a dataset, task or selection with too few usable samples stops its job.

The reader scripts and select_samples run here as Snakemake runs them (a `snakemake` object in their
globals); a reader that stops leaves its exclusions in ``read_exclusions.failed.parquet``, which
Snakemake does not delete, and the error names the dataset, the stage and that table.
"""

import copy
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from workflow_helpers import REPO, snakemake, write_config

from notice.data import selection_problem
from notice.data.download import DOWNLOAD_COLUMNS
from notice.data.facial_expressions import EMOTION_GROUPS
from notice.data.svo_probes import CSV_COLUMNS
from notice.files.tables import ANSWER_COLUMNS, EXCLUSION_COLUMNS, write_table

FER_TASKS = {"facial_expressions": {"question": "Is this {subject} feeling {a} or {b}?", "groups": EMOTION_GROUPS}}
MIT_TASKS = {"mit_states": {"question": "Is this {subject} {a} or {b}?", "groups": {"ancient": "colour"}}}


def run_script(name: str, tmp_path: Path, **fields) -> None:
    fields.setdefault("log", [str(tmp_path / "logs" / f"{name}.log")])
    runpy.run_path(str(REPO / "workflow_scripts" / name), init_globals={"snakemake": SimpleNamespace(**fields)})


def reader_outputs(tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "results" / "datasets" / "fer"
    return {
        "samples": str(out / "samples.parquet"),
        "pool": str(out / "image_pool.parquet"),
        "exclusions": str(out / "read_exclusions.parquet"),
    }


def read_fer(tmp_path: Path, source: Path, min_per_task: int = 1, **section) -> dict[str, str]:
    outputs = reader_outputs(tmp_path)
    run_script(
        "read_facial_expressions.py",
        tmp_path,
        wildcards=SimpleNamespace(dataset="fer"),
        output=outputs,
        params=SimpleNamespace(
            section={"path": str(source), "tasks": FER_TASKS, **section},
            seed=0,
            out_dir=str(tmp_path / "decoded"),
            min_per_task=min_per_task,
        ),
    )
    return outputs


def pixels(seed: int) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, 48 * 48)))


def failed_table(tmp_path: Path) -> Path:
    return tmp_path / "results" / "datasets" / "fer" / "read_exclusions.failed.parquet"


def test_header_only_csv_stops_the_reader(tmp_path):
    source = tmp_path / "fer2013.csv"
    source.write_text("emotion,pixels,Usage\n")
    with pytest.raises(ValueError) as caught:
        read_fer(tmp_path, source)
    assert str(caught.value) == (
        "dataset 'fer', stage read:fer: task 'facial_expressions' has 0 usable samples (selection.min_per_task = 1); "
        f"the reason for each of the 0 excluded samples is in {failed_table(tmp_path)}"
    )
    assert pd.read_parquet(failed_table(tmp_path)).empty
    assert not Path(reader_outputs(tmp_path)["samples"]).exists()


def test_splits_that_match_nothing_keep_every_reason(tmp_path):
    source = tmp_path / "fer2013.csv"
    source.write_text("emotion,pixels,Usage\n" + "".join(f"3,{pixels(i)},Training\n" for i in range(3)))
    with pytest.raises(
        ValueError,
        match=r"has 0 usable samples .* each of the 3 excluded samples is in .*"
        r"read_exclusions\.failed\.parquet$",
    ):
        read_fer(tmp_path, source, splits=["train"])
    failed = pd.read_parquet(failed_table(tmp_path))
    assert list(failed.columns) == list(EXCLUSION_COLUMNS)
    assert failed["reason"].tolist() == [
        f"fer2013.csv line {line}: split 'Training' is not in the configured splits ['train']" for line in (2, 3, 4)
    ]

    # min_per_task counts too; a successful read removes the stale failed table.
    with pytest.raises(ValueError, match=r"'facial_expressions' has 3 usable samples \(selection.min_per_task = 4\)"):
        read_fer(tmp_path, source, min_per_task=4)
    outputs = read_fer(tmp_path, source, min_per_task=3)
    assert len(pd.read_parquet(outputs["samples"])) == 3 and not failed_table(tmp_path).exists()


def test_empty_emotion_folders_stop_the_reader(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "faces" / split / "happy").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^dataset 'fer', stage read:fer: task 'facial_expressions' has 0 usable"):
        read_fer(tmp_path, tmp_path / "faces")


def test_mit_states_reader_names_its_table(tmp_path):
    folder = tmp_path / "mit" / "images" / "new building"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / "a.jpg")
    outputs = {key: path.replace("/fer/", "/mit/") for key, path in reader_outputs(tmp_path).items()}
    with pytest.raises(ValueError) as caught:
        run_script(
            "read_mit_states.py",
            tmp_path,
            wildcards=SimpleNamespace(dataset="mit"),
            output=outputs,
            params=SimpleNamespace(section={"path": str(tmp_path / "mit"), "tasks": MIT_TASKS}, seed=0, min_per_task=1),
        )
    failed = tmp_path / "results" / "datasets" / "mit" / "read_exclusions.failed.parquet"
    assert str(caught.value) == (
        "dataset 'mit', stage read:mit: task 'mit_states' has 0 usable samples (selection.min_per_task = 1); "
        f"the reason for each of the 1 excluded samples is in {failed}"
    )
    assert pd.read_parquet(failed)["reason"].tolist() == ["state 'new' is not in any configured group"]


def test_svo_reader_names_every_short_task(tmp_path):
    csv = tmp_path / "svo_probes.csv"
    csv.write_text(
        ",".join(CSV_COLUMNS) + '\nA child.,"child,cross,street","lady,cross,street",True,False,False,u1,u2,1,2\n'
    )
    downloads = tmp_path / "downloads.parquet"
    write_table(pd.DataFrame(columns=list(DOWNLOAD_COLUMNS)), downloads, DOWNLOAD_COLUMNS)
    outputs = {key: path.replace("/fer/", "/svo/") for key, path in reader_outputs(tmp_path).items()}
    tasks = {t: {"question": "{a} or {b}"} for t in ("svo_subject", "svo_verb", "svo_object")}
    with pytest.raises(ValueError) as caught:
        run_script(
            "read_svo_probes.py",
            tmp_path,
            wildcards=SimpleNamespace(dataset="svo"),
            output=outputs,
            input=SimpleNamespace(csv=str(csv), downloads=str(downloads)),
            params=SimpleNamespace(section={"path": str(csv), "tasks": tasks}, min_per_task=1),
        )
    assert str(caught.value).startswith(
        "dataset 'svo', stage read:svo: task 'svo_object' has 0 usable samples; task 'svo_subject' has 0 usable "
        "samples; task 'svo_verb' has 0 usable samples (selection.min_per_task = 1); the reason for each of the 2 "
        "excluded samples is in "
    )
    assert (
        pd.read_parquet(tmp_path / "results/datasets/svo/read_exclusions.failed.parquet")["reason"].tolist()
        == ["svo_probes.csv line 2: positive image not downloaded: u1 is not in the downloads table"] * 2
    )


# -- selection ----------------------------------------------------------------------------------------------
def answers(rows: list[tuple[str, str, bool]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["sample_id", "task", "correct"])
    df["category"], df["correct_first"] = "c", True
    for column in ANSWER_COLUMNS:
        if column not in df:
            df[column] = ""
    return df[list(ANSWER_COLUMNS)]


def test_selection_problem_names_the_short_tasks_and_the_tables():
    selected = answers([("a", "colour", True), ("b", "colour", True)])
    assert selection_problem(selected, ["colour"], 2, 5, "r/m/d/answers.parquet") == ""
    assert selection_problem(selected, ["colour", "shape"], 2, 5, "r/m/d/answers.parquet") == (
        "task 'shape' has 0 selected samples (selection.min_per_task = 2); only correctly answered samples are "
        "selected: see r/m/d/answers.parquet (column correct) and, for samples without a prompt, "
        "r/m/d/prompt_exclusions.parquet"
    )
    assert selection_problem(selected, ["colour"], 3, 5, "a.parquet").startswith("task 'colour' has 2 selected")
    assert selection_problem(selected, ["colour"], 6, 5, "a.parquet") == (
        "config: selection.min_per_task = 6 is larger than selection.n_per_task = 5, so no selection can reach it"
    )


def test_select_samples_script_stops_on_a_task_without_right_answers(tmp_path):
    path = tmp_path / "results" / "m" / "d" / "answers.parquet"
    write_table(answers([("a", "colour", True), ("b", "shape", False)]), path, ANSWER_COLUMNS)
    selected = tmp_path / "results" / "m" / "d" / "selected.parquet"
    with pytest.raises(ValueError) as caught:
        run_script(
            "select_samples.py",
            tmp_path,
            input=SimpleNamespace(answers=str(path)),
            output=SimpleNamespace(selected=str(selected)),
            wildcards=SimpleNamespace(model="m", dataset="d"),
            params=SimpleNamespace(selection={"n_per_task": 4, "min_per_task": 1}, tasks=["colour", "shape"], seed=0),
        )
    assert str(caught.value) == (
        "model 'm', dataset 'd', stage select_samples: task 'shape' has 0 selected samples (selection.min_per_task "
        f"= 1); only correctly answered samples are selected: see {path} (column correct) and, for samples without "
        f"a prompt, {path.with_name('prompt_exclusions.parquet')}"
    )
    assert not selected.exists()


# -- the start-up checks ------------------------------------------------------------------------------------
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


def test_start_accepts_what_the_fer_reader_accepts_and_checks_min_per_task(tmp_path):
    (tmp_path / "faces" / "train" / "happy").mkdir(parents=True)
    (tmp_path / "icml_face_data.csv").write_text("emotion, Usage, pixels\n")
    config = copy.deepcopy(DEMO)
    for name, path in (("faces", tmp_path / "faces"), ("icml", tmp_path / "icml_face_data.csv")):
        config["datasets"][name] = {**copy.deepcopy(PAPER["datasets"]["facial_expressions"]), "path": str(path)}
    config["selection"]["min_per_task"] = 2
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "read_dataset_facial_expressions" in result.stdout

    config["selection"]["min_per_task"] = 0
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "selection.min_per_task: 0 is less than the minimum of 1" in output, output
