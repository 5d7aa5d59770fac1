"""`python -m vae_lab.serve`: a local page to play with logged models: generate digits of a
class, sample the prior, click around a 2-D latent plane, interpolate between test images.

    python -m vae_lab.serve                       # the newest study's best run (else the newest run)
    python -m vae_lab.serve --run RUN_ID
    python -m vae_lab.serve --experiment NAME     # that experiment's run with the lowest val/loss
    # serving on http://127.0.0.1:20202           (--host, --port, --tracking-uri)

Every picture is a plain GET that returns a PNG, so curl gets what the page shows:

    /api/runs                                      servable runs, newest first (JSON)
    /api/runs/<id>                                 its model, latent size, classes (JSON)
    /api/runs/<id>/generate.png?label=3&count=8&seed=0
    /api/runs/<id>/prior.png?count=16&seed=1
    /api/runs/<id>/decode.png?z=0.5,-1.2
    /api/runs/<id>/interpolate.png?a=IDX&b=IDX&t=0.3
    /api/runs/<id>/test.png?index=IDX
    /api/runs/<id>/latents.json

The same paths without `/api/runs/<id>` (`/prior.png?count=16`) use the run the server
started with. Without `seed` every request draws afresh; the seed used comes back in the
`X-Seed` header. A bad request gets a 4xx and `{"error": "..."}`.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from vae_lab.config import VAE_MODELS
from vae_lab.data.datasets import DataUnavailable
from vae_lab import names
from vae_lab.names import TEST_LOSS, VAL_LOSS
from vae_lab.serve.images import RequestError, ServedRun
from vae_lab.tracking.tracker import STATE_DICT_ARTIFACT, has_logged_model, missing_store, resolve_tracking_uri

PAGE_DIR = Path(__file__).resolve().parent / "page"
DEFAULT_PORT = 20202
MAX_COUNT = 64
MAX_LATENT_DIM = 4096
MAX_MAP_POINTS = 5000
MAX_SEED = 2**63 - 1
LOADED_RUNS_KEPT = 8


# ----------------------------------------------------------------------------- runs in the store

def _all_pages(search, **kwargs) -> list:
    found, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


class RunCatalog:
    """The store's runs that can be served: FINISHED, with `model_state/state_dict.pt`."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._has_model: dict[str, bool] = {}  # a finished run's artifacts do not change

    def experiment_names(self) -> dict[str, str]:
        experiments = _all_pages(self.client.search_experiments, view_type=ViewType.ACTIVE_ONLY)
        return {experiment.experiment_id: experiment.name for experiment in experiments}

    def has_model(self, run_id: str) -> bool:
        if run_id not in self._has_model:
            self._has_model[run_id] = has_logged_model(self.client, run_id)
        return self._has_model[run_id]

    def servable(self, experiment_ids: list[str] | None = None) -> list[Run]:
        """Finished runs with a model, newest first."""
        if experiment_ids is None:
            experiment_ids = list(self.experiment_names())
        if not experiment_ids:
            return []
        runs = _all_pages(self.client.search_runs, experiment_ids=experiment_ids,
                          filter_string="attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time DESC"])
        return [run for run in runs if self.has_model(run.info.run_id)]

    def newest_study_best(self) -> Run | None:
        """The best servable run, on validation, of the newest study that has one: the run its
        parent names as best (`vae_lab.best_run_id`, chosen on the study's val/* objective over
        seeds), else its servable trial with the lowest val/loss, else its newest; None without studies."""
        experiment_ids = list(self.experiment_names())
        if not experiment_ids:
            return None
        parents = self.client.search_runs(experiment_ids, filter_string=f"tags.`{names.ROLE_TAG}` = 'study'",
                                          order_by=["attributes.start_time DESC"], max_results=20)
        for parent in parents:
            trials = [run for run in _all_pages(
                self.client.search_runs, experiment_ids=[parent.info.experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' "
                              "and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"]) if self.has_model(run.info.run_id)]
            if not trials:
                continue
            named = parent.data.tags.get(names.BEST_RUN_TAG)
            best = [run for run in trials if run.info.run_id == named]
            scored = [run for run in trials if finite_metric(run, VAL_LOSS) is not None]
            return best[0] if best else min(scored, key=lambda run: run.data.metrics[VAL_LOSS]) if scored \
                else trials[0]
        return None

    def get(self, run_id: str) -> Run:
        """The run, or RequestError 404 when the store has no such run or it has no model."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise RequestError(f"unknown run id {run_id!r}: no such run in {self.tracking_uri}",
                               status=404) from None
        if not self.has_model(run_id):
            raise RequestError(f"run {run_id} has no model ({STATE_DICT_ARTIFACT}); "
                               "choose a finished training run (GET /api/runs lists them)", status=404)
        return run


def finite_metric(run: Run, name: str) -> float | None:
    value = run.data.metrics.get(name)
    return value if value is not None and math.isfinite(value) else None


def describe_run(run: Run, experiment_names: dict[str, str]) -> dict:
    params, tags = run.data.params, run.data.tags
    model = tags.get("model") or params.get("model.name", "?")
    latent_dim = params.get("model.latent_dim")
    kl_weight = params.get("loss.kl_weight")
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment_names.get(run.info.experiment_id, run.info.experiment_id),
        "study": tags.get(names.STUDY_NAME_TAG),
        "trial": tags.get(names.TRIAL_NUMBER_TAG),
        "model": model,
        "dataset": tags.get("dataset") or params.get("data.name"),
        "latent_dim": int(latent_dim) if latent_dim is not None else None,
        "kl_weight": float(kl_weight) if kl_weight is not None and model in VAE_MODELS else None,
        "val_loss": finite_metric(run, VAL_LOSS),  # what --experiment chooses on
        "test_loss": finite_metric(run, TEST_LOSS),  # reported, never chosen on
        "start_time": run.info.start_time,
    }


def choose_run(catalog: RunCatalog, run_id: str | None = None, experiment: str | None = None) -> Run:
    """The run the server starts with: `run_id`; else the experiment's finished run with a
    model and the lowest val/loss (its newest such run when none logged val/loss, as runs
    from before the validation split); else the newest study's best run on validation
    (`RunCatalog.newest_study_best`); else the newest finished run with a model.
    Never chosen on test/loss. Raises LookupError with a one-line message."""
    if run_id:
        try:
            return catalog.get(run_id)
        except RequestError as error:
            raise LookupError(str(error)) from None
    if experiment:
        found = catalog.client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            known = ", ".join(sorted(catalog.experiment_names().values())) or "none"
            raise LookupError(f"no experiment named {experiment!r} in {catalog.tracking_uri}; "
                              f"experiments: {known}")
        servable = catalog.servable([found.experiment_id])
        if not servable:
            raise LookupError(f"experiment {experiment!r} has no finished run with a model; "
                              "train one: python -m vae_lab.train")
        scored = [run for run in servable if finite_metric(run, VAL_LOSS) is not None]
        return min(scored, key=lambda run: run.data.metrics[VAL_LOSS]) if scored else servable[0]
    best = catalog.newest_study_best()
    if best is not None:
        return best
    servable = catalog.servable()
    if not servable:
        raise LookupError(f"no finished run with a model in {catalog.tracking_uri}; "
                          "train one: python -m vae_lab.train")
    return servable[0]


class LoadedRuns:
    """Models of recently used runs, kept loaded (least recently used dropped first)."""

    def __init__(self, catalog: RunCatalog, keep: int = LOADED_RUNS_KEPT):
        self.catalog = catalog
        self.keep = keep
        self._loaded: OrderedDict[str, ServedRun] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> ServedRun:
        with self._lock:
            if run_id in self._loaded:
                self._loaded.move_to_end(run_id)
                return self._loaded[run_id]
            self.catalog.get(run_id)
            try:
                served = ServedRun.load(run_id, self.catalog.tracking_uri)
            except DataUnavailable as error:
                raise RequestError(f"run {run_id}: {error}", status=503) from None
            self._loaded[run_id] = served
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return served


# ----------------------------------------------------------------------------- query parameters

def _number(name: str, text: str | None, kind, default):
    if text is None or text == "":
        if default is None:
            raise RequestError(f"missing parameter {name}")
        return default
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise RequestError(f"{name}={text!r} must be a finite number")
    return value


def int_param(name: str, low: int, high: int, default: int | None = None) -> int:
    value = _number(name, request.args.get(name), int, default)
    if not low <= value <= high:
        raise RequestError(f"{name}={value} is out of range; allowed {low}..{high}")
    return value


def float_param(name: str, low: float, high: float, default: float | None = None) -> float:
    value = _number(name, request.args.get(name), float, default)
    if not low <= value <= high:
        raise RequestError(f"{name}={value} is out of range; allowed {low}..{high}")
    return value


def seed_param() -> int:
    """The request's seed; without one, a fresh one (so every such request differs)."""
    return int_param("seed", 0, MAX_SEED, default=secrets.randbelow(2**31))


