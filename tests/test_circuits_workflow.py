"""The circuits in the workflow's plan (dry runs): one job per (model, dataset, corruption) and one overlap job per
model with `circuits.enabled`, none without it; the settings in the jobs' params; the paper config has them off."""

import copy

import pytest
import yaml
from workflow_helpers import REPO, planned, planned_jobs, snakemake, write_config

from notice.method.circuits import CircuitSettings

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
CIRCUIT_RULES = {"circuits", "circuit_overlap"}
OUTPUTS = ("edges.parquet", "faithfulness.parquet", "summary.csv", "validation.csv", "skipped.csv")


def dry_run(tmp_path, config: dict, *args: str) -> str:
    result = snakemake(tmp_path, "-n", *args, configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_the_demo_has_the_circuits_on_and_small_and_the_paper_config_off():
    assert DEMO["circuits"] == {"enabled": True, "max_pairs": 4, "curve_points": 6, "validation_edges": 24}
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert paper["circuits"]["enabled"] is False


def test_the_settings_defaults_are_the_schemas():
    properties = SCHEMA["properties"]["circuits"]["properties"]
    defaults = {key: spec["default"] for key, spec in properties.items() if "default" in spec}
    assert defaults.pop("enabled") is False and set(properties) - set(defaults) == {"enabled", "max_pairs"}
    assert CircuitSettings() == CircuitSettings.from_config(defaults)


def test_circuit_jobs_are_planned_per_condition_and_model_and_feed_the_report(tmp_path):
    output = dry_run(tmp_path, DEMO)
    jobs = planned(output)
    circuits = sorted((w["model"], w["dataset"], w["corruption"]) for rule, w in jobs if rule == "circuits")
    corruptions = sorted(DEMO["corruptions"])
    assert circuits == [(model, "synthetic", c) for model in ("toy_blip", "toy_llava") for c in corruptions]
    assert sorted(w["model"] for rule, w in jobs if rule == "circuit_overlap") == ["toy_blip", "toy_llava"]
    assert planned_jobs(output)["report"] == 1
    for model in ("toy_blip", "toy_llava"):
        for corruption in corruptions:
            for name in OUTPUTS:
                assert f"results/{model}/synthetic/circuits/{corruption}/{name}" in output
        for name in ("analysis/circuit_overlap.csv", "analysis/circuit_shared_heads.csv", "circuit_figures"):
            assert f"results/{model}/{name}" in output


@pytest.mark.parametrize("circuits", [{"enabled": False}, None], ids=["off", "absent"])
def test_no_circuit_job_is_planned_with_the_circuits_off(tmp_path, circuits):
    config = copy.deepcopy(DEMO)
    config.pop("circuits")
    if circuits is not None:
        config["circuits"] = circuits
    output = dry_run(tmp_path, config)
    jobs = planned_jobs(output)
    assert not CIRCUIT_RULES & set(jobs) and "circuit_figures" not in output
    assert {"patch", "figures", "report"} <= set(jobs)


def test_a_bad_setting_stops_the_run_at_start_naming_the_key(tmp_path):
    config = copy.deepcopy(DEMO)
    config["circuits"] = {"enabled": True, "target_faithfulness": 1.5, "max_pairs": 0}
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode != 0
    assert any("circuits.target_faithfulness: 1.5 is greater than the maximum of 1" in line for line in lines), lines
    assert any("circuits.max_pairs: 0 is less than the minimum of 1" in line for line in lines), lines
