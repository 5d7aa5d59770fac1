"""Throwaway servers for tests: a PostgreSQL cluster and an `mlflow server`, each on a free
port of 127.0.0.1, each stopped (with everything it started) when its `with` block ends."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DATABASES = ("mlflow", "optuna")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path:
    """The newest /usr/lib/postgresql/*/bin (Debian's `postgresql` package; `make postgres`)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    if not found:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb: run `make postgres` (apt-get install postgresql)")
    return Path(found[-1]).parent


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class PostgresCluster:
    """A fresh PostgreSQL cluster holding the (empty) databases `mlflow` and `optuna`; trust
    authentication, TCP on 127.0.0.1 only. `stop_immediately()` is `pg_ctl stop -m immediate`
    (SIGQUIT: no clean shutdown, clients cut off); `start()` brings it back on the same port.

    PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres` OS
    user. Its data folder is a short temporary folder in /tmp (a unix socket path must fit in
    107 bytes, and pytest's folders are private to root); its log goes to `folder/postgres.log`.
    """

    def __init__(self, folder: Path, timeout: float = 60):
        self.bin_dir, self.folder, self.timeout = postgres_bin(), Path(folder), timeout
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.folder / "postgres.log"
        self.as_user: dict = {}
        self.data = Path(tempfile.mkdtemp(prefix="vae_lab-pg-"))
        if os.geteuid() == 0:
            self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.data, "postgres", "postgres")
        self.cluster = self.data / "data"
        self.env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        self.server = None
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"  # the base: add /mlflow or /optuna
        with self.log_path.open("ab") as log:
            subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.cluster), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--no-locale", "--no-sync"], check=True, stdout=log,
                           stderr=subprocess.STDOUT, env=self.env, cwd=self.data, **self.as_user)
        self.start()
        with self._connect("postgres") as connection:
            for name in DATABASES:
                connection.execute(f"CREATE DATABASE {name}")

    def _connect(self, database: str):
        import psycopg

        return psycopg.connect(f"{self.url}/{database}", connect_timeout=2, autocommit=True)

    def start(self) -> None:
        import psycopg

        with self.log_path.open("ab") as log:
            self.server = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.cluster), "-k", str(self.data), "-h", "127.0.0.1",
                 # fsync off is safe for what the tests do to it (a killed server, not a lost machine:
                 # the kernel keeps what was written); synchronous_commit stays on, or a commit the
                 # client was told of can vanish in stop_immediately() (a trial Optuna then cannot find)
                 "-p", str(self.port), "-c", "fsync=off", "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.data, start_new_session=True,
                **self.as_user)
        deadline = time.time() + self.timeout
        while True:
            try:
                with self._connect("postgres"):
                    return
            except psycopg.OperationalError as error:
                if self.server.poll() is not None:
                    raise RuntimeError(f"postgres exited with code {self.server.returncode}:\n"
                                       f"{_tail(self.log_path)}") from error
                if time.time() > deadline:
                    raise RuntimeError(f"postgres did not accept connections in {self.timeout:.0f} s: {error}\n"
                                       f"{_tail(self.log_path)}") from error
                time.sleep(0.2)

    def stop_immediately(self) -> None:
        """`pg_ctl stop -m immediate`: the postmaster ends every backend at once, no checkpoint."""
        self.server.send_signal(signal.SIGQUIT)
        self.server.wait(timeout=30)

    def stop(self) -> None:
        server = self.server
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, stop cleanly
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.send_signal(signal.SIGQUIT)  # immediate shutdown: the postmaster ends its backends
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()  # backends notice their postmaster is gone and exit
                    server.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster(folder: Path, timeout: float = 60):
    """A `PostgresCluster`, stopped and deleted when the block ends."""
    cluster = None
    try:
        cluster = PostgresCluster(folder, timeout)
        yield cluster
    finally:
        if cluster is not None:
            cluster.remove()


@contextlib.contextmanager
def postgres_server(folder: Path, timeout: float = 60):
    """Yield the base URL `postgresql://postgres@127.0.0.1:PORT` of a fresh `PostgresCluster`."""
    with postgres_cluster(folder, timeout) as cluster:
        yield cluster.url


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_port`, until `cut()`: every connection through it
    is closed and no new one is accepted (a network cut seen by one client only)."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        self.lock = threading.Lock()
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.cut_off:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.cut_off:
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.cut_off = True
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            with contextlib.suppress(OSError):
                self.listener.close()
            for end in self.sockets:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                    end.close()


def write_basic_auth_config(folder: Path, admin_username: str, admin_password: str) -> Path:
    """The ini of MLflow's basic-auth app (MLFLOW_AUTH_CONFIG_PATH), its users database in `folder`:
    `admin_username` is created with `admin_password` on the first start; other users read all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                      f"admin_username = {admin_username}\nadmin_password = {admin_password}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return config


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_dir: str | Path, timeout: float = 90, log_path: Path | None = None,
                  auth_config: Path | None = None):
    """Yield the URL `http://127.0.0.1:PORT` of an `mlflow server` (one worker) on this store,
    serving artifacts from `artifacts_dir`. Its whole process group is killed at the end.
    With `auth_config` (`write_basic_auth_config`) it is `mlflow server --app-name basic-auth`."""
    mlflow = Path(sys.executable).parent / "mlflow"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    own_log = log_path is None
    log_path = Path(tempfile.mkstemp(prefix="vae_lab-mlflow-", suffix=".log")[1]) if own_log else Path(log_path)
    auth_args, auth_env = [], {}
    if auth_config is not None:  # the app's CSRF protection (of its user-admin pages) needs a fixed secret key
        auth_args = ["--app-name", "basic-auth"]
        auth_env = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config), "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_dir), *auth_args],
            # no job runner: MLflow 3 would start 7 huey consumer processes for features vae_lab never uses
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 **auth_env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {server.returncode}:\n{_tail(log_path)}")
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer {url}/health in {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the leader
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        if own_log:
            log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def answering_server(status_of_path):
    """Yield (url, authorizations) of a bare HTTP server on 127.0.0.1 that answers every GET and
    POST with `status_of_path(path)` and an empty body, recording each request's Authorization
    header: a stand-in for what a tracking server answers, where the real one cannot be made to."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    authorizations: list = []

    class Answers(BaseHTTPRequestHandler):
        def do_GET(self):
            authorizations.append(self.headers.get("Authorization"))
            self.send_response(status_of_path(self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", authorizations
    finally:
        server.shutdown()
        server.server_close()


def runs_of(client) -> "pandas.DataFrame":
    """Every run of the `vae_lab` experiment on `client`'s store: id, status, tags, `param:` params."""
    import pandas as pd

    experiment = client.get_experiment_by_name("vae_lab")
    if experiment is None:
        return pd.DataFrame(columns=["run_id", "status"])
    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status, **r.data.tags,
                          **{f"param:{k}": v for k, v in r.data.params.items()}}
                         for r in client.search_runs([experiment.experiment_id], max_results=1000)])
