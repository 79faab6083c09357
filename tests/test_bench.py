"""`notice.bench`: every registered family has a bench layout whose fast rows are exact (checked at a
tiny size, the same code path as the bench's), and `--real-size` never starts on a CPU by accident."""

from __future__ import annotations

import random

import pytest
import torch

from notice import bench
from notice.adapters import qwen2_vl_bench
from notice.adapters.base import ADAPTER_FAMILIES
from notice.patching import fast, reference

MODULES = bench.bench_modules()


def test_every_registered_family_has_a_bench_module():
    assert set(MODULES) == set(ADAPTER_FAMILIES)  # opt-in adapters included


@pytest.mark.parametrize("family", list(MODULES))
def test_tiny_case_rows_equal_reference(family):
    case = MODULES[family].bench_case(family=family, tiny=True)
    assert case.name == family and case.adapter.family == family
    patches = random.Random(0).sample(case.patches, 12)
    rows = fast.patch_sample(case.adapter, case.clean, case.corrupt, patches, case.tau, case.tau_p)
    expected = reference.patch_sample(case.adapter, case.clean, case.corrupt, patches, case.tau, case.tau_p)
    assert any(r["ld_patched"] != r["ld_corrupt"] for r in expected)  # the sample patches something
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5
    # (b)'s batched rows: the patched row is the same run.
    changed = next(i for i, r in enumerate(expected) if r["ld_patched"] != r["ld_corrupt"])
    logits = bench.three_row_patch(case, patches[changed])
    ld = float(logits[case.tau] - logits[case.tau_p])
    assert abs(ld - expected[changed]["ld_patched"]) <= 1e-5 * max(abs(expected[changed]["ld_patched"]), 1.0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_module_sites_include_the_image_markers(family):
    case = qwen2_vl_bench.bench_case(family=family, tiny=True)
    ids = case.clean.input_ids[0].tolist()
    positions = {p.position for p in case.patches if p.head < 0}
    assert {ids.index(qwen2_vl_bench.VISION_START), ids.index(qwen2_vl_bench.VISION_END)} <= positions
    assert positions == {i for i, t in enumerate(ids) if t != qwen2_vl_bench.IMAGE_PAD}


def test_real_size_refuses_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--real-size"])
    message = str(exited.value.code)
    assert "--real-size needs a CUDA GPU" in message and "--device cpu" in message and "\n" not in message


def test_unknown_family_is_an_argument_error():
    with pytest.raises(SystemExit) as exited:
        bench.main(["--families", "nope"])
    assert exited.value.code == 2
