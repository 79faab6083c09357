"""Test-only fault injection for workflow runs: put this folder on PYTHONPATH (`fault_env`).

Every Python process of the run (Snakemake and each job's script) imports it at start. The switches
are read here, never by the `notice` package:
- NOTICE_TEST_FAKE_GPUS=N: the GPU lease logic sees N device ids, and a leased "GPU" runs on the CPU;
- NOTICE_TEST_FAIL_AT_SAMPLE=<sample_id>: patching a shard that holds this sample fails.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

FAKE_GPUS = "NOTICE_TEST_FAKE_GPUS"
FAIL_AT_SAMPLE = "NOTICE_TEST_FAIL_AT_SAMPLE"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `fn(module)` once `name` has been imported (heavy modules stay unimported until used)."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn = name, fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.fn(module)

        spec.loader.exec_module = exec_module
        return spec


def _fake_gpus(gpu, n: int) -> None:
    gpu.visible_gpus = lambda: [str(i) for i in range(n)]

    def use_the_cpu(lease) -> str:
        logging.getLogger("notice.workflow.gpu").info(
            "device id %r is fake (%s): running on the CPU", lease.device_id, FAKE_GPUS
        )
        return "cpu"

    gpu.use_leased_device = use_the_cpu


def _fail_at(experiment, sample_id: str) -> None:
    patch_pairs = experiment.patch_pairs

    def failing(adapter, pairs, *args, **kwargs):
        if sample_id in set(pairs["sample_id"].astype(str)):
            raise RuntimeError(f"failing on purpose at sample {sample_id} ({FAIL_AT_SAMPLE})")
        return patch_pairs(adapter, pairs, *args, **kwargs)

    experiment.patch_pairs = failing


if os.environ.get(FAKE_GPUS):
    sys.meta_path.insert(0, _AfterImport("notice.workflow.gpu", lambda m: _fake_gpus(m, int(os.environ[FAKE_GPUS]))))
if os.environ.get(FAIL_AT_SAMPLE):
    sys.meta_path.insert(
        0, _AfterImport("notice.patching.experiment", lambda m: _fail_at(m, os.environ[FAIL_AT_SAMPLE]))
    )
