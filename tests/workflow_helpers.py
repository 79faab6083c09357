"""Running the workflow from tests: the repository's Snakefile in a temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


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
