"""The whole DAG on a tiny config in a temporary directory: outputs, contracts, incremental reruns."""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from workflow_helpers import (
    SYNTHETIC_TASKS,
    fault_env,
    planned,
    planned_jobs,
    snakemake,
    synthetic_dataset,
    write_config,
)

from notice.files.tables import RESULT_COLUMNS
from notice.method.circuits import EDGE_COLUMNS, FAITHFULNESS_COLUMNS, OVERLAP_COLUMNS, SHARED_HEAD_COLUMNS
from notice.method.precision import AUDIT_COLUMNS, AUDIT_ROW_COLUMNS, draws
from notice.method.screen import KEY_COLUMNS
from notice.method.screen import TABLE_COLUMNS as SCREEN_TABLE_COLUMNS

pytestmark = pytest.mark.slow

MODELS = ("toy_blip", "toy_llava")
TINY = {
    "seed": 0,
    # One dataset: each model-loading job costs ~8 s of imports whatever its size. That other datasets'
    # chains stay untouched is shown by adding one (test_adding_a_dataset_plans_only_its_jobs...).
    # 32 scenes, 4 per task selected: the barely trained models' right answers then span enough option pairs
    # for STR partners in both tasks (16 scenes and 3 per task left the toy LLaVA's STR table empty).
    "datasets": {"synthetic": synthetic_dataset(32)},
    "models": {
        # Batches of 32 for 120 steps: on the 32 scenes colour 0.91 and shape 0.50 / 0.59 (BLIP / LLaVA),
        # right answers enough to select 4 per task and STR partners in both tasks, in about half the time of
        # 250 steps (which learn no more shape).
        name: {
            "train": {
                "family": family,
                "dataset": "synthetic",
                "steps": 120,
                "batch_size": 32,
                "seed": 0,
                "n_train_images": 2000,
                "n_eval_images": 200,
                **arch,
            }
        }
        # The LLaVA with the demo's MLPs of 128: cheaper steps, and more right answers to select from.
        for name, family, arch in zip(
            MODELS, ("blip", "llava"), ({}, {"vision_intermediate": 128, "text_intermediate": 128})
        )
    },
    "corruptions": {"sip": {}, "str": {}, "gn_mult": {"nu": 5.0, "n_draws": 2}},
    "selection": {"n_per_task": 4},
    "patching": {"engine": "fast"},
    "analysis": {"bootstrap_draws": 20},
    "screen": {"enabled": True, "method": "atp", "confirm_top": 3, "map_samples": 2},
    # The demo's small circuits: the first 2 pairs of each condition, 4 curve points, 8 validated edges per pair.
    "circuits": {"enabled": True, "max_pairs": 2, "curve_points": 4, "validation_edges": 8},
    # One core per job, so that two run side by side on 2 cores (the jobs are short; most of their time is
    # loading Python modules and models).
    "gpu_jobs": {"threads": 1},
}


