"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd started in a tmp folder.

Everything the daemons write (config, state, spool, logs, pid files, the munge socket and key) stays
under ``root``; client commands find the cluster through ``SLURM_CONF``, so a system Slurm, if any,
is not touched. Needs root (slurmd runs jobs as the submitting user) and the Debian packages
``slurmctld slurmd slurm-client munge``; without them :func:`missing_slurm` says how to install.
The daemons are stopped by their pids at exit, after cancelling every job still queued.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "sacct")
INSTALL_HINT = "apt-get install -y slurmctld slurmd slurm-client munge (as root)"
# Slurm 22.05 holds a requeued job with BeginTime = now + AuthInfo cred_expire + 1 s (default 120:
# two minutes; Slurm >= 23.02 reads SchedulerParameters=requeue_delay first). 5 is the least allowed.
REQUEUE_DELAY = 5


def missing_slurm() -> str | None:
    """Why a local cluster cannot start here (missing binaries, not root), or None if it can."""
    missing = [b for b in BINARIES[:-1] if shutil.which(b) is None]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as the submitting user)"
    return None


FREEZER = Path("/sys/fs/cgroup/freezer")


def missing_cgroup() -> str | None:
    """Why ``proctrack="cgroup"`` cannot run here, or None: it needs a writable cgroup v1 freezer.

    proctrack/cgroup is what most clusters run, and it signals only each task (the process srun
    started), not the task's children, unless the signal is SIGKILL.
    """
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mounted = len(fields) > 3 and fields[1:3] == [str(FREEZER), "cgroup"]
        if mounted and "freezer" in fields[3].split(",") and os.access(FREEZER, os.W_OK):
            return None
    return f"no writable cgroup v1 freezer at {FREEZER}"


@dataclass(slots=True)
class SlurmCluster:
    """Handle on a running local cluster: its folder, config and the environment clients need."""

    root: Path
    conf: Path
    partition: str
    env: dict[str, str] = field(default_factory=dict)
    proctrack: str = "linuxproc"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, squeue...) against this cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def queued_jobs(self) -> list[str]:
        """Job ids (array tasks included) still pending or running."""
        out = self.run("squeue", "--noheader", "--format=%i", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait_idle(self, timeout: float = 180.0) -> None:
        """Block until no job is queued; TimeoutError (with squeue and logs' tail) otherwise."""
        deadline = time.monotonic() + timeout
        while self.queued_jobs():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"jobs still queued after {timeout:.0f}s:\n"
                    f"{self.run('squeue', check=False).stdout}\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stderr", "slurmd.stderr"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _real_memory_mb() -> int:
    # slurmd drains a node that has less memory than configured: declare 90% of MemTotal.
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _write_conf(
    root: Path, munge_socket: Path, partition: str, cpus: int, proctrack: str = "linuxproc"
) -> Path:
    # For the requeue tests (tests/launch/test_slurm_train.py): cred_expire (REQUEUE_DELAY) and a
    # 2 s scheduling pass (default 60 s, backfill 30 s) start a requeued job seconds after its hold
    # instead of minutes; KillWait 10 s (SIGTERM to SIGKILL, default 30); MinJobAge keeps ended
    # jobs in scontrol for 5 minutes; jobcomp/filetxt records every run of a job for `sacct -c`
    # (no slurmdbd here); JobRequeue=1 is the default, spelled out.
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=kfmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/{proctrack}
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MailProg=/bin/true
MinJobAge=300
JobRequeue=1
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    if proctrack == "cgroup":  # slurmd reads cgroup.conf next to slurm.conf
        (root / "cgroup.conf").write_text(
            f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={FREEZER.parent}\nCgroupAutomount=no\n"
        )
    return conf


def _remove_cgroups(node: str = "localhost") -> None:
    """Remove the freezer cgroups slurmd leaves behind (empty once its jobs ended), deepest first."""
    top = FREEZER / f"slurm_{node}"
    if not top.is_dir():
        return
    dirs = [top, *(d for d in top.rglob("*") if d.is_dir())]
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        with suppress(OSError):
            d.rmdir()


def _start_munged(root: Path, mdir: Path) -> subprocess.Popen[bytes]:
    import pwd

    munge = pwd.getpwnam("munge")
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    log = mdir / "munged.log"
    # --force: pytest's tmp folders live under /tmp, whose permissions munged would refuse.
    return subprocess.Popen(
        [
            "munged",
            "--foreground",
            "--force",
            f"--socket={mdir}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={mdir}/munged.pid",
            f"--seed-file={mdir}/munged.seed",
            f"--log-file={log}",
        ],
        user=munge.pw_uid,
        group=munge.pw_gid,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def _wait_for(what: str, ok, timeout: float, cluster: SlurmCluster) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"local Slurm: {what} not ready after {timeout:.0f}s\n{cluster.log_tail()}"
            )
        time.sleep(0.3)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextmanager
def slurm_cluster(
    root: Path,
    *,
    partition: str = "debug",
    cpus: int = 2,
    timeout: float = 60.0,
    proctrack: str = "linuxproc",
) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under ``root``; yield once ``sinfo`` shows the node idle.

    ``proctrack``: ``linuxproc`` (signals reach every process of a step) or ``cgroup`` (signals
    reach only the tasks srun started, as on most clusters; see :func:`missing_cgroup`).
    Raises RuntimeError (with the install hint) when :func:`missing_slurm` says it cannot start,
    TimeoutError with the daemons' log tails when the node does not come up.
    """
    if reason := missing_slurm() or (proctrack == "cgroup" and missing_cgroup()):
        raise RuntimeError(reason)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    # munged runs as the munge user, who cannot enter pytest's 0700 tmp folders: its own /tmp dir.
    mdir = Path(tempfile.mkdtemp(prefix="kfm-munge-"))
    conf = _write_conf(root, mdir / "munge.socket", partition, cpus, proctrack)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, conf=conf, partition=partition, env=env, proctrack=proctrack)
    procs: list[subprocess.Popen[bytes]] = []

    def check_alive() -> None:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}\n{cluster.log_tail()}")

    try:
        procs.append(_start_munged(root, mdir))

        def munge_up() -> bool:
            check_alive()
            return (mdir / "munge.socket").exists()

        _wait_for("munged socket", munge_up, timeout, cluster)
        for cmd in (
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
        ):
            with open(root / f"{cmd[0]}.stderr", "wb") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))

        def node_idle() -> bool:
            check_alive()
            out = cluster.run("sinfo", "--noheader", "--format=%t", check=False).stdout
            return out.strip() == "idle"

        _wait_for("node idle in sinfo", node_idle, timeout, cluster)
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:
            cluster.run("scancel", "--full", f"--partition={partition}", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and cluster.queued_jobs():
                time.sleep(0.3)
        for proc in reversed(procs):  # slurmd, slurmctld, then munged
            _stop(proc)
        shutil.rmtree(mdir, ignore_errors=True)
        if proctrack == "cgroup":
            _remove_cgroups()
