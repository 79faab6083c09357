"""The flow stage in the workflow's plan (dry runs): its jobs per (model, dataset, shard) with `flow.enabled`, none
without it, and a bad edge stops the run at start naming the key; and (slow) a whole run of both toy families."""

import copy

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO, planned, planned_jobs, sharded_blip_config, snakemake, write_config

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


# -- a whole run (slow): both toy families, two shards, the flow stage to the report ---------------------------
def flow_run_config() -> dict:
    config = sharded_blip_config(n_scenes=24, n_shards=2)
    train = config["models"]["toy_blip"]["train"]
    config["models"]["toy_llava"] = {"train": {**train, "family": "llava", "steps": 150}}
    config["patching"] = {"engine": "fast"}
    config["flow"] = {"enabled": True, "ablation_draws": 2}
    return config


@pytest.fixture(scope="module")
def flow_workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("flow_run")
    result = snakemake(work, "--cores", "2", configfile=write_config(work / "config.yaml", flow_run_config()))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work


@pytest.mark.slow
def test_the_flow_stage_accounts_for_every_sample_and_edge_and_reaches_the_report(flow_workdir):
    schema = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
    edges = schema["properties"]["flow"]["properties"]["edges"]["default"]
    for model in ("toy_blip", "toy_llava"):
        flow = flow_workdir / "results" / model / "synthetic" / "flow"
        selected = pd.read_parquet(flow_workdir / "results" / model / "synthetic" / "selected.parquet")
        tables = {name: pd.read_parquet(flow / f"{name}.parquet") for name in ("knockout", "ablation", "skipped")}
        for name, table in tables.items():
            shards = [pd.read_parquet(flow / name / f"shard{k}-of2.parquet") for k in range(2)]
            assert len(table) == sum(map(len, shards)), name
            assert list(table.columns[:4]) == ["model", "dataset", "task", "sample_id"]
        knocked, skipped = tables["knockout"], tables["skipped"]
        for sample_id in selected["sample_id"]:
            rows = knocked[knocked["sample_id"] == sample_id]
            computed = set(rows["source"] + ":" + rows["target"])
            passed = set(skipped.loc[(skipped["sample_id"] == sample_id) & (skipped["analysis"] == "knockout"), "item"])
            assert computed.isdisjoint(passed) and computed | passed == set(edges), (model, sample_id)
            ablated = set(tables["ablation"]["sample_id"])
            ablation_skipped = set(skipped.loc[skipped["analysis"] == "ablation", "sample_id"])
            assert (sample_id in ablated) != (sample_id in ablation_skipped), (model, sample_id)
        figures = {path.name for path in (flow_workdir / "results" / model / "flow_figures").glob("*.png")}
        assert f"flowablation_{model}.png" in figures and f"knockout_{model}_synthetic.png" in figures
    lens = pd.read_parquet(flow_workdir / "results/toy_llava/synthetic/flow/logit_lens.parquet")
    selected = pd.read_parquet(flow_workdir / "results/toy_llava/synthetic/selected.parquet")
    assert lens["sample_id"].nunique() == min(16, len(selected)) and set(lens["layer"]) == {0, 1}
    blip_lens = pd.read_parquet(flow_workdir / "results/toy_blip/synthetic/flow/logit_lens.parquet")
    blip_skipped = pd.read_parquet(flow_workdir / "results/toy_blip/synthetic/flow/skipped.parquet")
    assert blip_lens.empty and (blip_skipped["analysis"] == "logit_lens").any()  # cross-attention: refused, said why
    html = (flow_workdir / "results" / "report.html").read_text()
    assert "How the image reaches the answer" in html
    for section in ("toy_llava flow: knockout figures", "toy_llava flow: lensmap figures", "toy_blip flow: knockout"):
        assert section in html
    result = snakemake(flow_workdir, "-n", configfile=flow_workdir / "config.yaml")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr
