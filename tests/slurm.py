"""A throwaway single-node Slurm for tests: its own munged, slurmctld and slurmd, on free ports
of this host, with every file in a temporary folder; stopped (with the jobs it ran) when the
`with` block ends. Debian's packages (`make slurm`) run it by hand, without systemd.

    with slurm_cluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env)   # SLURM_CONF points to it
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def slurm_missing() -> str | None:
    """What this host lacks to run the throwaway Slurm, or None."""
    missing = [name for name in DAEMONS if not shutil.which(name) and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        return f"{', '.join(missing)} not installed: run `make slurm` (apt-get install slurmctld slurmd slurm-client munge)"
    if not Path("/etc/munge/munge.key").is_file():
        return "/etc/munge/munge.key is missing: reinstall Debian's munge package"
    return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    env: dict
    munge_socket: Path

    def squeue(self, job_id: str) -> list[str]:
        """`ID STATE` of the job's tasks still queued or running (array tasks one per line)."""
        out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n") if out.returncode == 0 and out.stdout.strip() else []


def _write_conf(folder: Path, munge_socket: Path) -> Path:
    host = socket.gethostname()
    spool, state = folder / "spool", folder / "state"
    spool.mkdir()
    state.mkdir()
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=vaelabtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=10",  # a requeued task may start 10 s after, not 120
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={spool}/slurmd-%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerParameters=sched_interval=1",  # start queued (and requeued) tasks within seconds
        "MessageTimeout=10",
        "KillWait=10",
        "MinJobAge=300",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        "",
    ]))
    return conf


@contextlib.contextmanager
def slurm_cluster(folder: Path, timeout: float = 60):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    munge_dir = Path(tempfile.mkdtemp(prefix="vae_lab-munge-"))  # short: a socket path fits 107 bytes
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    os.chmod(munge_dir, 0o755)
    munge_socket = munge_dir / "munge.socket"
    conf = _write_conf(folder, munge_socket)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [_binary("munged"), "--foreground", f"--socket={munge_socket}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user="munge", group="munge", extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True))
        _wait_for(lambda: munge_socket.exists(), timeout, "munged", munge_dir / "munged.log")
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([_binary(daemon), "-D", "-f", str(conf)], env=env,
                                            stdout=open(folder / f"{daemon}.out", "w"), stderr=subprocess.STDOUT,
                                            start_new_session=True))
        cluster = SlurmCluster(folder, conf, env, munge_socket)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated")

        _wait_for(node_idle, timeout, "slurmd", folder / "slurmd.log", folder / "slurmctld.log")
        yield cluster
    finally:
        for process in reversed(started):  # slurmd first: it kills the jobs it runs
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        shutil.rmtree(munge_dir, ignore_errors=True)


def _wait_for(ready, timeout: float, what: str, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s:\n" + "\n".join(_tail(log) for log in logs))
