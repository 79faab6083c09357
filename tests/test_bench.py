"""`notice.bench`: every family of the family table has a bench layout whose fast rows are exact (checked at a
tiny size, the same code path as the bench's), `--real-size` never starts on a CPU by accident, and the
attribution screen's cost is measured against the same site set patched exactly (BLIP, LLaVA)."""

from __future__ import annotations

import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from notice.bench import cli, measure
from notice.bench.layouts import qwen2_vl as qwen2_vl_layout
from notice.families import family_names
from notice.patching import fast, reference

MODULES = cli.layouts()


def test_every_family_has_a_bench_layout():
    assert list(MODULES) == family_names()  # opt-in adapters included


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
    logits = measure.three_row_patch(case, patches[changed])
    ld = float(logits[case.tau] - logits[case.tau_p])
    assert abs(ld - expected[changed]["ld_patched"]) <= 1e-5 * max(abs(expected[changed]["ld_patched"]), 1.0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_module_sites_include_the_image_markers(family):
    case = qwen2_vl_layout.bench_case(family=family, tiny=True)
    ids = case.clean.input_ids[0].tolist()
    positions = {p.position for p in case.patches if p.head < 0}
    assert {ids.index(qwen2_vl_layout.VISION_START), ids.index(qwen2_vl_layout.VISION_END)} <= positions
    assert positions == {i for i, t in enumerate(ids) if t != qwen2_vl_layout.IMAGE_PAD}


def test_real_size_refuses_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--real-size"])
    message = str(exited.value.code)
    assert "--real-size needs a CUDA GPU" in message and "--device cpu" in message and "\n" not in message


def test_unknown_family_is_an_argument_error():
    with pytest.raises(SystemExit) as exited:
        cli.main(["--families", "nope"])
    assert exited.value.code == 2


@pytest.mark.parametrize("family", sorted(cli.screen_prefixes()))
def test_screen_patches_are_the_screens_patchable_sites(family):
    case = MODULES[family].bench_case(family=family, tiny=True)
    adapter, T = case.adapter, case.clean.input_ids.shape[1]
    patches = measure.screen_patches(adapter, case.clean)
    assert len(set(patches)) == len(patches)
    assert {p.site for p in patches} == {*adapter.module_sites, adapter.head_site}  # no image, query or key site
    assert {p.position for p in patches} == set(range(T))  # image positions included
    n_heads = sum(p.head >= 0 for p in patches)
    assert n_heads == adapter.n_layers * T * adapter.n_heads
    assert len(patches) - n_heads == len(adapter.module_sites) * adapter.n_layers * T


@pytest.mark.parametrize("family", sorted(cli.screen_prefixes()))
def test_tiny_screen_measurement(family):
    case = MODULES[family].bench_case(family=family, tiny=True)
    screen = measure.measure_screen(case, n_patches=16, repeats=1, batch_size=8, seed=0)
    assert screen["t_screen"] > 0 and screen["t_forward"] > 0 and screen["forwards"] > 0
    assert screen["speedup"] > 0 and screen["t_exact"] > 0
    assert screen["n_subset"] == 16 and screen["n_sites"] == len(measure.screen_patches(case.adapter, case.clean))
    assert screen["n_image_rows"] > 0
    assert screen["n_estimates"] == screen["n_sites"] + screen["n_image_rows"] + screen["n_query_key"]
    assert f"{screen['n_sites']} module and head sites" in cli._screen_line(screen)


def _bench_line_fields(line: str) -> dict[str, float]:
    assert line.startswith("bench: ")
    return {key: float(value) for key, value in (entry.split("=") for entry in line.split()[1:])}


def test_bench_line_reports_the_screen_keys():
    results = [
        dict(name="blip", per_hooked=2.0, per_fast=0.1, err=1e-7),
        dict(name="llava", per_hooked=4.0, per_fast=0.1, err=2e-7),
    ]
    screens = [
        dict(name="blip", prefix="blip_", forwards=2.5, speedup=30.0),
        dict(name="llava", prefix="", forwards=3.0, speedup=2000.0),
    ]
    fields = _bench_line_fields(cli.bench_line(results, screens))
    assert fields == {
        "blip_speedup": 20.0,
        "llava_speedup": 40.0,
        "max_rel_err": 2e-7,
        "blip_screen_forwards": 2.5,
        "blip_screen_speedup": 30.0,
        "screen_forwards": 3.0,
        "screen_speedup": 2000.0,
    }
    assert "screen" not in cli.bench_line(results)  # no screen run: the line as before
    # the LLaVA-1.5 layout's screen is the one that gives the unprefixed `screen_speedup=`
    assert cli.screen_prefixes() == {"blip": "blip_", "llava": ""}


def test_main_prints_the_screen_speedup_last(monkeypatch, capsys):
    tiny = {
        family: SimpleNamespace(
            bench_case=partial(MODULES[family].bench_case, tiny=True),
            SCREEN_KEY_PREFIX=MODULES[family].SCREEN_KEY_PREFIX,
        )
        for family in ("blip", "llava")
    }
    monkeypatch.setattr(cli, "layouts", lambda: tiny)
    cli.main(["--families", "blip", "llava", "--hooked", "2", "--three-row", "1", "--screen-patches", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    fields = _bench_line_fields(lines[-1])
    assert {"blip_speedup", "llava_speedup", "max_rel_err", "blip_screen_speedup", "screen_speedup"} <= set(fields)
    assert fields["screen_speedup"] > 0 and fields["screen_forwards"] > 0
    assert any(line.startswith("| llava |") and line.endswith("× |") for line in lines)  # the screen table
