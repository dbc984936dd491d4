"""A real one-node Slurm cluster for tests: Debian's ``slurm-wlm`` + ``munge``, config in a temp folder.

:func:`ensure_packages` installs them with ``apt-get`` when we are root (returns a skip reason otherwise);
:func:`start_cluster` starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground of child processes (so
their pids are ours), waits for the node to be idle and returns the environment clients need (``SLURM_CONF``);
:func:`stop_cluster` stops exactly those pids.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
PACKAGES = ("slurm-wlm", "munge")


def _have_all() -> bool:
    return all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in BINARIES)


def ensure_packages() -> Optional[str]:
    """Install ``slurm-wlm`` and ``munge`` if missing; None when ready, else the reason why not."""
    if _have_all():
        return None
    if os.geteuid() != 0:
        return "Slurm test needs root to apt-get install slurm-wlm munge (not root)"
    if not shutil.which("apt-get"):
        return "Slurm test needs apt-get to install slurm-wlm munge (no apt-get on this machine)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            return f"apt-get install slurm-wlm munge failed: {res.stderr.strip().splitlines()[-1:]}"
    return None if _have_all() else "slurm-wlm/munge installed but their binaries are missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    folder: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log(self, name: str) -> str:
        path = os.path.join(self.folder, f"{name}.log")
        return open(path).read() if os.path.isfile(path) else ""


def write_conf(folder: str, host: str, cpus: int, munge_socket: str) -> str:
    lines = [
        "ClusterName=crofttest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        "SchedulerParameters=sched_interval=2", "MinJobAge=600", "SlurmctldTimeout=30", "SlurmdTimeout=30",
        "InactiveLimit=0", "KillWait=5", "JobRequeue=1", "PlugStackConfig=/dev/null",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    for d in ("state", "spool"):
        os.makedirs(os.path.join(folder, d), exist_ok=True)
    path = os.path.join(folder, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start_cluster(folder: str, cpus: int = 2, timeout: float = 60.0) -> Cluster:
    """Start munged, slurmctld and slurmd for a one-node cluster; raises RuntimeError with their logs."""
    host = socket.gethostname().split(".")[0]
    sock = os.path.join(folder, "munge.socket")
    key = os.path.join(folder, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    conf = write_conf(folder, host, cpus, sock)
    env = dict(os.environ, SLURM_CONF=conf)
    cluster = Cluster(folder, env)
    out = open(os.path.join(folder, "daemons.out"), "w")
    cluster.procs.append(subprocess.Popen(
        [_sbin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
         f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed"],
        stdout=out, stderr=out))
    _wait_for(lambda: os.path.exists(sock), 20, cluster, "munged socket")
    cluster.procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-c", "-f", conf], env=env, stdout=out,
                                          stderr=out))
    _wait_for(lambda: _ok(["scontrol", "ping"], env), timeout, cluster, "slurmctld")
    cluster.procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-f", conf, "-N", host], env=env, stdout=out,
                                          stderr=out))
    _wait_for(lambda: "idle" in _out(["sinfo", "-h", "-o", "%t"], env), timeout, cluster, "slurmd (node idle)")
    return cluster


def _ok(cmd: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def _out(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True).stdout


def _wait_for(cond, timeout: float, cluster: Cluster, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        dead = [p for p in cluster.procs if p.poll() is not None]
        if dead:
            break
        time.sleep(0.3)
    stop_cluster(cluster)
    logs = "\n".join(f"--- {n}\n{cluster.log(n)[-1500:]}" for n in ("munged", "slurmctld", "slurmd", "daemons"))
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{logs}")


def _cluster_pids(conf: str) -> list[int]:
    """Pids of processes that run under this cluster's ``SLURM_CONF`` (job steps outlive slurmd)."""
    tag = f"SLURM_CONF={conf}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:
            continue
    return pids


def stop_cluster(cluster: Cluster) -> None:
    """Cancel the jobs, stop the daemons this cluster started (by pid, slurmd first), then any job step left."""
    conf = cluster.env.get("SLURM_CONF", "")
    if cluster.procs and conf:
        subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True)
    for p in reversed(cluster.procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    cluster.procs.clear()
    for pid in _cluster_pids(conf) if conf else []:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
