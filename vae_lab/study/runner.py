"""Opening, working and finishing a study in this process and its `--workers` helpers.

    session = open_session(settings)      # create or join; repairs what stopped workers left
    code = run_study(settings, workers=2) # open, work until nothing is left, finish the parent run
    summary = finish_parent(session, interrupted=False)
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import time
from dataclasses import dataclass

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from optuna.trial import TrialState
from tqdm.auto import tqdm

from vae_lab import names
from vae_lab.config import ConfigError
from vae_lab.data.cache import DataCache
from vae_lab.study import storage as store
from vae_lab.study.claims import enqueue_missing_points
from vae_lab.study.progress import TrialsBar
from vae_lab.study.repair import kill_orphan_runs, repair_stale_trials
from vae_lab.study.session import Session, SweepSettings
from vae_lab.study.space import make_pruner, make_sampler
from vae_lab.study.spec import StudySpec, fingerprint_changes
from vae_lab.study.trials import work
from vae_lab.study.workers import Helpers, Worker, machine_key, process_gone, worker_id
from vae_lab.tracking.errors import StoreUnavailable, is_store_error, refusal
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store
from vae_lab.tracking.tracker import config_for_the_record, log_params
from vae_lab.tracking.uris import redact, sqlite_path
from vae_lab.tracking.provenance import source_tags
from vae_lab.training.device import apply_threads, plan_threads, resolve_device, share_with
from vae_lab.interrupts import Interrupted, interruptible

READY_WAIT_SECONDS = 120


class StudyRefused(ConfigError):
    """The stored study cannot be resumed with this file (exit 2)."""


def create_or_load_study(settings: SweepSettings, storage, client: MlflowClient) -> tuple[optuna.Study, bool]:
    """Load the stored study (refusing a changed search space) or create it; (study, created).
    `--new-study` always starts over: the stored study is deleted and its parent run ended.
    A study that MLflow holds and the Optuna storage does not (an emptied journal, another
    --storage) is refused rather than run a second time beside the first."""
    spec = settings.spec
    kwargs = dict(sampler=make_sampler(spec), pruner=make_pruner(spec))
    if spec.name in optuna.get_all_study_names(storage=storage):
        study = optuna.load_study(study_name=spec.name, storage=storage, **kwargs)
        if settings.new_study:
            end_replaced_parent(settings, study.user_attrs.get(store.PARENT_ATTR))
            optuna.delete_study(study_name=spec.name, storage=storage)
        else:
            refuse_a_changed_study(settings, study.user_attrs)
            return study, False
    elif not settings.new_study:
        refuse_a_lost_study(settings, storage, client)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return optuna.load_study(study_name=spec.name, storage=storage, **kwargs), False
    study.set_user_attr(store.FINGERPRINT_ATTR, spec.fingerprint())
    study.set_user_attr(store.CREATOR_ATTR, worker_id())
    study.set_user_attr(store.MACHINE_ATTR, machine_key())
    return study, True


def refuse_a_changed_study(settings: SweepSettings, stored_attrs: dict) -> None:
    """StudyRefused when the stored study of this name was started from a different file."""
    stored = stored_attrs.get(store.FINGERPRINT_ATTR)
    changes = fingerprint_changes(stored, settings.spec.fingerprint()) if stored else []
    if changes:
        raise StudyRefused(
            f"study {settings.spec.name!r} in {redact(settings.storage_url)} was started with a different "
            f"setup (changed: {', '.join(changes[:5])}); rerun with --new-study to start it over, "
            "or restore the file")


def check_without_creating(settings: SweepSettings) -> None:
    """What opening the study would refuse (a changed file, a lost study), asked of the stores
    as they are: nothing is created (--dry-run). A database that has no Optuna tables yet holds
    no study; the lost-study check needs an MLflow store that exists (a file, or a server)."""
    if settings.new_study:
        return
    attrs = store.stored_study_attrs(settings.storage_url, settings.spec.name)
    if attrs is not None:
        refuse_a_changed_study(settings, attrs)
        return
    database = sqlite_path(settings.tracking_uri)
    if (database is not None and database.is_file()) or settings.tracking_uri.startswith(("http://", "https://")):
        refuse_a_lost_study(settings, None, MlflowClient(tracking_uri=settings.tracking_uri))


def refuse_a_lost_study(settings: SweepSettings, storage, client: MlflowClient) -> None:
    spec = settings.spec
    experiment = client.get_experiment_by_name(spec.base_config().tracking.experiment)
    if experiment is None:
        return
    parents = client.search_runs(
        [experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{names.ROLE_TAG}` = 'study' and tags.`{names.STUDY_NAME_TAG}` = '{spec.name}'")
    # a worker starting beside us may have created the study and then its parent just now: the
    # study is lost only if the storage still lacks it once the parent exists (`storage` None:
    # it was just found without it)
    if parents and (storage is None or spec.name not in optuna.get_all_study_names(storage=storage)):
        raise StudyRefused(
            f"study {spec.name!r} has a parent run in MLflow ({parents[0].info.run_id}) but "
            f"{redact(settings.storage_url)} holds no study of that name (emptied, or another --storage); "
            "pass the --storage that holds it, or rerun with --new-study to start it over beside the old runs")


def end_replaced_parent(settings: SweepSettings, parent_run_id: str | None) -> None:
    if not parent_run_id:
        return
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    with contextlib.suppress(Exception):  # the old parent may have been deleted
        if client.get_run(parent_run_id).info.status == "RUNNING":
            client.set_tag(parent_run_id, names.FAILURE_REASON_TAG, "replaced by a run with --new-study")
            client.set_terminated(parent_run_id, status="KILLED")


def wait_until_ready(study: optuna.Study, storage) -> bool:
    """Wait for the creating worker to finish setting up; True if we must set it up ourselves."""
    waited = 0.0
    while True:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study.study_name))
        if attrs.get(store.READY_ATTR):
            return False
        creator = attrs.get(store.CREATOR_ATTR, "")
        if not creator or waited > READY_WAIT_SECONDS or process_gone(creator, attrs.get(store.MACHINE_ATTR)):
            return True  # its creator died mid-setup: finish the (idempotent) setup here
        time.sleep(0.5)
        waited += 0.5


def start_parent_run(client: MlflowClient, spec: StudySpec, tracking_uri: str, storage_url: str) -> str:
    experiment_id = get_or_create_experiment(client, spec.base_config().tracking.experiment, tracking_uri)
    tags = {
        names.ROLE_TAG: "study",
        names.STUDY_NAME_TAG: spec.name,
        names.SWEPT_PARAMS_TAG: ",".join(spec.swept_keys()),
        names.OBJECTIVES_TAG: ",".join(str(objective) for objective in spec.objectives),
        names.SAMPLER_TAG: spec.sampler,
        names.PRUNER_TAG: spec.pruner,
        names.OPTUNA_STORAGE_TAG: redact(storage_url),
        **source_tags(),
    }
    tags[MLFLOW_RUN_NOTE] = parent_description(spec)
    run = client.create_run(experiment_id, run_name=f"study {spec.name}", tags=tags)
    log_params(client, run.info.run_id, parent_params(spec))
    client.log_text(run.info.run_id, spec.to_yaml(), "study/study.yaml")
    return run.info.run_id


def parent_params(spec: StudySpec) -> dict[str, object]:
    """What the parent run shows as params: the study's settings (`study.*`), then every config
    value its trials share (the swept keys are the children's to show; no password)."""
    trials = spec.grid_size() if spec.is_grid else spec.n_trials
    settings = {"study.sampler": spec.sampler, "study.pruner": spec.pruner,
                "study.objectives": ",".join(str(objective) for objective in spec.objectives),
                "study.swept": ",".join(spec.swept_keys()) or "nothing", "study.trials": trials or "until stopped",
                "study.batch_trials": spec.batch_trials}
    swept = set(spec.swept_keys())
    shared = {key: value for key, value in config_for_the_record(spec.base_config()).flat().items() if key not in swept}
    return {**settings, **shared}


def parent_description(spec: StudySpec) -> str:
    """The parent run's description (MLflow's note: the run page's Description)."""
    objectives = ", ".join(f"{objective.metric} ({objective.direction})" for objective in spec.objectives)
    swept = ", ".join(f"`{key}`" for key in spec.swept_keys()) or "nothing"
    return (f"Study **{spec.name}** ({spec.sampler} sampler) over {swept}; chosen on {objectives}, "
            "on the validation split. Each child run is one trial, named by its swept values. Group the "
            f"runs by the tag `{names.CONFIGURATION_TAG}` to see each configuration's mean over seeds. "
            "The study file is the artifact `study/study.yaml`; counts, the best configuration and its "
            "test score are in `study/summary.json`.")


@contextlib.contextmanager
def sqlite_setup_lock(tracking_uri: str):
    """Serialize the first use of SQLite stores: two processes creating the same fresh
    database race in MLflow's (and Optuna's) table creation."""
    database = sqlite_path(tracking_uri)
    if database is None:
        yield
        return
    lock_path = database.with_suffix(".lock")
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
        repaired = store.repair_journal(settings.storage_url)
        if repaired:
            tqdm.write(repaired)
        storage = store.open_storage(settings.storage_url)
    study, created = create_or_load_study(settings, storage, client)
    must_set_up = created or wait_until_ready(study, storage)
    study_attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study.study_name))
    parent_run_id = study_attrs.get(store.PARENT_ATTR)
    if must_set_up and not parent_run_id:
        parent_run_id = start_parent_run(client, spec, settings.tracking_uri, settings.storage_url)
        study.set_user_attr(store.PARENT_ATTR, parent_run_id)
    session = Session(settings, study, storage, client, parent_run_id, data_cache or DataCache())
    if repair or must_set_up:
        for line in repair_stale_trials(session):
            tqdm.write(line)
        kill_orphan_runs(session)
        if spec.is_grid:
            enqueue_missing_points(study, spec, retry_failed=True)
    if must_set_up:
        study.set_user_attr(store.READY_ATTR, True)
    if client.get_run(parent_run_id).info.status != "RUNNING":  # resumed: the study runs again
        client.update_run(parent_run_id, status="RUNNING")
    return session


