"""Where a study's Optuna bookkeeping lives: the storage URL, the user attributes vae_lab keeps
on studies and trials, and the trial states the sweep relies on.

A storage URL is a journal file (`journal:///path`), an SQLAlchemy URL (sqlite, postgresql, ...)
or a storage proxy (`grpc://HOST:PORT`, `python -m vae_lab.storage_proxy`: one process holds the
database connections of every worker). Claiming trials is `claims`; which worker is alive,
`workers`; what happens to a trial whose worker is gone, `repair`. Optuna's own internals are
used here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.parse
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from vae_lab.config import ConfigError
from vae_lab.study.patient_storage import PatientStorage, is_outage
from vae_lab.tracking.checks import CHECK_SECONDS, StoreUnreachable, check_database, check_local_file
from vae_lab.tracking.errors import describe
from vae_lab.tracking.uris import SQLITE_PREFIX, redact, sqlite_path

# Optuna user attributes on trials and studies
POINT_ATTR = "vae_lab.point"  # grid point key (study.point_key)
ASSIGNMENT_ATTR = "vae_lab.assignment"  # JSON of the trial's swept values
WORKER_ATTR = "vae_lab.worker"  # "host:pid:token" of the process running it (workers.worker_id)
MACHINE_ATTR = "vae_lab.machine"  # boot id and pid namespace of that process: where its pid means something
HEARTBEAT_ATTR = "vae_lab.heartbeat"  # unix time, refreshed while it runs
HEARTBEAT_EVERY_ATTR = "vae_lab.heartbeat_every"  # seconds between its worker's heartbeats
RESUME_ATTR = "vae_lab.resume_run_id"  # a retried trial continues this MLflow run from its checkpoint
RETRY_OF_ATTR = "vae_lab.retry_of"  # the number of the trial a retry replaces
RUN_ID_ATTR = "mlflow_run_id"
REPORTED_ATTR = "vae_lab.test_metrics"  # the finished run's test/* (reported, never used to choose)
REASON_ATTR = "vae_lab.failure_reason"
SKIPPED_ATTR = "vae_lab.skipped"  # a claim that lost to another worker: not a real trial
PARENT_ATTR = "mlflow_parent_run_id"
FINGERPRINT_ATTR = "vae_lab.fingerprint"
CREATOR_ATTR = "vae_lab.creator"
READY_ATTR = "vae_lab.ready"

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING)
JOURNAL_PREFIX = "journal:///"
GRPC_PREFIX = "grpc://"
DEFAULT_PROXY_PORT = 13000
PROXY_THREADS = 10  # requests the storage proxy serves at once: at most this many database connections
SCHEMA_RACE_ATTEMPTS = 5


def default_storage_url(tracking_uri: str, store_dir: Path, study_name: str) -> str:
    """An Optuna journal file beside the MLflow database, or, for a store that is not a file (a
    server, a database), one in `store_dir` named after that store: two stores never share one.

    The same file whatever `--workers` says, so every command on this machine joins one study
    (Optuna recommends its journal file for several processes). A study kept by an older
    vae_lab in `optuna.db` beside it (or, for a server, in the shared `optuna.journal` of
    `store_dir`) is resumed there.
    """
    database = sqlite_path(tracking_uri)
    folder = database.parent if database is not None else store_dir
    legacy = folder / "optuna.db"
    if database != legacy and legacy.is_file() and study_name in study_names(f"{SQLITE_PREFIX}{legacy}"):
        return f"{SQLITE_PREFIX}{legacy}"
    if database is not None:
        return f"{JOURNAL_PREFIX}{folder / 'optuna.journal'}"
    shared = folder / "optuna.journal"
    if shared.is_file() and study_name in study_names(f"{JOURNAL_PREFIX}{shared}"):
        return f"{JOURNAL_PREFIX}{shared}"
    # named after the store without its credentials: the same store is one file whatever password
    store_key = hashlib.sha1(redact(tracking_uri).encode()).hexdigest()[:12]
    return f"{JOURNAL_PREFIX}{folder / f'optuna-{store_key}.journal'}"


def journal_path(url: str) -> Path | None:
    """The file of a journal storage URL (`journal:///path`, or a path ending .journal), else None."""
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX):])
    if url.endswith(".journal"):
        return Path(url)
    return None


def repair_journal(url: str) -> str | None:
    """Drop the last record of a journal that was cut mid-write (a full disk, a power cut): Optuna
    would append the next record onto the cut line and never read the file again. Done under
    Optuna's own journal lock, so no worker is writing meanwhile. Returns a line saying what was
    dropped, or None when there was nothing to repair."""
    path = journal_path(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return None
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with path.open("rb+") as journal:
            size = journal.seek(0, os.SEEK_END)
            journal.seek(size - 1)
            if journal.read(1) == b"\n":
                return None
            whole, end = 0, size  # the end of the last whole record, found from the back
            while end > 0:
                start = max(0, end - 65536)
                journal.seek(start)
                newline = journal.read(end - start).rfind(b"\n")
                if newline >= 0:
                    whole = start + newline + 1
                    break
                end = start
            journal.truncate(whole)
            journal.flush()
            os.fsync(journal.fileno())
    finally:
        lock.release()
    return (f"{path}: its last record was cut mid-write (a full disk or a power cut); dropped its "
            f"{size - whole} bytes, and what it recorded is done again")


def proxy_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a storage proxy URL `grpc://HOST[:PORT]` (port 13000 when left out), else
    None; ConfigError for a grpc:// URL that names no host or more than a host and a port."""
    if not url.startswith(GRPC_PREFIX):
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"--storage {redact(url)!r} is not a storage proxy address; allowed: grpc://HOST:PORT, "
                          "as `python -m vae_lab.storage_proxy` prints it")
    return parts.hostname, port or DEFAULT_PROXY_PORT


