"""Which GPU a job uses.

Snakemake's `--resources gpu=N` only counts GPUs; it never says which card a local job should use. On
one machine each GPU job therefore leases a device: an exclusive `flock` on `<lock_dir>/gpu<id>.lock`,
which the kernel releases when the process exits, however it exits. Under SLURM the scheduler already
chose the job's GPUs (its `CUDA_VISIBLE_DEVICES`), so no lease is taken. With no GPU, jobs use the CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("notice.workflow.gpu")

LOCK_DIR_ENV = "NOTICE_GPU_LOCK_DIR"
POLL_SECONDS = 0.2

# The lease of this process (see `job_device`): its lock file stays open until the process exits.
_process_device: str | None = None
_process_lease: contextlib.ExitStack | None = None


def default_lock_dir() -> Path:
    """Machine-wide, so separate Snakemake runs on one workstation also share the GPUs fairly."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "notice-gpu-locks")


def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def visible_gpus() -> list[str]:
    """Ids of the devices this process may lease: CUDA_VISIBLE_DEVICES entries, or torch's count."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch  # only here: the lease logic itself must not pay for importing torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _lock_path(lock_dir: Path, device_id: str) -> Path:
    return lock_dir / f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', device_id)}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when another process (or fd) holds it."""
    # Read-only is enough for flock and lets other users' jobs open a lock file they do not own.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _make_lock_dir(lock_dir: Path) -> None:
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            lock_dir.chmod(0o1777)  # like /tmp: every user's jobs can add lock files


@dataclass(frozen=True)
class Lease:
    index: int  # position among the visible devices: torch's device index
    device_id: str  # the CUDA_VISIBLE_DEVICES entry
    lock: Path

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


@contextlib.contextmanager
def leased_gpu(lock_dir: str | os.PathLike | None = None, timeout: float | None = None) -> Iterator[Lease | None]:
    """Hold one visible GPU for the duration of the block; None when no GPU is visible.

    Waits while every device is leased; raises TimeoutError after `timeout` seconds (None: for ever).
    """
    devices = visible_gpus()
    if not devices:
        yield None
        return
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_lock_dir(lock_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting_logged = False
    while True:
        for index, device_id in enumerate(devices):
            lock = _lock_path(lock_dir, device_id)
            fd = _try_lock(lock)
            if fd is not None:
                try:
                    yield Lease(index, device_id, lock)
                finally:
                    os.close(fd)  # closing the last fd of the open file releases the flock
                return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU among {devices} after {timeout} s (locks in {lock_dir})")
        if not waiting_logged:
            log.info("all GPUs %s are leased (locks in %s); waiting for one", devices, lock_dir)
            waiting_logged = True
        time.sleep(POLL_SECONDS)


def use_leased_device(lease: Lease) -> str:
    """Make the leased GPU this process's default CUDA device (stray allocations land on it too)."""
    import torch

    torch.cuda.set_device(lease.index)
    return lease.device


def job_device(lock_dir: str | os.PathLike | None = None, timeout: float | None = None) -> str:
    """The torch device of this job, leased for the rest of the process and logged; idempotent.

    Local GPUs: a lease, then `torch.cuda.set_device` so stray allocations land on it too. Under SLURM:
    the scheduler's CUDA_VISIBLE_DEVICES, no lease. No GPU: the CPU.
    """
    global _process_device, _process_lease
    if _process_device is not None:
        return _process_device
    import torch

    if under_slurm():
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        log.info(
            "SLURM job %s: CUDA_VISIBLE_DEVICES=%s (the scheduler's choice, no lease); using %s",
            os.environ["SLURM_JOB_ID"],
            os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
            device,
        )
    else:
        stack = contextlib.ExitStack()
        lease = stack.enter_context(leased_gpu(lock_dir, timeout))
        if lease is None:
            stack.close()
            device = "cpu"
            log.info("no GPU visible: using the CPU")
        else:
            _process_lease = stack
            log.info("leased GPU %s (device id %r, lock %s)", lease.device, lease.device_id, lease.lock)
            device = use_leased_device(lease)
    _process_device = device
    return device
