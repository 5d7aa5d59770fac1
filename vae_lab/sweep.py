"""Studies over run configs: a grid or an Optuna search, one MLflow parent run + one child per trial.

    python -m vae_lab.sweep                                   # experiments/default.yaml
    python -m vae_lab.sweep experiments/seed000_nas.yaml
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml study.n_trials=40 base.train.epochs=20
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml --workers 2
    python -m vae_lab.sweep FILE --storage postgresql://... --tracking-uri http://mlflow-host:5000

Running the same command again resumes the study. The Optuna storage is the source of truth
for which trials exist: a grid's points are enqueued there as WAITING trials and claimed
atomically, so several workers (processes or machines) never run one point twice.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import study_storage as store
from . import names
from .batched import DEFAULT_CAP as DEFAULT_BATCH_CAP
from .batched import PER_TRIAL_KEYS, batch_key, plan_batches, train_batch
from .config import Config, ConfigError
from .data import DataUnavailable, ImageData, load_data
from .engine import RunResult, resolve_device
from .study import Choices, Range, StudySpec, load_study_spec, point_key, fingerprint_changes
from .study_summary import log_summary
from .tracking import default_store_dir, get_or_create_experiment, prepare_store, resolve_tracking_uri
from .train import train

DEFAULT_STUDY_FILE = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"
READY_WAIT_SECONDS = 120


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (train() ends the running MLflow run KILLED)."""


class StudyRefused(ConfigError):
    """The stored study cannot be resumed with this file (exit 2)."""


@dataclass
class SweepSettings:
    """Everything a worker process needs to join the study (picklable)."""
    spec: StudySpec
    tracking_uri: str
    storage_url: str
    progress: bool = True
    new_study: bool = False


@dataclass
class Session:
    """One process's handle on the study."""
    settings: SweepSettings
    study: optuna.Study
    storage: Any
    client: MlflowClient
    parent_run_id: str
    data_cache: "DataCache"
    my_trials: set[int] = field(default_factory=set)
    point_batch_keys: dict = field(default_factory=dict)
    deadline: float | None = None
    failures: int = 0

    @property
    def spec(self) -> StudySpec:
        return self.settings.spec


class DataCache:
    """Datasets by data config: trials that share one are not reloaded."""

    def __init__(self):
        self._loaded: dict[str, ImageData] = {}

    def get(self, config: Config) -> ImageData:
        key = f"{config.data!r}|{config.device}"
        if key not in self._loaded:
            self._loaded[key] = load_data(config.data, resolve_device(config.device), config.train.batch_size)
        return self._loaded[key]


# ----------------------------------------------------------------------------- Optuna wiring

def encode(value: Any) -> Any:
    """Optuna params hold None/bool/int/float/str: lists become their JSON text."""
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    options = dict(spec.sampler_options)
    if spec.sampler == "grid":  # every trial is enqueued with fixed params; nothing is sampled
        return optuna.samplers.RandomSampler(seed=0)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(**options)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(**options)
    return optuna.samplers.RandomSampler(**options)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**spec.pruner_options)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**spec.pruner_options)
    return optuna.pruners.NopPruner()


def grid_choices(spec: StudySpec) -> dict[str, list]:
    """Each swept key's distinct values over the grid, as Optuna categorical choices."""
    choices: dict[str, list] = {}
    for assignment in spec.grid_points():
        for key, value in assignment.items():
            encoded = encode(value)
            if encoded not in choices.setdefault(key, []):
                choices[key].append(encoded)
    return choices