def start_worker(session: Session) -> Worker:
    """This process as a worker of the study (its `study.timeout` counts from now)."""
    timeout = session.spec.timeout
    return Worker(session, deadline=time.time() + timeout if timeout else None)


def unfinished(session: Session) -> int:
    """Trials still waiting or running (a helper's requeued trials among them)."""
    return len(session.study.get_trials(deepcopy=False, states=store.LIVE_STATES))


def finish_parent(session: Session, interrupted: bool) -> dict:
    """Write the summary; end the parent run unless other workers still run trials."""
    # imported here: the summary's charts and importances bring matplotlib and scikit-learn
    # (about 2.5 s), which a helper worker, never writing the summary, does not need
    from vae_lab.study.summary import log_summary

    kill_orphan_runs(session)
    summary = log_summary(session.client, session.parent_run_id, session.study, session.spec)
    live = session.study.get_trials(deepcopy=False, states=store.LIVE_STATES)
    if not live:
        session.client.set_terminated(session.parent_run_id, status="KILLED" if interrupted else "FINISHED")
    elif interrupted and not any(trial.state == TrialState.RUNNING for trial in live):
        session.client.set_terminated(session.parent_run_id, status="KILLED")
    return summary


def end_parent_cut_off(session: Session, error: StoreUnavailable) -> None:
    """Mark the parent run KILLED (its rerun makes it RUNNING again), if the MLflow store takes it
    and no other worker has finished the study meanwhile."""
    try:
        if session.client.get_run(session.parent_run_id).info.status != "RUNNING":
            return
        session.client.set_tag(session.parent_run_id, names.FAILURE_REASON_TAG, str(error)[:5000])
        session.client.set_terminated(session.parent_run_id, status="KILLED")
    except Exception as failure:
        if not is_store_error(failure):
            raise


