"""`snakemake --lint` has nothing to say about the workflow, and the rules' environment matches the pins."""

from __future__ import annotations

import re

import yaml
from workflow_helpers import REPO, snakemake


def test_snakemake_lint_reports_nothing(tmp_path):
    result = snakemake(tmp_path, "--lint", timeout=300)  # the default config (the embedded demo)
    output = result.stdout + result.stderr
    findings = re.findall(r"^Lints for .*$|^\s+\* .*$", output, re.MULTILINE)
    assert result.returncode == 0 and not findings, "\n".join(findings) or output[-3000:]
    assert "Traceback" not in output


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==(\S+)\s*", line.split("#", 1)[0])
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_the_rules_conda_environment_has_the_pinned_stack():
    env = yaml.safe_load((REPO / "envs/notice.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    assert required, "no pins found in requirements.txt"
    assert pins(pip) == {**required, "torch": "2.13.0"}  # torch: installed apart in the venv (Makefile)