def suggest_assignment(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """The trial's swept values: from its grid point, or suggested by the sampler."""
    if spec.is_grid:
        assignment = json.loads(trial.user_attrs[store.ASSIGNMENT_ATTR])
        for key, choices in grid_choices(spec).items():  # recorded as Optuna params too
            if key in assignment:
                trial.suggest_categorical(key, choices)
        return assignment
    assignment: dict[str, Any] = {}
    for key, param in spec.space.items():
        if isinstance(param, Choices):
            encoded = [encode(value) for value in param.values]
            assignment[key] = plain(param.values[encoded.index(trial.suggest_categorical(key, encoded))])
        elif param.type == "int":
            assignment[key] = trial.suggest_int(key, low=int(param.low), high=int(param.high),
                                                step=int(param.step or 1), log=param.log)
        else:
            assignment[key] = trial.suggest_float(key, low=float(param.low), high=float(param.high),
                                                  step=param.step, log=param.log)
    if spec.points:
        index = trial.suggest_categorical("points", list(range(len(spec.points))))
        assignment.update(spec.points[index])
    trial.set_user_attr(store.ASSIGNMENT_ATTR, json.dumps(assignment))
    return assignment


def create_or_load_study(settings: SweepSettings, storage) -> tuple[optuna.Study, bool]:
    """Load the stored study (refusing a changed search space) or create it; (study, created)."""
    spec = settings.spec
    fingerprint = spec.fingerprint()
    kwargs = dict(sampler=make_sampler(spec), pruner=make_pruner(spec))
    if spec.name in optuna.get_all_study_names(storage=storage):
        study = optuna.load_study(study_name=spec.name, storage=storage, **kwargs)
        stored = study.user_attrs.get(store.FINGERPRINT_ATTR)
        changes = fingerprint_changes(stored, fingerprint) if stored else []
        if not changes:
            return study, False
        if not settings.new_study:
            raise StudyRefused(
                f"study {spec.name!r} in {store.redact_url(settings.storage_url)} was started with a different "
                f"setup (changed: {', '.join(changes[:5])}); rerun with --new-study to start it over, "
                "or restore the file")
        optuna.delete_study(study_name=spec.name, storage=storage)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return optuna.load_study(study_name=spec.name, storage=storage, **kwargs), False
    study.set_user_attr(store.FINGERPRINT_ATTR, fingerprint)
    study.set_user_attr(store.CREATOR_ATTR, store.worker_name())
    return study, True


def wait_until_ready(study: optuna.Study, storage, settings: SweepSettings) -> bool:
    """Wait for the creating worker to finish setting up; True if we must set it up ourselves."""
    waited = 0.0
    while True:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study.study_name))
        if attrs.get(store.READY_ATTR):
            return False
        creator = attrs.get(store.CREATOR_ATTR, "")
        host, _, pid = creator.rpartition(":")
        if not creator or waited > READY_WAIT_SECONDS or (
                host == store.socket.gethostname() and pid.isdigit() and not store.pid_alive(int(pid))):
            return True  # its creator died mid-setup: finish the (idempotent) setup here
        time.sleep(0.5)
        waited += 0.5


def start_parent_run(client: MlflowClient, spec: StudySpec, tracking_uri: str, storage_url: str) -> str:
    experiment_id = get_or_create_experiment(client, spec.base_config().tracking.experiment, tracking_uri)
    tags = {
        names.ROLE_TAG: "study",
        names.STUDY_NAME_TAG: spec.name,
        "vae_lab.swept_params": ",".join(spec.swept_keys()),
        "vae_lab.objectives": ",".join(str(objective) for objective in spec.objectives),
        "vae_lab.sampler": spec.sampler,
        "vae_lab.pruner": spec.pruner,
        "vae_lab.optuna_storage": store.redact_url(storage_url),
    }
    run = client.create_run(experiment_id, run_name=f"study {spec.name}", tags=tags)
    client.log_text(run.info.run_id, spec.to_yaml(), "study/study.yaml")
    return run.info.run_id


def enqueue_missing_points(study: optuna.Study, spec: StudySpec) -> int:
    """Enqueue every grid point with no waiting, running or finished (complete/pruned) trial."""
    covered = {trial.user_attrs.get(store.POINT_ATTR) for trial in store.real_trials(study)
               if trial.state in store.DONE_STATES + store.LIVE_STATES}
    added = 0
    for assignment in spec.grid_points():
        key = point_key(assignment)
        if key not in covered:
            study.enqueue_trial(params={name: encode(value) for name, value in assignment.items()},
                                user_attrs={store.POINT_ATTR: key,
                                            store.ASSIGNMENT_ATTR: json.dumps(assignment)})
            added += 1
    return added


def kill_orphan_runs(session: Session) -> int:
    """End KILLED every child run left RUNNING whose trial is no longer running live."""
    parent = session.client.get_run(session.parent_run_id)
    running_trials = {trial.number for trial in session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    orphans = session.client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent_run_id}' and attributes.status = 'RUNNING'")
    killed = 0
    for run in orphans:
        number = run.data.tags.get(names.TRIAL_NUMBER_TAG, "")
        if number.isdigit() and int(number) in running_trials:
            continue
        session.client.set_tag(run.info.run_id, names.FAILURE_REASON_TAG, "its sweep worker stopped (killed or lost)")
        session.client.set_terminated(run.info.run_id, status="KILLED")
        killed += 1
    return killed


@contextlib.contextmanager
def sqlite_setup_lock(tracking_uri: str):
    """Serialize the first use of SQLite stores: two processes creating the same fresh
    database race in MLflow's (and Optuna's) table creation."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(tracking_uri[len("sqlite:///"):]).with_suffix(".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_session(settings: SweepSettings, data_cache: DataCache | None = None, repair: bool = True) -> Session:
    """Create or join the study: Optuna study, MLflow parent run, grid queue, stale-trial repair."""
    spec = settings.spec
    prepare_store(settings.tracking_uri)
    with sqlite_setup_lock(settings.tracking_uri):
        client = MlflowClient(tracking_uri=settings.tracking_uri)
        client.search_experiments(max_results=1)  # creates the tables of a new store
        storage = store.open_storage(settings.storage_url)
    study, created = create_or_load_study(settings, storage)
    must_set_up = created or wait_until_ready(study, storage, settings)
    study_attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study.study_name))
    parent_run_id = study_attrs.get(store.PARENT_ATTR)
    if must_set_up and not parent_run_id:
        parent_run_id = start_parent_run(client, spec, settings.tracking_uri, settings.storage_url)
        study.set_user_attr(store.PARENT_ATTR, parent_run_id)
    session = Session(settings, study, storage, client, parent_run_id, data_cache or DataCache())
    if repair or must_set_up:
        for trial in store.fail_stale_trials(study, storage, session.my_trials):
            tqdm.write(f"trial {trial.number} was left running by a stopped worker: marked failed, will be retried")
        kill_orphan_runs(session)
        if spec.is_grid:
            enqueue_missing_points(study, spec)
    if must_set_up:
        study.set_user_attr(store.READY_ATTR, True)
    if client.get_run(parent_run_id).info.status != "RUNNING":  # resumed: the study runs again
        client.update_run(parent_run_id, status="RUNNING")
    if spec.timeout:
        session.deadline = time.time() + spec.timeout
    return session


# ----------------------------------------------------------------------------- trials

def budget_used(session: Session, before: int | None = None) -> int:
    """Trials counted against study.n_trials (complete, pruned, running, waiting)."""
    return sum(1 for trial in store.real_trials(session.study)
               if trial.state in store.DONE_STATES + store.LIVE_STATES
               and (before is None or trial.number < before))


def skip(session: Session, trial: optuna.Trial, why: str) -> None:
    trial.set_user_attr(store.SKIPPED_ATTR, why)
    session.study.tell(trial, state=TrialState.FAIL)


def ask_trials(session: Session, count: int = 1) -> list[optuna.Trial]:
    """Claim up to `count` trials to run now; [] when the study has nothing left for us.

    With count > 1 (batched trials), a grid claims only points that can train in one batch
    with the first one it claims, so other workers keep the rest.
    """
    claimed: list[optuna.Trial] = []
    spec = session.spec
    first_key = None
    while len(claimed) < count:
        if session.deadline is not None and time.time() > session.deadline:
            break
        if spec.is_grid:
            wanted = None if first_key is None else (
                lambda waiting: batch_key_of_point(session, waiting.user_attrs.get(store.ASSIGNMENT_ATTR)) == first_key)
            trial = store.pop_waiting_trial(session.study, session.storage, wanted)
            if trial is None:
                break
            earlier = store.earlier_claim(session.study, trial.number, trial.user_attrs[store.POINT_ATTR])
            if earlier is not None:
                skip(session, trial, f"grid point already held by trial {earlier}")
                continue
            if first_key is None and count > 1:
                first_key = batch_key_of_point(session, trial.user_attrs.get(store.ASSIGNMENT_ATTR))
        else:
            if budget_used(session) >= spec.n_trials or session.failures >= spec.n_trials:
                break
            trial = session.study.ask()
            store.mark_claimed(session.storage, store.trial_id(session.storage, session.study, trial.number))
            if budget_used(session, before=trial.number) >= spec.n_trials:
                skip(session, trial, "study.n_trials reached by other workers")
                break
        session.my_trials.add(trial.number)
        claimed.append(trial)
    return claimed


def batch_key_of_point(session: Session, assignment_json: str | None):
    """The batch key of a grid point's config (vae_lab.batched.batch_key), cached per point."""
    if assignment_json not in session.point_batch_keys:
        try:
            config = session.spec.trial_config(json.loads(assignment_json or "{}"))
            session.point_batch_keys[assignment_json] = batch_key(config)
        except Exception:  # an invalid point fails when it runs, alone
            session.point_batch_keys[assignment_json] = None
    return session.point_batch_keys[assignment_json]