def worker_process(settings: SweepSettings, joined=None, busy=None, slot: int = 0) -> None:
    """Entry point of an extra `--workers` process (spawned; quiet); sets the event `joined`
    once it has opened the study, and clears its flag `busy[slot]` (see `workers.Helpers`)
    when the study has nothing left for it."""
    import os

    from vae_lab.tracking.checks import short_http_retries

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    apply_threads(plan_threads(settings.spec.base_config().threads, settings.workers_here))
    if busy is not None:
        share_with(lambda: sum(busy))
    short_http_retries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with interruptible():
            worker = start_worker(open_session(settings, repair=False))
            if joined is not None:
                joined.set()
            work(worker, progress=False)
    except KeyboardInterrupt:
        pass
    except StoreUnavailable:  # the command's own worker meets the same store and says so, once
        raise SystemExit(1) from None
    finally:
        if busy is not None:
            busy[slot] = 0  # its CPUs go to the workers still training (device.share_with)


def import_end_of_run_modules() -> None:
    """What the end of this process's first run would import (matplotlib, torchvision, SciPy's
    optimizers for the probe; about 2 s), and the FLOP counter that orders a grid's batches for
    several workers."""
    import scipy.optimize  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    import vae_lab.evaluation.artifacts  # noqa: F401
    import vae_lab.evaluation.metrics  # noqa: F401


@dataclass
class StudyRun:
    """How this process's part of a study ended."""
    session: Session
    summary: dict
    interrupted: bool
    crashed_helpers: int  # --workers helper processes that exited with an error
    unfinished: int  # trials still waiting or running when this process stopped


def run_study(settings: SweepSettings, workers: int = 1, data_cache: DataCache | None = None) -> StudyRun:
    """Run (or resume, or join) the study in this process plus `workers - 1` spawned ones.

    A helper that crashes is noticed: its trials are failed and queued again, and this process
    takes them up. A tracking server that refuses the credentials or the permission midway
    (HTTP 401/403) stops the helpers too and is raised: its runs and trials stay as a crash
    leaves them, for the rerun to continue."""
    data_cache = data_cache or DataCache()
    spec = settings.spec
    settings = SweepSettings(**{**vars(settings), "workers_here": workers})
    apply_threads(plan_threads(spec.base_config().threads, workers))
    first = spec.trial_config(next(spec.iter_grid_points()) if spec.is_grid else {})
    data_cache.get(first, resolve_device(first.device))  # a missing dataset fails here, before any store is touched

    session = open_session(settings, data_cache)
    helpers = Helpers(worker_process, SweepSettings(**{**vars(settings), "progress": False, "new_study": False}),
                      workers - 1)
    share_with(lambda: sum(helpers.busy))
    bar = TrialsBar(session, enabled=settings.progress)
    interrupted = False
    try:
        if workers > 1:
            import_end_of_run_modules()  # on this core, while the helpers import torch on the others
        helpers.wait_until_joined()
        worker = start_worker(session)
        while True:
            work(worker, progress=settings.progress and workers == 1, bar=bar)
            helpers.busy[0] = 0
            crashed = helpers.newly_crashed()
            for helper in crashed:
                tqdm.write(f"worker process {helper.pid} stopped with exit code {helper.exitcode}: "
                           "its trials are failed and queued again")
            if crashed:
                helpers.busy[0] = 1  # this worker takes their trials up
                for line in repair_stale_trials(session, worker.my_trials):
                    tqdm.write(line)
                continue
            if not helpers.alive():
                break
            helpers.wait(timeout=1.0)
            bar.refresh()
    except KeyboardInterrupt as interrupt:
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        helpers.stop(terminate=isinstance(interrupt, Interrupted))
    except StoreUnavailable as error:  # a store stayed down: a clean stop, resumable by a rerun
        helpers.stop(terminate=True)
        end_parent_cut_off(session, error)
        raise
    except Exception as error:
        if refusal(error) is not None:  # the helpers' credentials are refused too
            helpers.stop(terminate=True)
        raise
    finally:
        bar.refresh()
        bar.close()
    share_with(None)
    summary = finish_parent(session, interrupted)
    return StudyRun(session, summary, interrupted, len(helpers.crashed), unfinished(session))
