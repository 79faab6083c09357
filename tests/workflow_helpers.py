"""Running the workflow from tests: the Snakefile in a temporary working directory; reading its dry-run plans."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def fault_env(**switches: str) -> dict[str, str]:
    """Environment of a workflow run with the test-only fault-injection plugin (tests/plugins) loaded in
    every Python process, and its switches, e.g. NOTICE_TEST_FAKE_GPUS="2"."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "plugins"), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **switches}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 1200, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's workflow with `workdir` as working directory."""
    command = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    if configfile is not None:
        command += ["--configfile", str(configfile)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def planned(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in a dry run's output."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        if rule:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
            pairs = [item.split("=", 1) for item in wildcards.group(1).split(", ")] if wildcards else []
            jobs.append((rule.group(1), dict(pairs)))
    return jobs


def planned_jobs(output: str) -> dict[str, int]:
    """Snakemake's own 'Job stats' table of a dry run: rule -> count."""
    stats = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)
        if m.group(1) != "total"
    }


SYNTHETIC_TASKS = {
    "colour": {"question": "is the {subject} {a} or {b}?", "values": ["red", "green", "blue", "yellow", "purple"]},
    "shape": {"question": "is the {subject} a {a} or a {b}?", "values": ["circle", "square", "triangle", "cross"]},
}


def synthetic_dataset(n_scenes: int, threshold: float = 0.88) -> dict:
    """A config section for the embedded synthetic dataset with both tasks."""
    return {
        "kind": "synthetic",
        "n_scenes": n_scenes,
        "tasks": copy.deepcopy(SYNTHETIC_TASKS),
        "distractors": {"cosine_threshold": threshold},
    }


def sharded_blip_config(n_scenes: int, n_shards: int) -> dict:
    """The smallest run through the GPU stages: one briefly trained toy BLIP, SIP, module sites only."""
    return {
        "seed": 0,
        "datasets": {"synthetic": synthetic_dataset(n_scenes)},
        # Trained just enough to answer some samples of both tasks right (a task with no right answer
        # stops selection: selection.min_per_task).
        "models": {
            "toy_blip": {
                "train": {
                    "family": "blip",
                    "dataset": "synthetic",
                    "steps": 120,
                    "batch_size": 32,
                    "seed": 0,
                    "n_train_images": 2000,
                    "n_eval_images": 20,
                }
            }
        },
        "corruptions": {"sip": {}},
        "selection": {"n_per_task": 2},
        "sharding": {"n_shards": n_shards},
        "gpu_jobs": {"threads": 1, "mem_mb": 1000, "runtime": 10},
        "patching": {"engine": "reference", "head_sites": False},
        "analysis": {"bootstrap_draws": 5},
    }
