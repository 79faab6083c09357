"""GPU leases (notice.workflow.gpu) on fake device ids, and the workflow's GPU jobs sharing two fake GPUs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from workflow_helpers import REPO, fault_env, sharded_blip_config, snakemake, write_config

from notice.workflow import gpu

HOLDER = textwrap.dedent(
    """
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from notice.workflow.runtime import resolve_device
    device = resolve_device("auto")
    print("device", device, flush=True)
    time.sleep(float(sys.argv[1]))
    """
)


def fake_env(monkeypatch, lock_dir: Path, n_gpus: int) -> dict:
    """`n_gpus` fake device ids here (monkeypatch) and in subprocesses (the test plugin); their environment."""
    monkeypatch.setattr(gpu, "visible_gpus", lambda: [str(i) for i in range(n_gpus)])
    monkeypatch.setenv(gpu.LOCK_DIR_ENV, str(lock_dir))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return {**os.environ, **fault_env(NOTICE_TEST_FAKE_GPUS=str(n_gpus))}


def start_holder(env: dict, seconds: float) -> subprocess.Popen:
    """A process that takes its job device (through the workflow scripts' resolve_device) and keeps it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(seconds)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    line = process.stdout.readline()
    assert line.startswith("device "), (line, process.stderr.read() if process.poll() is not None else "")
    return process


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    return process.stderr.read()


def test_two_holders_never_get_the_same_device(monkeypatch, tmp_path):
    fake_env(monkeypatch, tmp_path, 2)
    with gpu.leased_gpu() as first, gpu.leased_gpu() as second:
        assert {first.device_id, second.device_id} == {"0", "1"}
        assert {first.device, second.device} == {"cuda:0", "cuda:1"}
        with pytest.raises(TimeoutError, match="no free GPU among"):
            with gpu.leased_gpu(timeout=0.3):
                pass
    with gpu.leased_gpu(timeout=0) as again:  # both released at the end of their blocks
        assert again.device_id == "0"


def test_processes_lease_distinct_devices_and_a_third_waits(monkeypatch, tmp_path):
    env = fake_env(monkeypatch, tmp_path, 2)
    holders = [start_holder(env, 60) for _ in range(2)]
    try:
        with pytest.raises(TimeoutError):
            with gpu.leased_gpu(timeout=0.5):
                pass
    finally:
        logs = [stop(holder) for holder in holders]
    leased = sorted(re.search(r"leased GPU (cuda:\d) \(device id '(\d)'", log).group(2) for log in logs)
    assert leased == ["0", "1"], logs
    assert all("is fake (NOTICE_TEST_FAKE_GPUS): running on the CPU" in log for log in logs)


def test_a_lease_is_released_when_its_process_is_killed(monkeypatch, tmp_path):
    env = fake_env(monkeypatch, tmp_path, 1)
    holder = start_holder(env, 600)
    try:
        with pytest.raises(TimeoutError):
            with gpu.leased_gpu(timeout=0.5):
                pass
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs: only the kernel releases the flock
        holder.wait(timeout=30)
        with gpu.leased_gpu(timeout=5) as lease:
            assert lease.device_id == "0"
    finally:
        stop(holder)


def test_waits_while_all_devices_are_leased(monkeypatch, tmp_path, caplog):
    env = fake_env(monkeypatch, tmp_path, 1)
    holder = start_holder(env, 2.0)
    try:
        caplog.set_level("INFO", logger="notice.workflow.gpu")
        started = time.monotonic()
        with gpu.leased_gpu(timeout=60) as lease:
            waited = time.monotonic() - started
            assert lease.device_id == "0"
            holder.wait(timeout=30)  # the holder was exiting (the kernel drops its flock as it exits)
    finally:
        stop(holder)
    assert waited > 1.5, f"got the device after {waited:.2f} s, while its holder kept it for 2 s"
    assert "are leased" in caplog.text and "waiting for one" in caplog.text


def test_under_slurm_no_lease_is_taken(monkeypatch, tmp_path):
    env = fake_env(monkeypatch, tmp_path, 1)
    holder = start_holder({**env, "SLURM_JOB_ID": "4242", "CUDA_VISIBLE_DEVICES": "3"}, 60)
    try:
        with gpu.leased_gpu(timeout=0) as lease:  # the only (fake) device is still free
            assert lease.device_id == "0"
    finally:
        log = stop(holder)
    assert "SLURM job 4242: CUDA_VISIBLE_DEVICES=3 (the scheduler's choice, no lease)" in log
    assert "leased GPU" not in log


def test_no_gpu_means_the_cpu_and_no_lock(monkeypatch, tmp_path):
    env = fake_env(monkeypatch, tmp_path / "locks", 0)
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", HOLDER, "0"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["device", "cpu"]
    assert "no GPU visible: using the CPU" in result.stderr
    assert not (tmp_path / "locks").exists()


# -- acceptance: the workflow's GPU jobs on a machine with two (fake) GPUs ---------------------------
# Two shards per stage are enough for jobs to hold both fake GPUs at once (each GPU job costs ~8 s of imports).
N_SHARDS = 2
LEASE_TINY = sharded_blip_config(n_scenes=12, n_shards=N_SHARDS)
TARGETS = [f"results/toy_blip/synthetic/patching/{corruption}.parquet" for corruption in LEASE_TINY["corruptions"]]
GPU_RULE_LOGS = ("evaluate", "cache_clean", "patch")
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def lease_intervals(log_dir: Path) -> list[tuple[str, str, datetime, datetime]]:
    """(job log, device id, lease time, last log time) of every GPU job's log."""
    intervals = []
    for rule in GPU_RULE_LOGS:
        for log in sorted((log_dir / rule).rglob("*.log")):
            text = log.read_text()
            lease = re.search(STAMP + r" INFO notice\.workflow\.gpu: leased GPU cuda:\d+ \(device id '(\d+)'", text)
            assert lease, f"{log}: no lease line\n{text[-2000:]}"
            stamps = re.findall(r"^" + STAMP, text, re.MULTILINE)
            intervals.append(
                (str(log.relative_to(log_dir)), lease.group(2), parse_stamp(lease.group(1)), parse_stamp(stamps[-1]))
            )
    return intervals


@pytest.mark.slow
def test_concurrent_gpu_jobs_never_share_a_fake_gpu(monkeypatch, tmp_path):
    locks = tmp_path / "locks"
    work = tmp_path / "work"
    work.mkdir()
    configfile = write_config(work / "config.yaml", LEASE_TINY)
    env = {**fault_env(NOTICE_TEST_FAKE_GPUS="2"), gpu.LOCK_DIR_ENV: str(locks), "CUDA_VISIBLE_DEVICES": ""}
    result = snakemake(work, *TARGETS, "--cores", "4", "--resources", "gpu=2", configfile=configfile, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    intervals = lease_intervals(work / "results/logs")
    # every shard of every GPU stage ran and logged its lease
    assert len(intervals) == N_SHARDS * (1 + 1 + len(LEASE_TINY["corruptions"])), intervals
    assert {device for _, device, _, _ in intervals} == {"0", "1"}
    for i, (log_a, device_a, start_a, end_a) in enumerate(intervals):
        assert start_a <= end_a
        for log_b, device_b, start_b, end_b in intervals[i + 1 :]:
            if device_a == device_b:
                assert end_a < start_b or end_b < start_a, f"{log_a} and {log_b} held GPU {device_a} at once"
    concurrent = [
        (log_a, log_b)
        for i, (log_a, _, start_a, end_a) in enumerate(intervals)
        for log_b, _, start_b, end_b in intervals[i + 1 :]
        if start_a < end_b and start_b < end_a
    ]
    assert concurrent, f"no two GPU jobs ever ran at the same time: {intervals}"
    fake_env(monkeypatch, locks, 2)
    with gpu.leased_gpu(locks, timeout=0) as first, gpu.leased_gpu(locks, timeout=0) as second:
        assert {first.device_id, second.device_id} == {"0", "1"}  # every job gave its lease back


def test_gpu_rules_declare_a_gpu_and_the_configured_threads_memory_and_runtime(tmp_path):
    config = {**LEASE_TINY, "gpu_jobs": {"threads": 3, "mem_mb": 1234, "runtime": 56}}
    result = snakemake(tmp_path, "-n", "--cores", "8", configfile=write_config(tmp_path / "config.yaml", config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", result.stdout + result.stderr)
    seen = set()
    for block in jobs:
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        if not rule:
            continue
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE).group(1)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.MULTILINE)
        if rule.group(1) in {"evaluate_shard", "cache_clean", "patch"}:
            seen.add(rule.group(1))
            assert {"gpu=1", "mem_mb=1234", "runtime=56"} <= set(resources.split(", ")), block
            assert threads and threads.group(1) == "3", block
        elif rule.group(1) in {"prompts", "pairs", "gather_answers", "select_samples", "gather_patching"}:
            assert "gpu=" not in resources, block  # CPU work must not hold up a GPU slot
    assert seen == {"evaluate_shard", "cache_clean", "patch"}


def test_a_bad_gpu_jobs_value_stops_the_run_naming_the_key(tmp_path):
    config = {**LEASE_TINY, "gpu_jobs": {"threads": 0}}
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "gpu_jobs" in output and "threads" in output and "minimum" in output, output[-2000:]


def test_fault_injection_lives_in_the_tests_not_in_the_package():
    sources = [
        path
        for folder in ("notice", "workflow_scripts", "rules")
        for path in (REPO / folder).rglob("*.*")
        if path.suffix in {".py", ".smk"}
    ]
    switches = ("FAKE_GPUS", "FAIL_AT_SAMPLE", "fail_at")
    found = [f"{path}: {s}" for path in sources for s in switches if s in path.read_text()]
    assert not found, found