def latent_param() -> list[float]:
    text = request.args.get("z", "")
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise RequestError("missing parameter z: comma-separated latent values, e.g. z=0.5,-1.2")
    if len(parts) > MAX_LATENT_DIM:
        raise RequestError(f"z has {len(parts)} values; at most {MAX_LATENT_DIM}")
    return [_number("z", part.strip(), float, None) for part in parts]


def png(content: bytes, seed: int | None = None) -> Response:
    response = Response(content, mimetype="image/png")
    response.headers["Cache-Control"] = "no-store"
    if seed is not None:
        response.headers["X-Seed"] = str(seed)
    return response


# ----------------------------------------------------------------------------- the app

def create_app(tracking_uri: str, default_run_id: str | None = None,
               catalog: RunCatalog | None = None) -> Flask:
    """The web app over one MLflow store. `default_run_id` is the run the page opens with and
    the one the short paths (`/prior.png`) use; None = the newest servable run at each request."""
    catalog = catalog or RunCatalog(tracking_uri)
    loaded = LoadedRuns(catalog)
    app = Flask(__name__, static_folder=str(PAGE_DIR), static_url_path="/static")
    app.json.sort_keys = False
    app.extensions["vae_lab.loaded_runs"] = loaded

    def served(run_id: str | None) -> ServedRun:
        if run_id is None:
            run_id = default_run_id or choose_run_or_404(catalog).info.run_id
        return loaded.get(run_id)

    @app.errorhandler(RequestError)
    def refused(error: RequestError):
        return jsonify(error=str(error)), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=f"{error.name.lower()}: {request.method} {request.path}"), error.code

    @app.errorhandler(Exception)
    def crashed(error: Exception):
        app.logger.exception("request failed: %s", request.full_path)
        message = str(error).splitlines()[0] if str(error) else ""
        return jsonify(error=f"internal error: {type(error).__name__}: {message}"), 500

    @app.get("/")
    def page():
        return send_from_directory(PAGE_DIR, "index.html")

    @app.get("/api/runs")
    def runs():
        names = catalog.experiment_names()
        listed = [describe_run(run, names) for run in catalog.servable(list(names))]
        default = default_run_id or (choose_run(catalog).info.run_id if listed else None)
        return jsonify(default=default, runs=listed)

    @app.get("/api/runs/<run_id>")
    def run_info(run_id: str):
        model = loaded.get(run_id)
        summary = describe_run(catalog.get(run_id), catalog.experiment_names())
        return jsonify({**summary, **model.describe()})

    def both_paths(rule: str):
        """Register a view at /api/runs/<run_id>/RULE and at /RULE (the default run)."""
        def register(view):
            app.add_url_rule(f"/api/runs/<run_id>/{rule}", view_func=view)
            app.add_url_rule(f"/{rule}", view_func=view, defaults={"run_id": None}, endpoint=f"default_{view.__name__}")
            return view
        return register

    @both_paths("generate.png")
    def generate(run_id):
        model = served(run_id)
        label = int_param("label", 0, len(model.data.class_names) - 1)
        count = int_param("count", 1, MAX_COUNT, default=8)
        seed = seed_param()
        return png(model.generate(label, count, seed), seed)

    @both_paths("prior.png")
    def prior(run_id):
        model = served(run_id)
        count = int_param("count", 1, MAX_COUNT, default=16)
        seed = seed_param()
        return png(model.prior(count, seed), seed)

    @both_paths("decode.png")
    def decode(run_id):
        return png(served(run_id).decode(latent_param()))

    @both_paths("interpolate.png")
    def interpolate(run_id):
        model = served(run_id)
        last = model.test_count - 1
        index_a, index_b = int_param("a", 0, last), int_param("b", 0, last)
        return png(model.interpolate(index_a, index_b, float_param("t", 0.0, 1.0, default=0.5)))

    @both_paths("test.png")
    def test_image(run_id):
        model = served(run_id)
        return png(model.test_image(int_param("index", 0, model.test_count - 1)))

    @both_paths("latents.json")
    def latents(run_id):
        model = served(run_id)
        means, labels, source = model.latents(catalog.tracking_uri)
        shown = min(len(means), MAX_MAP_POINTS)
        return jsonify(
            run_id=model.run_id, latent_dim=model.model.latent_dim, source=source,
            class_names=list(model.data.class_names), total=len(means),
            z=means[:shown].round(4).tolist(), labels=labels[:shown].tolist(),
        )

    return app


