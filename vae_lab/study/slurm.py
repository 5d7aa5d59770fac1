"""Studies on Slurm: one job array of workers, submitted through submitit.

    options = slurm_options("partition=gpu,time=04:00:00,gpus_per_task=1")   # ConfigError if unknown
    check_can_submit(settings, storage_given=True)                           # before anything is created
    array = submit_array(settings, workers=32, options=options, folder=logs) # returns at once
    wait_for_array(array, bar)                                               # --wait: follow it

Each array task runs `array_task(settings)`: the same worker loop as a local worker
(`runner.run_study`), so grid claims, retries and resumes are the storage's as ever. On the signal
Slurm sends before a time limit (`--signal=USR2@90`, submitit's default; USR1 too) the task stops
like Ctrl-C stops a worker (its trials' runs end KILLED and are queued again, to continue from
their last finished epoch's checkpoint) and requeues itself (`scontrol requeue`). On SIGTERM
(preemption, or `scancel`) it stops the same way and leaves requeuing to Slurm: a preempted job
on a partition with PreemptMode=REQUEUE comes back by itself, a cancelled one stays cancelled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vae_lab.config import ConfigError
from vae_lab.study import storage as store
from vae_lab.study.session import SweepSettings
from vae_lab.study.workers import slurm_task
from vae_lab.tracking.uris import redact, sqlite_path

# set by vae_lab from --workers, the log folder and the warning signal: not a --slurm option
RESERVED_OPTIONS = {"array": "--workers", "output": "--slurm-folder", "error": "--slurm-folder",
                    "signal": "signal_delay_s (seconds before the time limit)", "open_mode": None,
                    "wrap": None, "parsable": None}
INT_OPTIONS = ("array_parallelism", "signal_delay_s", "nodes")
# the stores' real URIs travel to the tasks in the environment (sbatch --export=ALL), not in the
# job's pickle on the shared filesystem, when they hold a password
SECRET_TRACKING_ENV, SECRET_STORAGE_ENV = "VAE_LAB_SLURM_TRACKING_URI", "VAE_LAB_SLURM_STORAGE_URL"
SQUEUE_EVERY_SECONDS = 5.0


def require_submitit():
    try:
        import submitit
    except ModuleNotFoundError:
        raise ConfigError("--launcher slurm needs submitit: pip install -e \".[cluster]\"") from None
    return submitit


def minutes(value: str) -> int:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise ConfigError(f"--slurm time={value!r} is not a time limit (allowed: MINUTES, HH:MM:SS, D-HH:MM:SS)")
    days, first, second, third = (int(part) if part else None for part in match.groups())
    if days is not None:  # D-H[:M[:S]]
        hours, mins, secs = first, second or 0, third or 0
    elif third is not None:  # H:M:S
        hours, mins, secs = first, second, third
    else:  # M or M:S
        hours, mins, secs = 0, first, second or 0
    total = ((days or 0) * 24 + hours) * 60 + mins + (1 if secs else 0)
    if total < 1:
        raise ConfigError(f"--slurm time={value!r} is shorter than a minute")
    return total


def sbatch_options() -> set[str]:
    """The long options this cluster's sbatch knows (from `sbatch --help`), with _ for -; empty
    when it cannot say (it reads the cluster's configuration even for --help)."""
    try:
        text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {name.replace("-", "_") for name in re.findall(r"--([a-z][a-z0-9-]+)", text)}


def submitit_parameters() -> set[str]:
    """The parameters submitit's SlurmExecutor takes, as the error for an unknown one lists them."""
    submitit = require_submitit()
    try:
        submitit.SlurmExecutor(folder=Path.cwd()).update_parameters(vae_lab_no_such_option=1)
    except ValueError as error:
        return set(re.findall(r"- (\w+) \(default", str(error))) - {"additional_parameters"}
    return set()


def slurm_options(text: str) -> dict:
    """`--slurm key=value,key=value,flag` as submitit's SlurmExecutor parameters: its own names
    (partition, time, gpus_per_task, cpus_per_task, mem, array_parallelism, ...) as they are, any
    other option sbatch knows under `additional_parameters`. A comma inside [...] (a node list)
    does not split. One line (ConfigError) for an option neither knows."""
    known = submitit_parameters()
    parameters: dict = {}
    extra: dict = {}
    sbatch_known: set[str] | None = None
    for item in re.split(r",(?![^\[]*\])", text):
        if not item.strip():
            continue
        key, has_value, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        value = value.strip() if has_value else True
        if key in RESERVED_OPTIONS:
            instead = RESERVED_OPTIONS[key]
            raise ConfigError(f"--slurm {key} is set by vae_lab" + (f"; use {instead}" if instead else ""))
        if key == "time":
            parameters["time"] = minutes(str(value))
        elif key in INT_OPTIONS:
            if not str(value).isdigit() or int(value) < 1:
                raise ConfigError(f"--slurm {key}={value} must be a whole number, 1 or more")
            parameters[key] = int(value)
        elif key in known:
            parameters[key] = value
        else:
            if sbatch_known is None:
                sbatch_known = sbatch_options()
            if sbatch_known and key not in sbatch_known:  # (when sbatch cannot list them, it judges at submission)
                raise ConfigError(f"--slurm {key}: not an option of sbatch (allowed: {', '.join(sorted(known))}, "
                                  "or any other long option of `sbatch --help`)")
            extra[key.replace("_", "-")] = value
    if extra:
        parameters["additional_parameters"] = extra
    return parameters


def check_can_submit(settings: SweepSettings, storage_given: bool) -> None:
    """What `--launcher slurm` needs before anything is created: sbatch, submitit, and stores that
    workers on other nodes can share (a server or a database; a journal only where it was named:
    it must be on a filesystem every node mounts)."""
    require_submitit()
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm needs Slurm's sbatch on the PATH (run the command on a login node "
                          "of the cluster, or use --launcher local)")
    stores = ("pass --tracking-uri http://MLFLOW_HOST:5000 (an mlflow server) and --storage "
              "postgresql://USER@DBHOST/optuna, grpc://PROXY:PORT or journal:///shared/filesystem/optuna.journal")
    if sqlite_path(settings.tracking_uri) is not None:
        raise ConfigError(f"--launcher slurm: workers on other nodes cannot share the SQLite file "
                          f"{redact(settings.tracking_uri)}; {stores}")
    if not storage_given:
        raise ConfigError("--launcher slurm: workers on other nodes cannot share the default Optuna journal on "
                          f"this machine ({redact(settings.storage_url)}); {stores}")
    if sqlite_path(settings.storage_url) is not None:
        raise ConfigError(f"--launcher slurm: workers on other nodes cannot share the SQLite file "
                          f"{redact(settings.storage_url)}; {stores}")