def pruning_callback(trial: optuna.Trial, spec: StudySpec):
    if spec.pruner == "none":
        return None
    metric = spec.objectives[0].metric

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if metric in metrics:
            trial.report(metrics[metric], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric}={metrics[metric]:.4g}")
    return report


def find_child_run(session: Session, number: int) -> str | None:
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    runs = session.client.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent_run_id}' "
                      f"and tags.`{names.TRIAL_NUMBER_TAG}` = '{number}'",
        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def prepare_trial(session: Session, trial: optuna.Trial, progress: bool) -> tuple[Config, dict[str, str]]:
    """The trial's run config and child-run tags; records its assignment on the Optuna trial."""
    spec = session.spec
    assignment = suggest_assignment(trial, spec)
    config = spec.trial_config(assignment, extra=[f"tracking.uri={session.settings.tracking_uri}"]
                               + ([] if progress else ["train.progress=false"]))
    swept = config.flat()
    trial.set_user_attr(store.ASSIGNMENT_ATTR, json.dumps({key: swept[key] for key in spec.swept_keys()}))
    tags = {names.ROLE_TAG: "trial", names.STUDY_NAME_TAG: spec.name,
            names.TRIAL_NUMBER_TAG: str(trial.number)}
    return config, tags


def trial_name(session: Session, trial: optuna.Trial) -> str:
    return f"{session.spec.name} trial {trial.number}"


def record_outcome(session: Session, trial: optuna.Trial, outcome: RunResult | BaseException) -> TrialState:
    """Tell Optuna how the trial ended: COMPLETE with its objective values, PRUNED, or FAIL."""
    spec = session.spec
    state, values, reason = TrialState.FAIL, None, ""
    if isinstance(outcome, RunResult):
        trial.set_user_attr(store.RUN_ID_ATTR, outcome.run_id)
        missing = [o.metric for o in spec.objectives if o.metric not in outcome.metrics]
        if missing:
            reason = f"the run logged no {missing[0]}"
        else:
            values, state = [float(outcome.metrics[o.metric]) for o in spec.objectives], TrialState.COMPLETE
            trial.set_user_attr(store.REPORTED_ATTR, {key: value for key, value in outcome.metrics.items()
                                                      if key.startswith(f"{names.TEST}/")})
    elif isinstance(outcome, optuna.TrialPruned):
        state, reason = TrialState.PRUNED, str(outcome)
    elif isinstance(outcome, KeyboardInterrupt):
        reason = f"interrupted ({type(outcome).__name__})"
    else:
        reason = f"{type(outcome).__name__}: {outcome}"
    if state != TrialState.COMPLETE:
        run_id = find_child_run(session, trial.number)
        if run_id:
            trial.set_user_attr(store.RUN_ID_ATTR, run_id)
        trial.set_user_attr(store.REASON_ATTR, reason[:2000])
        session.failures += state == TrialState.FAIL
    session.study.tell(trial, values=values, state=state)
    if state == TrialState.FAIL and not isinstance(outcome, KeyboardInterrupt):
        tqdm.write(f"trial {trial.number} failed: {reason.splitlines()[0] if reason else ''}")
    return state


def run_trial(session: Session, trial: optuna.Trial, progress: bool) -> TrialState:
    """Build the trial's config, train it as a child run, and tell Optuna the result."""
    trial_id = store.trial_id(session.storage, session.study, trial.number)
    with store.Heartbeat(session.storage, trial_id):
        try:
            config, tags = prepare_trial(session, trial, progress)
            outcome = train(config, parent_run_id=session.parent_run_id, run_name=trial_name(session, trial),
                            tags=tags, data=session.data_cache.get(config),
                            on_epoch_end=pruning_callback(trial, session.spec))
        except KeyboardInterrupt as interrupt:
            record_outcome(session, trial, interrupt)
            raise
        except Exception as error:  # a failed trial is recorded; the study goes on
            outcome = error
        return record_outcome(session, trial, outcome)


