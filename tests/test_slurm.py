"""The workflow through profiles/slurm on a real one-node SLURM cluster started on 127.0.0.1.

The node has two GPUs (gres) whose device files are links to /dev/null: SLURM refuses GPUs without
files, and the jobs run on the CPU anyway. It needs root and the Debian packages slurmctld, slurmd,
slurm-client and munge; the test installs them with apt-get when they are missing, and is skipped
(with the reason) where it cannot.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from workflow_helpers import REPO, sharded_blip_config, snakemake, write_config

pytestmark = pytest.mark.slow

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "sinfo"]
PARTITION = "notice_test"
NODE = "notice-node"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
GPU_RULES = {"evaluate_shard", "cache_clean", "patch", "inpaint_sip", "attention_patterns"}


def ensure_slurm_installed() -> None:
    """apt-get install the packages when a binary is missing; skip (with the reason) where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("SLURM test needs root (to run slurmctld/slurmd/munged and install their packages)")
    if all(shutil.which(binary) for binary in BINARIES):
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"SLURM test needs apt-get to install {PACKAGES} (not a Debian-like system)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # stale package lists: update once, then retry
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        pytest.skip(f"SLURM test: `{' '.join(install)}` failed (rc {result.returncode}): {result.stderr[-500:]}")
    missing = [binary for binary in BINARIES if not shutil.which(binary)]
    assert not missing, f"installed {PACKAGES} but {missing} are still not on PATH"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_alive(process: subprocess.Popen) -> bool:
    """Running, not a zombie: the state in /proc (this sandbox's PID 1 does not reap, `kill -0` lies)."""
    if process.poll() is not None:
        return False
    return pid_running(process.pid)


def proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def pid_running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in {"Z", "X"}


def session_members(session: int) -> list[int]:
    """Live processes of a session (field 6 of /proc/<pid>/stat): a daemon started as its leader and its children."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and int(stat[3]) == session and stat[0] not in {"Z", "X"}:
                members.append(int(entry.name))
    return members


class Cluster:
    """munged, slurmctld and slurmd in the foreground, children of this process (stopped by pid)."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        for sub in ("state", "spool", "log", "run", "dev"):
            (root / sub).mkdir(parents=True)
        self.munge_socket = root / "run/munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.port = free_port()
        self.installed_conf = False

    def write_config(self) -> None:
        for index in range(2):  # SLURM needs a device file per GPU: stand-ins
            (self.root / f"dev/nvidia{index}").symlink_to("/dev/null")
        memory_mb = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 * 0.8)
        cpus = os.cpu_count() or 1
        root = self.root
        self.conf.write_text(f"""\
ClusterName=noticetest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={self.port}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
DefMemPerCPU=500
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
        (root / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File={root}/dev/nvidia[0-1]\n")
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def start(self, name: str, command: list[str], env: dict | None = None) -> None:
        with open(self.root / f"log/{name}.out", "w") as log:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True
            )

    def wait_for(self, what: str, check, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, process in self.processes.items() if not process_alive(process)]
            assert not dead, f"{dead} exited while waiting for {what}:\n{self.logs()}"
            if check():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted((self.root / "log").iterdir())
        )

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)

    def up(self) -> None:
        self.write_config()
        # The srun inside each job runs without SLURM_CONF (the jobstep plugin drops SLURM_* variables),
        # so it reads the default config file: ours, for the test's lifetime (see `down`).
        shutil.copyfile(self.conf, SYSTEM_CONF)
        self.installed_conf = True
        root = self.root
        self.start(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={root}/munge.key",
                f"--pid-file={root}/run/munged.pid",
                f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/run/munged.seed",
            ],
        )
        self.wait_for("munged's socket", self.munge_socket.exists)
        self.start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.wait_for("slurmctld", lambda: self.run("scontrol", "ping").returncode == 0)
        self.start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])

        def node_idle() -> bool:
            state = self.run("sinfo", "-h", "-n", NODE, "-o", "%T").stdout.strip()
            if state.startswith(("drain", "down")):
                self.run("scontrol", "update", f"nodename={NODE}", "state=resume")
            return state == "idle"

        self.wait_for("the node to be idle", node_idle)

    def down(self) -> None:
        """Stop the daemons this test started (by pid), newest first, reap them, then their helpers."""
        helpers = []
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            helpers += [pid for pid in session_members(process.pid) if pid != process.pid]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=20)
            assert not process_alive(process), f"{name} (pid {process.pid}) is still running"
        deadline = time.monotonic() + 10
        while (left := [pid for pid in helpers if pid_running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # e.g. slurmscriptd, a slurmstepd: started by our daemons, in their sessions
            os.kill(pid, signal.SIGKILL)
        if self.installed_conf and SYSTEM_CONF.read_text() == self.conf.read_text():
            SYSTEM_CONF.unlink()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_slurm_installed()
    if SYSTEM_CONF.exists():
        pytest.skip(f"{SYSTEM_CONF} exists: this machine has its own SLURM, which a test cluster would disturb")
    if not SYSTEM_CONF.parent.is_dir():
        SYSTEM_CONF.parent.mkdir(parents=True)
    # munged refuses world-writable parent directories; pytest's are 0700 below /tmp
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


N_SHARDS = 2
SLURM_TINY = sharded_blip_config(n_scenes=8, n_shards=N_SHARDS)
# Built locally first (CPU work); the SLURM run then does the per-sample GPU stages and their gathers.
LOCAL_TARGET = "results/toy_blip/synthetic/prompts.parquet"
SLURM_TARGET = "results/toy_blip/synthetic/answers.parquet"


def slurm_test_profile(tmp_path: Path) -> Path:
    """profiles/slurm/config.yaml with only the partition and the timings changed for this cluster."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    test = copy.deepcopy(profile)
    test["default-resources"]["slurm_partition"] = PARTITION
    for resources in test["set-resources"].values():
        if "slurm_partition" in resources:
            resources["slurm_partition"] = PARTITION
    test["slurm-init-seconds-before-status-checks"] = 2
    test["latency-wait"] = 5
    changed = {key for key in profile if profile[key] != test[key]}
    assert changed <= {"default-resources", "set-resources", "slurm-init-seconds-before-status-checks", "latency-wait"}
    directory = tmp_path / "profile"
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    return directory


def slurm_jobs(cluster: Cluster) -> list[dict[str, str]]:
    """`scontrol show job` of every job the controller still knows (finished ones stay MinJobAge)."""
    output = cluster.run("scontrol", "-o", "show", "job").stdout
    jobs = []
    for line in output.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields:
            jobs.append(fields)
    return jobs


def test_gpu_rules_are_submitted_with_a_gpu_and_use_the_scheduler_s(cluster, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    configfile = write_config(work / "config.yaml", SLURM_TINY)
    local = snakemake(work, LOCAL_TARGET, "--cores", "2", configfile=configfile, timeout=600)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    profile = slurm_test_profile(tmp_path)
    started = time.monotonic()
    result = snakemake(
        work,
        SLURM_TARGET,
        "--profile",
        str(profile),
        configfile=configfile,
        env={"SLURM_CONF": str(cluster.conf)},
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:] + cluster.logs()
    print(f"SLURM part of the workflow: {time.monotonic() - started:.0f} s")
    assert (work / SLURM_TARGET).exists()

    # Snakemake's own plan ran through the plugin: one SLURM job per Snakemake job.
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", output)
    assert len(submitted) == N_SHARDS + 1, output[-3000:]  # evaluate_shard x N, gather_answers

    jobs = {job["JobId"]: job for job in slurm_jobs(cluster)}
    assert set(submitted) <= set(jobs), (submitted, sorted(jobs))
    gpu_jobs = 0
    for job_id in submitted:
        job = jobs[job_id]
        assert job["JobState"] == "COMPLETED", job
        assert job["Partition"] == PARTITION
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", job.get("Comment", "")).group(1)
        asked_gpu = "gres/gpu=1" in job.get("TRES", "") or "gpu:1" in job.get("TresPerJob", "")
        assert asked_gpu == (rule in GPU_RULES), f"{rule}: GPU request {asked_gpu} ({job})"
        gpu_jobs += asked_gpu
    assert gpu_jobs == N_SHARDS

    for index in range(N_SHARDS):
        log = (work / f"results/logs/evaluate/toy_blip/synthetic/shard{index}-of{N_SHARDS}.log").read_text()
        # the GPU SLURM gave the job, taken as is: no local lease under SLURM
        assert re.search(r"SLURM job \d+: CUDA_VISIBLE_DEVICES=\d \(the scheduler.s choice, no lease\)", log), log
        assert "leased GPU" not in log