def dry_run(workdir: Path, config: dict, name: str, *targets: str) -> list[tuple[str, dict[str, str]]]:
    result = snakemake(workdir, "-n", *targets, configfile=write_config(workdir / name, config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return planned(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    result = snakemake(work, "--cores", "2", configfile=write_config(work / "config.yaml", TINY))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work


def test_results_tables_follow_the_contract(workdir):
    for model in MODELS:
        tables = {
            c: pd.read_parquet(workdir / f"results/{model}/synthetic/patching/{c}.parquet") for c in TINY["corruptions"]
        }
        for corruption, table in tables.items():
            assert list(table.columns) == list(RESULT_COLUMNS)
            assert len(table) > 0, f"{model} {corruption}: no patched runs"
            assert (table["logit_diff"] - (table["ld_patched"] - table["ld_corrupt"])).abs().max() < 1e-6
            assert (table["prob_restoration"] - (table["p_patched"] - table["p_corrupt"])).abs().max() < 1e-6
        assert set(tables["sip"]["modality"]) == {"image"} and set(tables["str"]["modality"]) == {"text"}
        head_site = "cross_attn_head" if model == "toy_blip" else "self_attn_head"
        assert head_site in set(tables["sip"]["site"])
        assert set(tables["gn_mult"].groupby("sample_id")["ld_corrupt"].nunique()) <= {1, 2}


def test_analysis_figures_and_report_exist(workdir):
    for model in MODELS:
        analysis = workdir / f"results/{model}/analysis"
        significant = pd.read_csv(analysis / "significant_heads.csv")
        assert {"threshold", "significant"} <= set(significant.columns)
        assert "kind" in pd.read_csv(analysis / "universal_heads.csv").columns
        accuracy = pd.read_csv(workdir / f"results/{model}/synthetic/accuracy.csv")
        assert set(accuracy["task"]) == {"colour", "shape"}
        figures = workdir / f"results/{model}/figures"
        for prefix in ("module", "heads", "accuracy"):
            pngs = list(figures.glob(f"{prefix}_*.png"))
            assert pngs and all(p.stat().st_size > 0 for p in pngs), f"{model}: no {prefix} figure"
            assert all(p.with_suffix(".html").exists() for p in pngs)
        functions = pd.read_csv(analysis / "head_functions.csv")
        assert functions["has_object_mask"].all() and functions["detection_score"].notna().all()  # synthetic masks
        assert (workdir / f"results/{model}/synthetic/attention/index.parquet").exists()
        overlays = list(figures.glob(f"attention_{model}_*.png"))
        assert overlays and all(p.with_suffix(".html").exists() for p in overlays), f"{model}: no attention overlay"
    report = (workdir / "results/report.html").read_text()
    assert "http://" not in report and "https://" not in report
    assert report.count("<img") >= 6
    assert "Does cross-attention ground objects while self-attention does not?" in report
    assert "attention_toy_blip_synthetic" in report and "attention_toy_llava_synthetic" in report
    assert (workdir / "results/tables/table1_universal_heads.md").exists()


def test_nothing_to_do_after_a_run(workdir):
    result = snakemake(workdir, "-n", configfile=workdir / "config.yaml")
    assert result.returncode == 0
    assert planned_jobs(result.stdout + result.stderr) == {}, result.stdout[-3000:]


def test_changing_patching_settings_reruns_only_patching_and_after(workdir):
    config = copy.deepcopy(TINY)
    config["patching"]["head_sites"] = False
    changed = write_config(workdir / "changed.yaml", config)
    result = snakemake(workdir, "-n", configfile=changed)
    assert result.returncode == 0
    jobs = planned_jobs(result.stdout + result.stderr)
    n_tables = sum(len(dataset.get("corruptions", TINY["corruptions"])) for dataset in TINY["datasets"].values())
    assert jobs.get("patch") == len(MODELS) * n_tables
    assert set(jobs) <= {
        "patch",
        "gather_patching",
        "analyse_heads",
        "figures",
        "validate_screen",
        "circuit_overlap",  # reads the universal heads
        "report",
        "all",
    }, jobs


GATHERING = {"analyse_heads", "head_functions", "figures", "validate_screen", "circuit_overlap", "report", "all"}


def test_adding_a_dataset_plans_only_its_jobs_and_the_gathering(workdir):
    config = copy.deepcopy(TINY)
    config["datasets"]["synthetic_c"] = synthetic_dataset(6)
    jobs = dry_run(workdir, config, "add_dataset.yaml")
    assert {rule for rule, _ in jobs} >= {"synthetic_dataset", "patch", "report"}
    for rule, wildcards in jobs:
        assert rule in GATHERING or wildcards.get("dataset") == "synthetic_c", (rule, wildcards)


def test_adding_a_model_plans_only_its_jobs_and_the_report(workdir):
    config = copy.deepcopy(TINY)
    config["models"]["toy_blip_2"] = copy.deepcopy(config["models"]["toy_blip"])
    config["models"]["toy_blip_2"]["train"]["seed"] = 1
    jobs = dry_run(workdir, config, "add_model.yaml")
    assert ("train_toy_model", {"model": "toy_blip_2"}) in jobs
    for rule, wildcards in jobs:
        assert rule in {"report", "all"} or wildcards.get("model") == "toy_blip_2", (rule, wildcards)


def test_changing_a_threshold_reruns_the_chain_from_the_distractors_not_training(workdir):
    # The dataset the toy models train on: its distractor settings are not the models' business.
    config = copy.deepcopy(TINY)
    config["datasets"]["synthetic"]["distractors"]["cosine_threshold"] = 0.87
    jobs = dry_run(workdir, config, "threshold.yaml")
    assert ("distractors", {"dataset": "synthetic"}) in jobs
    assert {rule for rule, _ in jobs} >= {"prompts", "evaluate_shard", "pairs", "patch", "report"}, jobs
    for rule, wildcards in jobs:
        assert rule not in {"synthetic_dataset", "train_toy_model"}, (rule, wildcards)


RESULT_KEYS = ["sample_id", "site", "layer", "head", "position"]


def test_screen_covers_the_exact_sites_and_more_and_is_validated_in_the_report(workdir):
    for model in MODELS:
        for corruption in TINY["corruptions"]:
            screen = pd.read_parquet(workdir / f"results/{model}/synthetic/screen/{corruption}.parquet")
            exact = pd.read_parquet(workdir / patching_table(model, corruption))
            assert list(screen.columns) == list(SCREEN_TABLE_COLUMNS) and set(screen["method"]) == {"atp"}
            keys = list(KEY_COLUMNS)
            assert (
                exact[keys].merge(screen[keys].drop_duplicates(), how="left", indicator=True)["_merge"].eq("both").all()
            )
            assert screen["position"].nunique() >= exact["position"].nunique()
            n_pairs = len(pd.read_parquet(workdir / f"results/{model}/synthetic/pairs/{corruption}.parquet"))
            confirmed = pd.read_parquet(workdir / f"results/{model}/synthetic/screen/{corruption}_confirmed.parquet")
            assert list(confirmed.columns) == list(RESULT_COLUMNS) and len(confirmed) == 3 * n_pairs
            assert len(list((workdir / f"results/{model}/synthetic/screen/{corruption}_maps").glob("*.npz"))) == n_pairs
        llava = pd.read_parquet(workdir / "results/toy_llava/synthetic/screen/sip.parquet")
        image_positions = set(llava["position"]) - set(
            pd.read_parquet(workdir / patching_table("toy_llava", "sip"))["position"]
        )
        assert len(image_positions) >= 16  # the image tokens, which exact patching does not reach
        validation = pd.read_csv(workdir / f"results/{model}/analysis/screen_validation.csv")
        assert set(validation["corruption"]) == set(TINY["corruptions"])
        recall = validation["recall_top10"].dropna()  # NaN: no sample with more sites of the kind than top_k
        assert validation["spearman"].notna().any() and len(recall) and recall.between(0, 1).all()
        fractions = pd.read_csv(workdir / f"results/{model}/analysis/screen_object_fraction.csv")
        assert set(fractions["task"]) == {"colour", "shape"}
        image_corruptions = fractions[fractions["corruption"] != "str"]
        assert image_corruptions["effect_on_object"].between(0, 1).all() and (image_corruptions["n_samples"] > 0).all()
        text = fractions[fractions["corruption"] == "str"]  # the image is as it was: no image-token effect
        assert (
            text["effect_on_object"].isna().all() and (text["n_samples"] == 0).all() and (text["n_no_effect"] > 0).all()
        )
        figures = workdir / f"results/{model}/screen_figures"
        assert list(figures.glob("screenscatter_*.png")) and list(figures.glob("screenmap_*.png"))
    report = (workdir / "results/report.html").read_text()
    assert "Attribution screen" in report and "screenmap_synthetic_sip_colour" in report


def test_circuits_account_for_every_pair_and_reach_the_report(workdir):
    for model in MODELS:
        for corruption in TINY["corruptions"]:
            folder = workdir / f"results/{model}/synthetic/circuits/{corruption}"
            pairs = pd.read_parquet(workdir / f"results/{model}/synthetic/pairs/{corruption}.parquet")
            edges = pd.read_parquet(folder / "edges.parquet")
            assert list(edges.columns) == list(EDGE_COLUMNS)
            summary = pd.read_csv(folder / "summary.csv").set_index("method")
            skipped = pd.read_csv(folder / "skipped.csv")
            validation = pd.read_csv(folder / "validation.csv")
            beyond = skipped["reason"].str.startswith("beyond circuits.max_pairs = 2")
            # the first pair of each task (the tiny dataset has two) is taken; the others are skipped in table order
            first_of_task = pairs.groupby("task", sort=False).cumcount() == 0
            assert first_of_task.sum() == 2
            assert list(skipped["sample_id"][beyond]) == list(pairs["sample_id"][~first_of_task])
            used = int(summary["n_pairs"].iloc[0]) if len(summary) else 0
            assert used + len(skipped) == len(pairs) and len(validation) == 2 * used  # a row per pair and method
            if used:
                assert set(summary.index) == {"eap", "eap_ig"} and (summary["n_edges"] == len(edges)).all()
                assert edges["in_circuit"].sum() == summary.loc["eap_ig", "smallest_n"]
                assert (validation["sampled"] == 8).all()
                curve = pd.read_parquet(folder / "faithfulness.parquet")
                assert list(curve.columns) == list(FAITHFULNESS_COLUMNS) and curve["n"].max() == len(edges)
        overlap = pd.read_csv(workdir / f"results/{model}/analysis/circuit_overlap.csv")
        assert list(overlap.columns) == list(OVERLAP_COLUMNS)
        shared = pd.read_csv(workdir / f"results/{model}/analysis/circuit_shared_heads.csv")
        assert list(shared.columns) == list(SHARED_HEAD_COLUMNS)
        figures = {path.name for path in (workdir / f"results/{model}/circuit_figures").glob("*.png")}
        assert f"circuitcurve_{model}.png" in figures and f"circuitoverlap_{model}.png" in figures
        assert f"circuitgraph_{model}_synthetic_sip.png" in figures
    report = (workdir / "results/report.html").read_text()
    assert ">Circuits<" in report and "toy_llava circuits: circuitgraph figures" in report


def test_breaking_an_exact_table_lowers_the_screens_correlation(workdir, tmp_path):
    work = tmp_path / "broken"
    shutil.copytree(workdir, work, symlinks=True)
    target = "results/toy_llava/analysis/screen_validation.csv"
    table = work / patching_table("toy_llava", "sip")
    exact = pd.read_parquet(table)
    exact["logit_diff"] = exact["logit_diff"].sample(frac=1.0, random_state=0).to_numpy()  # effects to wrong sites
    exact.to_parquet(table, index=False)
    result = snakemake(work, "--cores", "1", target, configfile=work / "config.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = pd.read_csv(workdir / target).set_index(["corruption", "site"])
    after = pd.read_csv(work / target).set_index(["corruption", "site"])
    pd.testing.assert_frame_equal(after.loc["str"], before.loc["str"])  # the other tables' numbers: as they were
    for site in ("mlp", "self_attn"):
        assert after.loc[("sip", site), "spearman"] < before.loc[("sip", site), "spearman"] - 0.2, site


def patching_table(model: str, corruption: str) -> str:
    return f"results/{model}/synthetic/patching/{corruption}.parquet"


# One table's chain is enough to show resumption (and keeps the test short): new sharding reruns it
# from the evaluation on.
CRASH_TARGET = patching_table("toy_blip", "sip")


def test_a_crashed_shard_is_resumed_without_recomputing_finished_ones(workdir, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(workdir, work, symlinks=True)
    config = copy.deepcopy(TINY)
    config["sharding"] = {"n_shards": 2}
    configfile = write_config(work / "sharded.yaml", config)
    ids = sorted(pd.read_parquet(work / "results/toy_blip/synthetic/selected.parquet")["sample_id"])
    failing = ids[-1]  # the last id lands in shard 1 of 2
    failed = snakemake(
        work,
        "--cores",
        "2",
        "--keep-going",
        CRASH_TARGET,
        configfile=configfile,
        env=fault_env(NOTICE_TEST_FAIL_AT_SAMPLE=failing),
    )
    assert failed.returncode != 0
    shards = work / "results/toy_blip/synthetic/patching/sip"
    assert (shards / "shard0-of2.parquet").exists()
    assert not (shards / "shard1-of2.parquet").exists() and not list(shards.glob("*.tmp"))
    assert "failing on purpose" in (work / "results/logs/patch/toy_blip/synthetic/sip/shard1-of2.log").read_text()
    finished = {
        path: path.stat().st_mtime_ns
        for pattern in ("answers/shard*-of2.parquet", "clean_cache/shard*-of2.pt", "patching/sip/shard*-of2.parquet")
        for path in work.glob(f"results/toy_blip/synthetic/{pattern}")
    }
    assert len(finished) == 2 + 2 + 1, finished  # both evaluation and clean-cache shards, one patching shard

    jobs = dry_run(work, config, "sharded.yaml", CRASH_TARGET)
    assert {rule for rule, _ in jobs} == {"patch", "gather_patching"}, jobs
    assert [wildcards.get("shard") for rule, wildcards in jobs if rule == "patch"] == ["shard1-of2"]

    resumed = snakemake(work, "--cores", "2", CRASH_TARGET, configfile=configfile)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    uninterrupted = pd.read_parquet(workdir / CRASH_TARGET).sort_values(RESULT_KEYS).reset_index(drop=True)
    resumed_table = pd.read_parquet(work / CRASH_TARGET).sort_values(RESULT_KEYS).reset_index(drop=True)
    pd.testing.assert_frame_equal(uninterrupted, resumed_table, check_exact=False, atol=1e-6, rtol=0)


COMPARED = [
    "ld_clean",
    "ld_corrupt",
    "ld_patched",
    "p_clean",
    "p_corrupt",
    "p_patched",
    "logit_diff",
    "prob_restoration",
]
# Both engine families, both modalities (the reference engine costs 2x the fast one here; noise against the
# reference is in test_fast_engine).
ENGINE_TARGETS = [patching_table(model, corruption) for model in MODELS for corruption in ("sip", "str")]


def test_reference_engine_gives_the_fast_engines_tables(workdir, tmp_path):
    # The module's run patched with the fast engine; switching to the reference reruns patching only.
    work = tmp_path / "reference"
    shutil.copytree(workdir, work, symlinks=True)
    config = copy.deepcopy(TINY)
    config["patching"]["engine"] = "reference"
    jobs = dry_run(work, config, "reference.yaml", *ENGINE_TARGETS)
    assert {rule for rule, _ in jobs} == {"patch", "gather_patching"}, jobs
    result = snakemake(work, "--cores", "2", *ENGINE_TARGETS, configfile=work / "reference.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for table in ENGINE_TARGETS:
        fast = pd.read_parquet(workdir / table)
        reference = pd.read_parquet(work / table)
        # Same rows in the same order, same keys; numbers equal up to float32 rounding.
        key_columns = [c for c in RESULT_COLUMNS if c not in COMPARED]
        pd.testing.assert_frame_equal(reference[key_columns], fast[key_columns])
        scale = reference[COMPARED].abs().clip(lower=1.0)
        assert ((fast[COMPARED] - reference[COMPARED]).abs() / scale).max().max() <= 1e-5, table


def test_a_synthetic_dataset_with_one_task_and_some_of_its_values_runs_to_the_pairs(workdir, tmp_path):
    # config/README.md: a synthetic dataset asks any of the generator's tasks, each with two or more of its
    # values. The models trained by the module's run (on "synthetic", which the config keeps) answer it.
    work = tmp_path / "subset"
    shutil.copytree(workdir, work, symlinks=True)
    config = copy.deepcopy(TINY)
    shapes = ["triangle", "circle", "square"]
    question = SYNTHETIC_TASKS["shape"]["question"]
    config["datasets"]["shapes"] = synthetic_dataset(16) | {
        "tasks": {"shape": {"question": question, "values": shapes}}
    }
    target = "results/toy_llava/shapes/pairs/sip.parquet"
    jobs = dry_run(work, config, "shapes.yaml", target)
    assert {wildcards.get("dataset") for _, wildcards in jobs} == {"shapes"}, jobs  # nothing retrains
    result = snakemake(work, "--cores", "2", target, configfile=work / "shapes.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = pd.read_parquet(work / "resources/datasets/shapes/samples.parquet")
    pool = pd.read_parquet(work / "resources/datasets/shapes/image_pool.parquet")
    assert set(samples["task"]) == {"shape"} and len(samples) == 16
    assert set(samples["answer"]) == set(pool["value"]) == set(shapes)
    pairs = pd.read_parquet(work / target)
    assert len(pairs) > 0 and set(pairs["answer"]) | set(pairs["distractor"]) <= set(shapes)
    corrupt = pool.set_index("image_path").loc[pairs["corrupt_image_path"], "value"]
    assert list(corrupt) == list(pairs["distractor"])  # each corrupt image shows the distractor


def test_a_bfloat16_model_is_audited_and_its_heads_below_precision_are_marked(workdir, tmp_path):
    # The module's toy LLaVA loaded in bfloat16: its chain reruns from its evaluation, with a precision audit of
    # every patching table and screen; the float32 toy BLIP's jobs do not rerun and its tables have no audit.
    work = tmp_path / "bfloat16"
    shutil.copytree(workdir, work, symlinks=True)
    config = copy.deepcopy(TINY)
    config["models"]["toy_llava"]["dtype"] = "bfloat16"
    config["patching"]["precision_audit"] = {"rows": 24}
    jobs = dry_run(work, config, "bfloat16.yaml")
    assert {wildcards["model"] for _, wildcards in jobs if "model" in wildcards} == {"toy_llava"}, jobs
    audits = Counter(rule for rule, _ in jobs)
    assert audits["precision_audit"] == audits["screen_precision_audit"] == len(TINY["corruptions"]), audits
    result = snakemake(work, "--cores", "2", configfile=work / "bfloat16.yaml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    floors = {}
    for corruption in TINY["corruptions"]:
        results = pd.read_parquet(work / patching_table("toy_llava", corruption))
        audit = pd.read_csv(work / f"results/toy_llava/synthetic/patching/{corruption}.precision.csv")
        assert list(audit.columns) == list(AUDIT_COLUMNS)
        assert set(audit["site"]) == set(results["site"]) and (audit["n_audited"] >= 1).all()
        assert audit["n_audited"].sum() == max(24, results["site"].nunique())
        assert (audit["dtype"] == "bfloat16").all() and (audit["audit_dtype"] == "float32").all()
        assert audit["max"].max() > 0  # bfloat16 activations round; the float32 reference does not
        # The audited rows are the results table's rows (same effect), each next to its float32 value.
        audited = pd.read_parquet(work / f"results/toy_llava/synthetic/patching/{corruption}.precision_rows.parquet")
        assert list(audited.columns) == list(AUDIT_ROW_COLUMNS)
        keys = [*KEY_COLUMNS, "draw"]  # a GN sample has two pairs
        both = audited.merge(results.assign(draw=draws(results)), on=keys, suffixes=("", "_table"), validate="1:1")
        assert len(both) == len(audited) and (both["logit_diff"] == both["logit_diff_table"]).all()
        screen_audit = pd.read_csv(work / f"results/toy_llava/synthetic/screen/{corruption}.precision.csv")
        assert list(screen_audit.columns) == list(AUDIT_COLUMNS) and (screen_audit["n_audited"] > 0).all()
        floors.update({(corruption, row.site): 3 * row.p95 for row in audit.itertuples()})
        assert not (workdir / f"results/toy_blip/synthetic/patching/{corruption}.precision.csv").exists()
        assert not (work / f"results/toy_blip/synthetic/patching/{corruption}.precision.csv").exists()

    # The analysis reads the audits: below_precision is |mean logit_diff| not above 3 x the audit's p95, and such
    # a head is never significant.
    significant = pd.read_csv(work / "results/toy_llava/analysis/significant_heads.csv")
    floor = [floors[(row.corruption, row.site)] for row in significant.itertuples()]
    assert (significant["below_precision"] == ~(significant["mean"].abs() > floor)).all()
    assert not (significant["significant"] & significant["below_precision"]).any()
    assert "below_precision" in pd.read_csv(work / "results/toy_llava/analysis/universal_heads.csv").columns
    modules = pd.read_parquet(work / "results/toy_llava/analysis/module_effects.parquet")
    assert modules["below_precision"].dtype == bool
    blip = "results/toy_blip/analysis/significant_heads.csv"
    assert (work / blip).read_bytes() == (workdir / blip).read_bytes()  # full precision: unchanged, no column
    validation = pd.read_csv(work / "results/toy_llava/analysis/screen_validation.csv")
    assert set(validation["dtype"]) == {"bfloat16"}
    report = (work / "results/report.html").read_text()
    assert "Precision audit of the models patched in float16 / bfloat16" in report
    assert "Precision audit of the screen of the models in float16 / bfloat16" in report