def run_trials_batched(session: Session, trials: list[optuna.Trial], progress: bool) -> None:
    """Train same-shaped trials together (vae_lab.batched); each keeps its own child run and
    Optuna trial. Trials that cannot share a batch run one by one."""
    prepared, outcomes = {}, {}
    for trial in trials:
        try:
            prepared[trial.number] = prepare_trial(session, trial, progress)
        except Exception as error:
            outcomes[trial.number] = error
    ready = [trial for trial in trials if trial.number in prepared]
    groups = plan_batches([prepared[trial.number][0] for trial in ready], session.spec.batch_trials)
    pending = {trial.number: trial for trial in trials}
    try:
        for trial in trials:
            if trial.number in outcomes:
                record_outcome(session, pending.pop(trial.number), outcomes[trial.number])
        for group in groups:
            members = [ready[index] for index in group]
            if len(members) == 1:
                run_trial(session, pending.pop(members[0].number), progress)
                continue
            configs = [prepared[trial.number][0] for trial in members]
            with contextlib.ExitStack() as beats:
                for trial in members:
                    beats.enter_context(store.Heartbeat(
                        session.storage, store.trial_id(session.storage, session.study, trial.number)))
                try:
                    results = train_batch(
                        configs, data=session.data_cache.get(configs[0]), parent_run_id=session.parent_run_id,
                        run_names=[trial_name(session, trial) for trial in members],
                        tags=[prepared[trial.number][1] for trial in members],
                        on_epoch_end=[pruning_callback(trial, session.spec) for trial in members])
                except KeyboardInterrupt as interrupt:
                    # trials that finished (or were pruned) before the interrupt keep that outcome
                    for trial, outcome in zip(members, getattr(interrupt, "outcomes", [])):
                        if outcome is not None:
                            record_outcome(session, pending.pop(trial.number), outcome)
                    raise
            for trial, outcome in zip(members, results):
                record_outcome(session, pending.pop(trial.number), outcome)
    except KeyboardInterrupt as interrupt:
        for trial in pending.values():  # every claimed trial not yet told: failed, to be retried
            record_outcome(session, trial, interrupt)
        raise


# ----------------------------------------------------------------------------- progress

class TrialsBar:
    """A bar over the study's trials, with the best value so far; refreshed from the storage."""

    def __init__(self, session: Session, enabled: bool):
        self.session = session
        self.total = len(session.spec.grid_points()) if session.spec.is_grid else session.spec.n_trials
        self.bar = tqdm(total=self.total, desc=f"study {session.spec.name}", unit="trial", position=0,
                        leave=True, disable=not enabled, dynamic_ncols=True)
        self.refresh()

    def refresh(self) -> None:
        trials = store.real_trials(self.session.study)
        finished = [trial for trial in trials if trial.state.is_finished()]
        if self.session.spec.is_grid:
            done = len({trial.user_attrs.get(store.POINT_ATTR) for trial in finished})
        else:
            done = len(finished)
        self.bar.n = min(done, self.total)
        postfix = {}
        complete = [trial for trial in finished if trial.state == TrialState.COMPLETE]
        if complete and len(self.session.spec.objectives) == 1:
            postfix["best"] = f"{self.session.study.best_value:.4g}"
        elif complete:
            postfix["pareto"] = len(self.session.study.best_trials)
        failed = sum(trial.state == TrialState.FAIL for trial in finished)
        if failed:
            postfix["failed"] = failed
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def batch_ask_count(session: Session) -> int:
    """How many trials to claim at once: the batch cap (auto: 16 on CPU, 64 on CUDA).

    `auto` leaves pruned studies unbatched: a pruner compares a trial with trials that
    finished before it, and trials trained side by side never have any. A sampler (not a
    grid) asks for several trials only when every swept key is one a batch can vary.
    """
    setting, spec = session.spec.batch_trials, session.spec
    if setting == "off" or (setting == "auto" and spec.pruner != "none"):
        return 1
    if not spec.is_grid and not set(spec.swept_keys()) <= set(PER_TRIAL_KEYS):
        return 1  # sampled trials of different shapes cannot share a batch: ask one at a time
    if isinstance(setting, int):
        return setting
    device = resolve_device(session.spec.base_config().device)
    return DEFAULT_BATCH_CAP.get(device.type, DEFAULT_BATCH_CAP["cpu"])