def grpc_proxy(host: str, port: int) -> optuna.storages.BaseStorage:
    """Optuna's client of a storage proxy (experimental in Optuna: its warning is not for our users)."""
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily: a missing grpcio would show on the first call)
    except ModuleNotFoundError:
        raise ConfigError('a grpc:// storage needs grpcio: pip install -e ".[cluster]"') from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.GrpcStorageProxy(host=f"[{host}]" if ":" in host else host, port=port)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """`journal:///path` (or a path ending .journal) -> a journal file; `grpc://HOST:PORT` -> a
    storage proxy; anything else -> an RDB URL. Each rides out an outage
    (`patient_storage.PatientStorage`; a proxy that is restarted is one); a journal cut by a
    failed write is repaired before each retry."""
    path = journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        return PatientStorage(journal, url, before_retry=lambda: repair_journal(url))
    address = proxy_address(url)
    if address is not None:
        return PatientStorage(grpc_proxy(*address), url)
    if sqlite_path(url) is not None:
        sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    return PatientStorage(cached(rdb_storage(url, engine_kwargs(url))), url)


def engine_kwargs(url: str, pool_size: int | None = None) -> dict:
    # a restarted server leaves dead connections in the pool: test each before use
    kwargs = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    if pool_size is not None:
        kwargs.update(pool_size=pool_size, max_overflow=0)
    return kwargs


def cached(storage: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """What `optuna.load_study(storage=RDBStorage)` wraps it in (Optuna's private `_CachedStorage`,
    which keeps finished trials in memory): once here, for the retrying wrapper to go around it."""
    return optuna.storages.get_storage(storage)


def rdb_storage(url: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # two workers creating the schema of a new PostgreSQL database at once: one of them
            # fails on a type or table the other just made; by the next try it is all there
            if attempt == SCHEMA_RACE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def stored_study_attrs(url: str, name: str) -> dict | None:
    """The user attributes of study `name` in storage `url`, or None when it holds no such
    study; creates nothing (no journal file, no database file, no tables)."""
    path = journal_path(url)
    if path is not None:
        if not path.is_file():
            return None
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    elif proxy_address(url) is not None:  # the proxy's database has its tables: the proxy made them
        storage = grpc_proxy(*proxy_address(url))
    elif sqlite_path(url) is not None and not sqlite_path(url).is_file():
        return None
    else:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        try:
            if not sqlalchemy.inspect(engine).has_table("studies"):
                return None
        finally:
            engine.dispose()
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return None
    finally:
        if proxy_address(url) is not None:
            storage.close()


def study_names(url: str) -> list[str]:
    return optuna.get_all_study_names(storage=open_storage(url))


# ----------------------------------------------------------------------------- trials
# Optuna's own internals are used here and nowhere else; tests/test_optuna_compat.py fails when
# an Optuna release changes what they rely on.

def trial_handle(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """The `optuna.Trial` of a trial this worker claimed itself (by id: Optuna documents this
    constructor as internal, `Study.ask` being the public way)."""
    return optuna.Trial(study, trial_id)


def pop_waiting_trial(study: optuna.Study, storage, wanted=None, on_claim=None) -> optuna.Trial | None:
    """Claim one WAITING trial (atomic in the storage) for which `wanted(frozen_trial)` holds,
    or None when there is none; `on_claim(trial_id)` runs right after the claim.

    What `Study.ask` does with enqueued trials (Optuna's private `Study._pop_waiting_trial_id`),
    with a filter: a worker claims only points that fit the batch it is building."""
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if wanted is not None and not wanted(waiting):
            continue
        waiting_id = trial_id(storage, study, waiting.number)
        try:
            if storage.set_trial_state_values(waiting_id, state=TrialState.RUNNING):
                if on_claim is not None:
                    on_claim(waiting_id)
                return trial_handle(study, waiting_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def is_skipped(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(SKIPPED_ATTR))


def real_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [trial for trial in study.get_trials(deepcopy=False) if not is_skipped(trial)]


def trial_id(storage, study: optuna.Study, number: int) -> int:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def assignment_of(trial: FrozenTrial) -> dict:
    return json.loads(trial.user_attrs.get(ASSIGNMENT_ATTR, "{}"))


def check_optuna_storage(url: str) -> None:
    """StoreUnreachable (exit 2) within seconds when the Optuna storage cannot be used."""
    if journal_path(url) is not None:
        check_local_file(journal_path(url), "Optuna journal", url)
    elif proxy_address(url) is not None:
        check_proxy(url)
    elif sqlite_path(url) is not None:
        check_local_file(sqlite_path(url), "Optuna storage", url)
    else:
        check_database(url, "Optuna storage")


# ----------------------------------------------------------------------------- the storage proxy
# Optuna's gRPC proxy (`optuna.storages.GrpcStorageProxy` and its server): workers send their
# storage calls to one process, which alone holds database connections.

PROXY_PROBE_STUDY = "vae_lab.storage-proxy-probe"  # a name looked up (never created) to check a proxy


def check_proxy(url: str) -> None:
    """StoreUnreachable within about 30 s when nothing at `url` answers as a storage proxy, or
    when the proxy's own database does not answer; nothing is created."""
    host, port = proxy_address(url)
    try:
        import grpc
    except ModuleNotFoundError:
        raise StoreUnreachable(f'cannot use the storage proxy {redact(url)}: grpcio is not installed '
                               '(pip install -e ".[cluster]")') from None
    start_it = "start it (python -m vae_lab.storage_proxy --storage postgresql://...) or pass another --storage"
    try:
        with socket.create_connection((host, port), timeout=CHECK_SECONDS):
            pass
    except OSError as error:
        raise StoreUnreachable(f"cannot reach the storage proxy {redact(url)}: {error.strerror or error}; "
                               f"{start_it}") from None
    proxy = grpc_proxy(host, port)
    try:
        proxy.wait_server_ready(timeout=CHECK_SECONDS)
        proxy.get_study_id_from_name(PROXY_PROBE_STUDY)
    except KeyError:
        return  # it answered, from its database
    except ConnectionError:
        raise StoreUnreachable(f"{redact(url)} does not answer as a storage proxy in {CHECK_SECONDS} s; "
                               f"{start_it}") from None
    except grpc.RpcError as error:
        details = error.details() if hasattr(error, "details") else str(error)
        raise StoreUnreachable(f"the storage proxy {redact(url)} answers but cannot serve: "
                               f"{str(details).splitlines()[0][:200] if details else error}") from None
    finally:
        proxy.close()


def check_proxied_storage(url: str) -> None:
    """ConfigError unless `url` is a database the proxy can serve (and it answers)."""
    allowed = "allowed: a database server, postgresql://... or mysql://..."
    if journal_path(url) is not None:
        # Optuna (5.0) documents its proxy as not supporting a journal storage (optuna#6084)
        raise ConfigError(f"the storage proxy does not serve a journal file ({redact(url)}); {allowed}; "
                          "workers on one machine use the journal directly")
    if sqlite_path(url) is not None:
        # SQLite reuses a deleted study's id, and every client of the proxy caches trials by study
        # id (Optuna's GrpcStorageProxy warns of it): --new-study would show workers the old trials
        raise ConfigError(f"the storage proxy does not serve an SQLite file ({redact(url)}); {allowed}")
    if proxy_address(url) is not None or "://" not in url:
        raise ConfigError(f"--storage {redact(url)!r} is not a database URL; {allowed}")
    check_database(url, "Optuna storage")


def proxied_storage(url: str) -> optuna.storages.BaseStorage:
    """What the proxy serves: Optuna's cached RDB storage, without `PatientStorage`'s waiting.
    A call that meets an outage fails at once, as UNAVAILABLE (`serve_storage`), and each
    worker's own PatientStorage waits it out: waiting here would hold every server thread and
    hide the outage from the workers' heartbeats, which must see it (`workers.Heartbeat`)."""
    return _ResyncingStorage(cached(rdb_storage(url, engine_kwargs(url, pool_size=PROXY_THREADS))))


class _ResyncingStorage:
    """Optuna's `_CachedStorage` records a trial's parameters only for trials it has read: a
    restarted proxy has read none, and would refuse (KeyError) the parameters of a trial a
    worker claimed before the restart. Such a call reads the studies' trials once and is tried
    again."""

    def __init__(self, inner: optuna.storages.BaseStorage):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def set_trial_param(self, trial_id: int, *args, **kwargs) -> None:
        try:
            return self.inner.set_trial_param(trial_id, *args, **kwargs)
        except KeyError:
            for study in self.inner.get_all_studies():
                self.inner.get_all_trials(study._study_id, deepcopy=False)
            return self.inner.set_trial_param(trial_id, *args, **kwargs)


def serve_storage(url: str, host: str, port: int):
    """Start a storage proxy for the database `url` on host:port (0: a free one); returns
    (the started grpc server, its port). ConfigError when it cannot listen there."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    class OutageAsUnavailable(grpc.ServerInterceptor):
        """A call that met a database outage ends UNAVAILABLE (the workers wait and retry)
        rather than UNKNOWN (an error they would raise)."""

        def intercept_service(self, continuation, handler_call_details):
            handler = continuation(handler_call_details)
            if handler is None or handler.unary_unary is None:
                return handler
            serve = handler.unary_unary

            def behavior(request, context):
                try:
                    return serve(request, context)
                except Exception as error:
                    if not is_outage(error):
                        raise
                    context.abort(grpc.StatusCode.UNAVAILABLE,
                                  f"the database behind the storage proxy cannot be reached: {describe(error)}")

            return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    other_port = "choose another --port (0 picks a free one)"
    try:  # asked first: gRPC would log its own lines about it before raising
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot listen on {address} ({error.strerror or error}); {other_port}") from None
    # no SO_REUSEPORT: a second proxy on a port in use is refused rather than sharing its calls
    server = grpc.server(ThreadPoolExecutor(max_workers=PROXY_THREADS), interceptors=[OutageAsUnavailable()],
                         options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(proxied_storage(url)), server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {address}; {other_port}")
    server.start()
    return server, bound
