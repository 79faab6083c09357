"""Bad configs stop the run at start with a message naming the key and what was expected."""

import copy

import pytest
import yaml

from workflow_helpers import REPO, snakemake, write_config

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def dry_run(tmp_path, config):
    """(return code, everything Snakemake printed): it reports config errors on stdout."""
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_demo_config_plans(tmp_path):
    code, output = dry_run(tmp_path, DEMO)
    assert code == 0, output
    for rule in ("synthetic_dataset", "train_toy_model", "distractors", "prompts", "evaluate_shard", "gather_answers",
                 "select_samples", "pairs", "cache_clean", "patch", "gather_patching", "analyse_heads", "figures",
                 "report"):
        assert rule in output, f"rule {rule} missing from the plan"


def test_unknown_key_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["patching"]["engnie"] = "fast"
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "engnie" in output and "Additional properties are not allowed" in output


def test_wrong_type_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["selection"]["n_per_task"] = "many"
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "'many' is not of type 'integer'" in output and "n_per_task" in output


def test_missing_dataset_path_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["datasets"]["mine"] = {
        "kind": "samples_table", "path": str(tmp_path / "nowhere"),
        "tasks": {"colour": {"question": "is it {a} or {b}?", "values": ["red", "blue"]}},
    }
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "datasets.mine.path" in output and "samples.parquet not found" in output


def test_missing_model_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["models"]["real_blip"] = {"path": "Salesforce/blip-vqa-base-not-cached"}
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "models.real_blip.path" in output and "HF_HOME" in output


@pytest.mark.parametrize("corruption", ["gaussian"])
def test_unknown_corruption_is_named(tmp_path, corruption):
    config = copy.deepcopy(DEMO)
    config["corruptions"][corruption] = {}
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert corruption in output


def test_toy_architecture_that_does_not_fit_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["models"]["toy_llava"]["train"].update(text_heads=8, text_kv_heads=3)
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "models.toy_llava.train" in output and "text_kv_heads=3 must divide text_heads=8" in output


def test_the_shipped_configs_validate_and_modern_models_merge_onto_the_paper_config():
    from snakemake.utils import update_config, validate

    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    update_config(paper, yaml.safe_load((REPO / "config" / "modern_models.yaml").read_text()))
    validate(paper, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    assert {"blip", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(paper["models"])
    for name in ("llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert paper["models"][name]["prompt_template"].count("{question}") == 1