def work(session: Session, progress: bool, bar: TrialsBar | None = None) -> None:
    """The worker loop: ask, run, tell, until the study has nothing left for this worker."""
    count = batch_ask_count(session)
    while trials := ask_trials(session, count=count):
        if len(trials) == 1:
            run_trial(session, trials[0], progress)
        else:
            run_trials_batched(session, trials, progress)
        if bar is not None:
            bar.refresh()


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def worker_process(settings: SweepSettings) -> None:
    """Entry point of an extra `--workers` process (spawned; quiet)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    session = open_session(settings, repair=False)
    try:
        work(session, progress=False)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- the command

def finish_parent(session: Session, interrupted: bool) -> dict:
    """Write the summary; end the parent run unless other workers still run trials."""
    kill_orphan_runs(session)
    summary = log_summary(session.client, session.parent_run_id, session.study, session.spec)
    live = session.study.get_trials(deepcopy=False, states=store.LIVE_STATES)
    if not live:
        session.client.set_terminated(session.parent_run_id, status="KILLED" if interrupted else "FINISHED")
    elif interrupted and not any(trial.state == TrialState.RUNNING for trial in live):
        session.client.set_terminated(session.parent_run_id, status="KILLED")
    return summary


def print_results(session: Session, summary: dict) -> None:
    settings, counts = session.settings, summary["counts"]
    print(f"\nstudy {session.spec.name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['failed']} failed, {counts['running'] + counts['waiting']} left "
          f"({summary['total_seconds']:.0f} s)")
    chosen = summary.get("best_configuration")
    if chosen:
        params = ", ".join(f"{key}={value}" for key, value in chosen["params"].items()) or "the base config"
        over = f"mean over {chosen['seeds']} seeds" if chosen["seeds"] > 1 else "1 trial"
        print(f"best: {params} ({chosen['selected_on']}={chosen['mean']:.4g}, {over}; chosen on validation)")
        reported = names.held_out_counterpart(chosen["selected_on"])
        if reported in chosen["test"]:
            test = chosen["test"][reported]
            spread = f" ± {test['std']:.3g}" if test["std"] is not None else ""
            print(f"  its test score (reported, not used to choose): {reported}={test['mean']:.4g}{spread}")
    for entry in summary.get("pareto_front") or []:
        values = ", ".join(f"{metric}={value:.4g}" for metric, value in entry["values"].items())
        print(f"pareto: trial {entry['number']} ({values})")
    experiment = session.spec.base_config().tracking.experiment
    print(f"results: MLflow experiment {experiment!r}, parent run {session.parent_run_id} "
          f"(study/trials.csv, study/summary.json)")
    if settings.tracking_uri.startswith(("http://", "https://")):
        print(f"  browse:  open {settings.tracking_uri} in a browser")
    else:
        print(f"  browse:  mlflow ui --backend-store-uri {settings.tracking_uri}")
    print(f"  report:  python -m analysis.report --run {session.parent_run_id}")
    print(f"  optuna:  study {session.spec.name!r} in {store.redact_url(settings.storage_url)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.sweep",
        description="Run a study (grid or Optuna search) of AE/VAE trainings, tracked in MLflow. "
                    "Running the same command again resumes it.",
        epilog="Overrides: study.n_trials=40 base.train.epochs=20 search_space.model.latent_dim=[2,8]")
    parser.add_argument("study_file", nargs="?", default=None,
                        help=f"study YAML (default: {DEFAULT_STUDY_FILE.relative_to(DEFAULT_STUDY_FILE.parents[1])})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, sections study, base, search_space")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: a file beside the MLflow store)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: base.tracking.uri, "
                        "$MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    parser.add_argument("--new-study", action="store_true",
                        help="start the study over even if one with this name is stored (its MLflow runs stay)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the file and list the trials it would run; create and run nothing")
    return parser


def print_plan(settings: SweepSettings) -> None:
    """What a study would run: its grid points (with their batches), or its sampled space."""
    spec = settings.spec
    print(f"study {spec.name!r}: sampler {spec.sampler}, pruner {spec.pruner}, objectives "
          + ", ".join(str(objective) for objective in spec.objectives))
    print(f"  MLflow: {settings.tracking_uri}   Optuna: {store.redact_url(settings.storage_url)}")
    if not spec.is_grid:
        print(f"  {spec.n_trials} trials sampled from:")
        for key, param in spec.space.items():
            if isinstance(param, Choices):
                print(f"    {key}: one of {list(param.values)}")
            else:
                scale = ", log scale" if param.log else ""
                step = f", step {param.step}" if param.step else ""
                print(f"    {key}: {param.type} in [{param.low}, {param.high}]{scale}{step}")
        if spec.points:
            print(f"    points: {len(spec.points)} paired assignments")
        return
    points = spec.grid_points()
    configs = [spec.trial_config(point) for point in points]
    batched = spec.batch_trials != "off" and not (spec.batch_trials == "auto" and spec.pruner != "none")
    batches = plan_batches(configs, spec.batch_trials) if batched else [[index] for index in range(len(points))]
    batch_of = {index: number for number, batch in enumerate(batches) for index in batch}
    print(f"  {len(points)} grid points, {len(batches)} training passes (study.batch_trials={spec.batch_trials}):")
    for index, point in enumerate(points):
        values = ", ".join(f"{key}={value}" for key, value in point.items())
        print(f"    {index:3d}  pass {batch_of[index]:3d}  {values}")


def prepare(args: argparse.Namespace) -> SweepSettings:
    """Validate everything (file, overrides, data) before anything is created."""
    path = args.study_file or str(DEFAULT_STUDY_FILE)
    overrides = list(args.overrides)
    if args.study_file and "=" in args.study_file and not Path(args.study_file).is_file():
        path, overrides = str(DEFAULT_STUDY_FILE), [args.study_file, *overrides]
    if args.workers < 1:
        raise ConfigError(f"--workers must be 1 or more, got {args.workers}")
    spec = load_study_spec(path, overrides)
    tracking_uri = resolve_tracking_uri(args.tracking_uri or spec.base_config().tracking.uri)
    if "://" not in tracking_uri:
        raise ConfigError(f"--tracking-uri must be a URI such as sqlite:///abs/path.db or http://host:5000, "
                          f"got {tracking_uri!r}")
    storage_url = args.storage or store.default_storage_url(tracking_uri, default_store_dir(), args.workers,
                                                           spec.name)
    if storage_url == tracking_uri:
        raise ConfigError("--storage must not be the MLflow database: Optuna and MLflow need separate stores")
    first = spec.grid_points()[0] if spec.is_grid else {}
    resolve_device(spec.trial_config({key: value for key, value in first.items()}).device)
    return SweepSettings(spec=spec, tracking_uri=tracking_uri, storage_url=storage_url, new_study=args.new_study)


def run_sweep(settings: SweepSettings, workers: int = 1, data_cache: DataCache | None = None) -> int:
    """Run (or resume, or join) the study in this process plus `workers - 1` spawned ones."""
    data_cache = data_cache or DataCache()
    spec = settings.spec
    first = spec.trial_config(spec.grid_points()[0] if spec.is_grid else {})
    data_cache.get(first)  # a missing dataset fails here, before any store is touched

    session = open_session(settings, data_cache)
    context = multiprocessing.get_context("spawn")
    helpers = [context.Process(target=worker_process, args=(SweepSettings(**{**vars(settings), "progress": False,
                                                                             "new_study": False}),),
                               daemon=False) for _ in range(workers - 1)]
    for helper in helpers:
        helper.start()
    bar = TrialsBar(session, enabled=settings.progress)
    interrupted = False
    try:
        work(session, progress=settings.progress and workers == 1, bar=bar)
        for helper in helpers:
            helper.join()
    except KeyboardInterrupt as interrupt:
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for helper in helpers:  # Ctrl-C reached them too; SIGTERM reached only us
            if isinstance(interrupt, Interrupted) and helper.is_alive():
                helper.terminate()
            helper.join(timeout=30)
            if helper.is_alive():
                helper.terminate()
                helper.join(timeout=10)
    finally:
        bar.refresh()
        bar.close()
    summary = finish_parent(session, interrupted)
    print_results(session, summary)
    if interrupted:
        print("interrupted: the running trial was marked KILLED in MLflow and failed in Optuna; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None, data_cache: DataCache | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = build_parser().parse_intermixed_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        try:
            settings = prepare(args)
            if args.dry_run:
                print_plan(settings)
                return 0
            settings.progress = settings.spec.base_config().train.progress
            return run_sweep(settings, workers=args.workers, data_cache=data_cache)
        except (ConfigError, DataUnavailable) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("interrupted before the study started; nothing was run", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    from .cli import exit_now

    exit_now(main())
