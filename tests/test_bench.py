"""`notice.bench`: every family of the family table has a bench layout whose fast rows are exact (checked at a
tiny size, the same code path as the bench's), the fast engine's cost is estimated from whole chunks of the run
`fast.patch_sample` makes, drawn by stratum, and the rows checked are rows it ran, `--real-size` never starts on a
CPU by accident, the attribution screen's cost is measured against the same site set patched exactly (BLIP,
LLaVA), and `--real-size`'s precision audit of a bfloat16 case (the same code path on tiny layouts in bfloat16) is
the float32 recomputation of rows the fast engine ran."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from functools import partial
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from workflow_helpers import REPO

from notice.adapters.base import Patch
from notice.bench import cli, measure
from notice.bench.case import Case, in_dtype
from notice.bench.layouts import qwen2_vl as qwen2_vl_layout
from notice.families import family_names
from notice.method.precision import AUDIT_COLUMNS, AUDIT_ROW_COLUMNS
from notice.patching import fast, reference
from notice.patching.scores import Scores, result_row

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


def test_stratified_chunks_draw_one_chunk_per_stratum_weighed_by_its_stratum():
    rows = [8] * 9 + [3]  # rows of each chunk in run order: 75 rows, the last chunk partial
    drawn = measure.stratified_chunks(rows, 3, seed=0)
    strata = [(0, 3), (3, 7), (7, 10)]  # 3 strata of consecutive chunks
    assert len(drawn) == len(strata)
    for (chunk, weight), (lo, hi) in zip(drawn, strata):
        assert lo <= chunk < hi and weight == sum(rows[lo:hi]) / rows[chunk]
    assert sum(weight * rows[chunk] for chunk, weight in drawn) == pytest.approx(sum(rows))  # each row once
    assert measure.stratified_chunks(rows, 3, seed=0) == drawn  # seeded
    assert len({tuple(measure.stratified_chunks(rows, 3, seed)) for seed in range(8)}) > 1
    every = [(chunk, 1.0) for chunk in range(len(rows))]
    assert measure.stratified_chunks(rows, 10, seed=3) == measure.stratified_chunks(rows, 99, seed=3) == every
    [(chunk, weight)] = measure.stratified_chunks(rows, 1, seed=0)
    assert weight * rows[chunk] == pytest.approx(75)
    assert measure.stratified_chunks([], 3, seed=0) == []
    with pytest.raises(ValueError, match="at least 1"):
        measure.stratified_chunks(rows, 0, seed=0)


@pytest.mark.parametrize("family", ["blip", "llava", "paligemma"])  # the three engines
def test_fast_cost_runs_chunks_of_patch_samples_run(family, monkeypatch):
    case = MODULES[family].bench_case(family=family, tiny=True)
    engine = fast.family_engine(case.adapter)
    run_rows, calls = engine.run_rows, []

    def recorded(self, patches):
        calls.append(list(patches))
        return run_rows(self, patches)

    monkeypatch.setattr(engine, "run_rows", recorded)
    rows = fast.patch_sample(case.adapter, case.clean, case.corrupt, case.patches, case.tau, case.tau_p, batch_size=8)
    full_run = list(calls)
    calls.clear()
    cost = measure.fast_cost(case, case.patches, 3, batch_size=8, seed=0)
    assert cost.n_chunks == len(full_run) > len(cost.chunks_run) == len(calls) == 3
    assert calls == [full_run[chunk] for chunk in cost.chunks_run]  # whole chunks of the full run, in its order
    assert cost.n_noop == len(case.patches) - sum(map(len, full_run))
    assert cost.n_run == sum(map(len, calls)) == len(cost.patched)
    assert {case.patches[i] for i in cost.patched} == {p for chunk in calls for p in chunk}
    for i, patched in cost.patched.items():  # the same rows as the full run's, bit for bit
        assert (rows[i]["ld_patched"], rows[i]["p_patched"]) == patched
    assert (rows[0]["ld_clean"], rows[0]["p_clean"]) == cost.clean
    assert (rows[0]["ld_corrupt"], rows[0]["p_corrupt"]) == cost.corrupt


def test_fast_cost_is_setup_plus_every_stratums_rows(monkeypatch):
    case = MODULES["llava"].bench_case(family="llava", tiny=True)

    def constructed(fn):  # setup 10 s, a chunk 0.5 s per row
        value = fn()
        return value, 0.5 * len(value) if isinstance(value, torch.Tensor) else 10.0

    monkeypatch.setattr(measure, "_timed", constructed)
    cost = measure.fast_cost(case, case.patches, 3, batch_size=8, seed=0)
    n_rows = len(case.patches) - cost.n_noop  # every patch but the no-ops is a row of the full run
    assert cost.n_noop > 0 and cost.n_run < n_rows
    assert cost.t_setup == 10.0 and cost.t_rows == 0.5 * cost.n_run
    assert cost.t_total == pytest.approx(10.0 + 0.5 * n_rows)
    assert cost.per_run == pytest.approx((10.0 + 0.5 * n_rows) / len(case.patches))
    whole = measure.fast_cost(case, case.patches, cost.n_chunks, batch_size=8, seed=0)
    assert whole.n_run == n_rows and whole.t_total == whole.t_setup + whole.t_rows  # the full run itself


@pytest.mark.parametrize("family", ["blip", "llava", "paligemma", "blip2_qformer"])  # the four engines
def test_measure_checks_rows_the_fast_engine_ran(family):
    case = MODULES[family].bench_case(family=family, tiny=True)
    result = measure.measure(case, fast_chunks=2, n_hooked=3, n_three_row=1, batch_size=8, seed=0)
    ran = measure.fast_cost(case, case.patches, 2, batch_size=8, seed=0)  # the same seeded draw
    assert result["n_fast"] == ran.n_run < len(case.patches) - result["n_noop"]
    assert len(result["checked"]) == 3 and set(result["checked"]) <= {case.patches[i] for i in ran.patched}
    assert result["n_hooked"] == 3 and result["n_three"] == 1
    assert result["err"] <= 1e-5 and result["err_three"] <= 1e-5
    assert result["per_fast"] == pytest.approx(result["t_fast"] / len(case.patches))


def test_relative_error_does_not_inflate_a_probability_near_zero():
    # A reference P(τ) of 2e-7 read as 2.5e-7: off by 5e-8, not by 25%; an LD of 1.5 off by 3e-7: 2e-7.
    reference_row = result_row("mlp", 0, -1, 3, "a", Scores(2.0, 0.3), Scores(1.0, 0.2), Scores(1.5, 2e-7))
    row = {**reference_row, "ld_patched": 1.5 + 3e-7, "p_patched": 2.5e-7}
    assert measure.rows_error([row], [reference_row]) == pytest.approx(2e-7)
    assert measure.relative_error(2.5e-7, 2e-7) == pytest.approx(5e-8)
    assert measure.relative_error(-4.0, -4.5) == pytest.approx(0.5 / 4.5)  # relative beyond ±1


def test_real_size_refuses_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--real-size"])
    message = str(exited.value.code)
    assert "--real-size needs a CUDA GPU" in message and "--device cpu" in message and "\n" not in message


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_passes_families(tmp_path):
    def command(*variables: str) -> str:  # what `make bench` would run (-n: nothing is run, the venv neither)
        make = ["make", "-n", "-s", "-C", str(REPO), "bench", f"VENV={tmp_path}", *variables]
        return subprocess.run(make, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]

    assert command("FAMILIES=blip llava") == f"{tmp_path}/bin/python -m notice.bench --families blip llava"
    assert command().endswith("python -m notice.bench")


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
    screen = measure.measure_screen(case, n_chunks=2, repeats=1, batch_size=8, seed=0)
    assert screen["t_screen"] > 0 and screen["t_forward"] > 0 and screen["forwards"] > 0
    assert screen["speedup"] > 0 and screen["t_exact"] > 0
    assert screen["n_sites"] == len(measure.screen_patches(case.adapter, case.clean))
    assert screen["n_chunks_run"] == 2 < screen["n_chunks"] and 2 <= screen["n_subset"] <= 16  # chunks of ≤ 8 rows
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
    audits = [pd.DataFrame({"model": ["llava", "llava"], "site": ["mlp", "self_attn"], "p95": [2e-3, 5e-3]})]
    assert _bench_line_fields(cli.bench_line(results, (), audits)) == {
        "blip_speedup": 20.0,
        "llava_speedup": 40.0,
        "max_rel_err": 2e-7,
        "llava_audit_p95": 5e-3,  # the largest over the family's site kinds
    }
    # the LLaVA-1.5 layout's screen is the one that gives the unprefixed `screen_speedup=`
    assert cli.screen_prefixes() == {"blip": "blip_", "llava": ""}
    knockouts = [dict(prefix="", speedup=25.0)]
    assert _bench_line_fields(cli.bench_line(results, (), (), knockouts))["knockout_speedup"] == 25.0
    assert "knockout" not in cli.bench_line(results, screens)
    assert cli.knockout_prefixes() == {"llava": ""}  # the LLaVA-1.5 layout's knockout sweep: `knockout_speedup=`


def test_the_knockout_sweep_is_checked_against_the_reference():
    case = MODULES["llava"].bench_case(family="llava", tiny=True)
    knockout = measure.measure_knockout(case, MODULES["llava"].KNOCKOUT_QUESTION_TOKENS, 3, 5, seed=0)
    # every default edge at both window starts of a 2-layer model; 3 of them rerun by the reference engine
    assert knockout["n_rows"] == 6 * 2 and knockout["n_reference"] == 3 and knockout["window"] == 1
    assert knockout["err"] <= 1e-5 and knockout["speedup"] > 0


def test_circuits_are_timed_and_the_batched_curve_checked_against_one_forward_per_circuit():
    case = MODULES["llava"].bench_case(family="llava", tiny=True)
    circuit = measure.measure_circuits(case, MODULES["llava"].KNOCKOUT_QUESTION_TOKENS, 2, 4, repeats=1)
    assert circuit["n_edges"] > 0 and circuit["ig_steps"] == 2 and circuit["n_circuits"] == 5  # 0 and 4 sizes
    assert circuit["err"] <= 1e-5 and circuit["forwards"] > 0 and circuit["speedup"] > 0
    line = cli.bench_line(
        [dict(name="llava", per_hooked=1.0, per_fast=1.0, err=0.0)], circuits=[{**circuit, "prefix": ""}]
    )
    fields = _bench_line_fields(line)
    assert fields["eap_ig_forwards"] == round(circuit["forwards"], 1)  # one decimal on the line
    assert fields["faithfulness_speedup"] == round(circuit["speedup"], 1)
    assert cli.circuit_prefixes() == {"llava": ""}


KNOCKOUT_KEYS = ("KNOCKOUT_KEY_PREFIX", "KNOCKOUT_QUESTION_TOKENS", "CIRCUIT_KEY_PREFIX")


def test_main_prints_the_screen_speedup_last(monkeypatch, capsys):
    tiny = {
        family: SimpleNamespace(
            bench_case=partial(MODULES[family].bench_case, tiny=True),
            SCREEN_KEY_PREFIX=MODULES[family].SCREEN_KEY_PREFIX,
            **{key: getattr(MODULES[family], key) for key in KNOCKOUT_KEYS if hasattr(MODULES[family], key)},
        )
        for family in ("blip", "llava")
    }
    monkeypatch.setattr(cli, "layouts", lambda: tiny)
    cli.main(
        ["--families", "blip", "llava", "--fast-chunks", "2", "--hooked", "2", "--three-row", "1"]
        + ["--screen-chunks", "1"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    fields = _bench_line_fields(lines[-1])
    assert {"blip_speedup", "llava_speedup", "max_rel_err", "blip_screen_speedup", "screen_speedup"} <= set(fields)
    assert [key for key in fields if "knockout" in key] == ["knockout_speedup"] and fields["knockout_speedup"] > 0
    assert fields["eap_ig_forwards"] > 0 and fields["faithfulness_speedup"] > 0
    assert fields["screen_speedup"] > 0 and fields["screen_forwards"] > 0
    assert any(line.startswith("| llava |") and line.endswith("× |") for line in lines)  # the screen table
    assert not any("audit" in key for key in fields) and not any("precision audit" in line for line in lines)


def in_bfloat16(case: Case) -> Case:
    """The case with its model and inputs in bfloat16, as `--real-size` builds its cases."""
    case.adapter.model.to(torch.bfloat16)
    return dataclasses.replace(
        case, clean=in_dtype(case.clean, torch.bfloat16), corrupt=in_dtype(case.corrupt, torch.bfloat16)
    )


# The decoder engine (LLaVA), the encoder-decoder one (BLIP), OPT's MLP view (BLIP-2), the Q-Former stream.
@pytest.mark.parametrize("family", ["llava", "blip", "blip2", "blip2_qformer"])
def test_precision_audit_of_a_bfloat16_case_is_its_float32_recomputation(family):
    case = in_bfloat16(MODULES[family].bench_case(family=family, tiny=True))
    config = case.adapter.model.config.to_dict()
    result = measure.measure(case, fast_chunks=2, n_hooked=1, n_three_row=0, batch_size=8, seed=0)
    audited, summary = measure.precision_audit(case, result["fast_rows"], 6, seed=0)
    assert case.adapter.dtype == torch.bfloat16 and case.adapter.model.config.to_dict() == config  # untouched
    assert list(audited.columns) == list(AUDIT_ROW_COLUMNS) and list(summary.columns) == list(AUDIT_COLUMNS)
    ran = measure.results_table(case, result["fast_rows"])
    assert sorted(summary.site) == sorted(ran.site.unique()) and summary.n_rows.sum() == len(ran)
    assert (summary.n_audited >= 1).all() and summary.n_audited.sum() == len(audited) <= max(6, len(summary))
    assert set(summary.dtype) == {"bfloat16"} and set(summary.audit_dtype) == {"float32"}
    assert (summary["max"] >= summary.p95).all() and (summary.p95 >= summary["median"]).all()
    assert (summary["median"] >= 0).all() and summary["max"].max() > 0  # bfloat16 rounds
    keys = ["site", "layer", "head", "position"]
    merged = audited.merge(ran, on=keys, suffixes=("", "_ran"), validate="one_to_one")
    assert len(merged) == len(audited) and (merged.logit_diff == merged.logit_diff_ran).all()  # rows the engine ran
    # The truth, built apart: the float32 layout with its weights rounded to bfloat16, the inputs likewise.
    truth = MODULES[family].bench_case(family=family, tiny=True)
    with torch.no_grad():
        for param in truth.adapter.model.parameters():
            param.copy_(param.to(torch.bfloat16))
    clean, corrupt = (in_dtype(in_dtype(i, torch.bfloat16), torch.float32) for i in (truth.clean, truth.corrupt))
    patches = [Patch(r.site, r.layer, r.position, r.head) for r in audited.itertuples()]
    exact = reference.patch_sample(truth.adapter, clean, corrupt, patches, truth.tau, truth.tau_p)
    assert audited.logit_diff_float32.tolist() == pytest.approx([r["logit_diff"] for r in exact], rel=1e-6, abs=1e-7)
    assert (audited.abs_error == (audited.logit_diff - audited.logit_diff_float32).abs()).all()


def test_real_size_prints_the_precision_audit(monkeypatch, capsys):
    def bfloat16_case(real_size: bool, *, family: str, device: str) -> Case:
        assert real_size and device == "cpu"
        return in_bfloat16(MODULES[family].bench_case(family=family, tiny=True, device=device))

    monkeypatch.setattr(cli, "layouts", lambda: {"llava": SimpleNamespace(bench_case=bfloat16_case)})
    cli.main(["--real-size", "--device", "cpu", "--families", "llava", "--fast-chunks", "2", "--audit-rows", "6"])
    lines = capsys.readouterr().out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  precision audit: "))
    sites = [line.strip() for line in lines[start + 1 :] if line.startswith("    ")]
    assert sites and all("|logit_diff - float32| median" in line and "(bfloat16 on cpu)" in line for line in sites)
    table = [line for line in lines if line.startswith("| llava | ")]
    assert len(table) == len(sites) + 1  # the real-size table's row and one row per site kind
    fields = _bench_line_fields(lines[-1])
    p95s = [float(line.split("p95 ")[1].split(",")[0]) for line in sites]
    assert fields["llava_audit_p95"] == pytest.approx(max(p95s), rel=0.05) and fields["llava_audit_p95"] > 0