def choose_run_or_404(catalog: RunCatalog) -> Run:
    try:
        return choose_run(catalog)
    except LookupError as error:
        raise RequestError(str(error), status=404) from None


# ----------------------------------------------------------------------------- command line

def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both end `serve_forever` through KeyboardInterrupt. SIGINT is set
    explicitly: a process started in the background inherits it ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.serve",
        description="Serve a page to generate images from a logged model (default: the best run, on "
                    "validation, of the newest study; without studies the newest finished run with a model).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", metavar="RUN_ID", help="serve this run first")
    which.add_argument("--experiment", metavar="NAME",
                       help="serve that experiment's finished run with the lowest val/loss first "
                            "(its newest when no run logged val/loss)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow store (default $MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is out of range; allowed 0..65535", file=sys.stderr)
        return 2

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per request
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    problem = missing_store(tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    catalog = RunCatalog(tracking_uri)
    try:
        run = choose_run(catalog, args.run, args.experiment)
        app = create_app(tracking_uri, run.info.run_id, catalog)
        app.extensions["vae_lab.loaded_runs"].get(run.info.run_id)  # fail now, not on the first click
    except (LookupError, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
              "choose another --port (0 picks a free one)", file=sys.stderr)
        return 2

    summary = describe_run(run, catalog.experiment_names())
    val_loss = f", val/loss {summary['val_loss']:.2f}" if summary["val_loss"] is not None else ""
    print(f"run {summary['run_id']} ({summary['model']}, latent {summary['latent_dim']}{val_loss}, "
          f"experiment {summary['experiment']!r})")
    print(f"serving on {url_of(args.host, server.server_port)}   (Ctrl-C stops)", flush=True)
    stop_on_signals()
    try:
        server.serve_forever()  # werkzeug's returns quietly on KeyboardInterrupt
    finally:
        server.server_close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
