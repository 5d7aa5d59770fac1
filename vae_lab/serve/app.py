"""The page to play with logged models (`python -m vae_lab.serve` serves it): generate digits
of a class, sample the prior, click around a 2-D latent plane, interpolate between test images.

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

import json
import math
import secrets
from http import HTTPStatus
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from mlflow.entities import Run
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler, make_server

from vae_lab.serve.catalog import LoadedRuns, RunCatalog, choose_run, describe_run
from vae_lab.serve.images import RequestError, ServedRun

PAGE_DIR = Path(__file__).resolve().parent / "page"
DEFAULT_PORT = 20202
MAX_COUNT = 64
MAX_LATENT_DIM = 4096
MAX_MAP_POINTS = 5000
MAX_SEED = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # a larger number is infinite in float32


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
    if not math.isfinite(value) or (kind is float and abs(value) > FLOAT32_MAX):
        raise RequestError(f"{name}={text!r} must be a finite number (the model computes in float32: "
                           f"|x| <= {FLOAT32_MAX:.3g})")
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


# ----------------------------------------------------------------------------- the server

class JsonErrorRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, with the errors it answers itself (before the app sees the
    request: a request line over 64 KiB is 414, a header line over 64 KiB 431) in JSON like the
    app's (a malformed HTTP/0.9-style line gets the JSON body without headers, as HTTP/0.9 has none)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        reasons = {HTTPStatus.REQUEST_URI_TOO_LONG: "the request line is longer than 65,536 bytes (allowed: "
                                                    "65,536; the page's requests are far shorter)"}
        body = json.dumps({"error": reasons.get(code) or message or HTTPStatus(code).phrase}).encode()
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(body)


def make_json_server(host: str, port: int, app: Flask):
    """A threaded werkzeug server for `app` that answers every error in JSON."""
    return make_server(host, port, app, threaded=True, request_handler=JsonErrorRequestHandler)


# ----------------------------------------------------------------------------- the app

def create_app(tracking_uri: str, default_run_id: str | None = None,
               catalog: RunCatalog | None = None) -> Flask:
    """The web app over one MLflow store. `default_run_id` is the run the page opens with and
    the one the short paths (`/prior.png`) use; None = the newest servable run at each request."""
    catalog = catalog or RunCatalog(tracking_uri)
    loaded = LoadedRuns(catalog)
    app = Flask(__name__, static_folder=str(PAGE_DIR), static_url_path="/static")
    app.json.sort_keys = False
    app.url_map.merge_slashes = False  # `/api/runs//prior.png` is a 404 like any unknown path, not a redirect
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
        # the details go to the server's log, not to whoever sent the request
        app.logger.exception("request failed: %s", request.full_path)
        return jsonify(error=f"internal error answering {request.method} {request.path}; see the server's log"), 500

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
