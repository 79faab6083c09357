"""The flow stage in the workflow's plan (dry runs): its jobs per (model, dataset, shard) with `flow.enabled`, none
without it, and a bad edge stops the run at start naming the key."""

import copy

import pytest
import yaml
from workflow_helpers import REPO, planned, planned_jobs, snakemake, write_config

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
FLOW_RULES = {"flow", "gather_flow", "flow_figures"}


def dry_run(tmp_path, config: dict) -> str:
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_the_demo_has_the_flow_on_and_the_paper_config_off():
    assert DEMO["flow"]["enabled"] is True
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert paper["flow"]["enabled"] is False


def test_flow_jobs_are_planned_per_model_dataset_and_shard(tmp_path):
    config = copy.deepcopy(DEMO)
    config["sharding"] = {"n_shards": 3}
    output = dry_run(tmp_path, config)
    jobs = planned(output)
    flow = sorted((w["model"], w["dataset"], w["shard"]) for rule, w in jobs if rule == "flow")
    shards = [f"shard{k}-of3" for k in range(3)]
    assert flow == [(model, "synthetic", shard) for model in ("toy_blip", "toy_llava") for shard in shards]
    gathered = sorted((w["model"], w["dataset"]) for rule, w in jobs if rule == "gather_flow")
    assert gathered == [("toy_blip", "synthetic"), ("toy_llava", "synthetic")]
    assert sorted(w["model"] for rule, w in jobs if rule == "flow_figures") == ["toy_blip", "toy_llava"]
    assert planned_jobs(output)["report"] == 1
    for model in ("toy_blip", "toy_llava"):
        for table in ("knockout", "logit_lens", "ablation", "skipped"):
            assert f"results/{model}/synthetic/flow/{table}/shard2-of3.parquet" in output
            assert f"results/{model}/synthetic/flow/{table}.parquet" in output
        assert f"results/{model}/flow_figures" in output and f"results/{model}/analysis/flow_ablation.csv" in output


@pytest.mark.parametrize("flow", [{"enabled": False}, None], ids=["off", "absent"])
def test_no_flow_job_is_planned_with_the_flow_off(tmp_path, flow):
    config = copy.deepcopy(DEMO)
    config.pop("flow")
    if flow is not None:
        config["flow"] = flow
    output = dry_run(tmp_path, config)
    jobs = planned_jobs(output)
    assert not FLOW_RULES & set(jobs) and "flow_figures" not in output
    assert {"patch", "figures", "report"} <= set(jobs)


def test_an_unknown_group_in_an_edge_stops_the_run_at_start(tmp_path):
    config = copy.deepcopy(DEMO)
    config["flow"]["edges"] = ["image:last", "picture:last"]
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), timeout=300)
    assert result.returncode != 0
    assert (
        "config: flow.edges.1 = 'picture:last': unknown group 'picture' (expected source:target, each one of "
        "image, object, question, last, text)" in (result.stdout + result.stderr).splitlines()
    )