def default_folder(study_name: str) -> Path:
    """Where the job's script, pickles and logs go (submitit's folder): ./slurm/<study>, which the
    nodes must see (the directory the command runs in usually is shared)."""
    return Path.cwd() / "slurm" / study_name


@dataclass
class SubmittedArray:
    job_id: str  # the array's job id (its tasks are JOB_0, JOB_1, ...)
    tasks: int
    folder: Path  # submitit's folder: the sbatch script and each task's log

    @property
    def logs(self) -> str:
        return str(self.folder / f"{self.job_id}_*_log.out")


def submit_array(settings: SweepSettings, workers: int, options: dict, folder: Path) -> SubmittedArray:
    """Submit `workers` array tasks (one array) each running `array_task(settings)`; returns once
    Slurm has accepted it."""
    submitit = require_submitit()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**{"job_name": f"vae_lab-{settings.spec.name}", "stderr_to_stdout": True, **options})
    task_settings = replace(settings, progress=False, new_study=False, workers_here=1)
    for env, url in ((SECRET_TRACKING_ENV, settings.tracking_uri), (SECRET_STORAGE_ENV, settings.storage_url)):
        if redact(url) != url:
            os.environ[env] = url  # sbatch exports this process's environment to the tasks
    task_settings = replace(task_settings, tracking_uri=redact(settings.tracking_uri),
                            storage_url=redact(settings.storage_url))
    with executor.batch():
        jobs = [executor.submit(array_task, task_settings) for _ in range(workers)]
    return SubmittedArray(jobs[0].job_id.split("_")[0], workers, folder)


def array_task(settings: SweepSettings) -> str:
    """One array task: the worker loop until the study has nothing left for it. On a warning
    signal it stops its trials (resumable) and requeues itself; on SIGTERM it stops them and
    leaves the rest to Slurm. Returns how it ended (submitit keeps it as the task's result)."""
    import signal

    from vae_lab.cli import exit_now
    from vae_lab.interrupts import WARNING_SIGNALS, interruptible, received_signal
    from vae_lab.study.runner import run_study
    from vae_lab.tracking.checks import short_http_retries

    import optuna

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    short_http_retries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = replace(settings, tracking_uri=os.environ.get(SECRET_TRACKING_ENV, settings.tracking_uri),
                       storage_url=os.environ.get(SECRET_STORAGE_ENV, settings.storage_url))
    task = slurm_task()
    print(f"vae_lab worker in Slurm task {task}: study {settings.spec.name!r}", flush=True)
    with interruptible(also=WARNING_SIGNALS):
        outcome = run_study(settings, workers=1)
        signum = received_signal()
    counts = outcome.summary["counts"]
    ended = (f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed, "
             f"{counts['retried']} retried, {outcome.unfinished} waiting or running")
    if not outcome.interrupted:
        print(f"study {settings.spec.name!r}: nothing left for this task ({ended})", flush=True)
        return ended
    name = signal.Signals(signum).name if signum else "an interrupt"
    if signum in WARNING_SIGNALS and task:
        # the trials are queued again; this task comes back to continue them (or others do first)
        print(f"stopped by {name} (time limit near): its trials continue from their checkpoints; "
              f"requeuing {task} ({ended})", flush=True)
        subprocess.run(["scontrol", "requeue", task], check=False, timeout=60)
        exit_now(0)  # Slurm ends this run of the task; no result file: it is not over
    print(f"stopped by {name}: its trials continue from their checkpoints when a worker takes them up ({ended})",
          flush=True)
    exit_now(0)
    return ended  # not reached


def array_tasks_left(job_id: str) -> int | None:
    """How many of the array's tasks Slurm still holds (pending, running, requeued), or None
    when squeue cannot answer."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # ended and already forgotten
            return 0
        return None
    return len([line for line in out.stdout.splitlines() if line.strip()])


def wait_for_array(array: SubmittedArray, bar) -> None:
    """Until Slurm holds none of the array's tasks, redrawing the study's progress bar."""
    while True:
        left = array_tasks_left(array.job_id)
        bar.refresh()
        if left == 0:
            return
        time.sleep(SQUEUE_EVERY_SECONDS)
