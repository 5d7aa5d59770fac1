"""vae_lab.serve: the endpoints through Flask's test client, the command line's bad input, and
one end-to-end test of the page in a real headless Chromium.

Two tiny runs are trained once for the module: a 2-D linear VAE (its latents artifact feeds
the clickable plane) and a 4-D conv VAE logged without images (its latents are encoded on
demand, and it is the one interpolated). A finished run without a model stands for a study's
parent run. Which run `--experiment` starts with is tested on synthetic runs (logged with
MlflowClient, a stand-in file as their model) whose val/loss and test/loss disagree.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import TINY_RUN
from vae_lab.config import build_config
from vae_lab.data.datasets import load_data
from vae_lab.serve.__main__ import main
from vae_lab.serve.app import create_app
from vae_lab.serve.catalog import RunCatalog, choose_run
from vae_lab.names import STATE_DICT_ARTIFACT
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store
from vae_lab.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELL = 28 + 2  # a 28-pixel image and make_grid's 2-pixel padding


@dataclass
class Store:
    uri: str
    plane: str  # linear_vae, latent 2, experiment serve_plane
    wide: str  # conv_vae, latent 4, no image/latent artifacts, experiment serve_wide
    bare: str  # finished, no model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    uri = f"sqlite:///{tmp_path_factory.mktemp('serve') / 'mlruns' / 'mlflow.db'}"

    def tiny(*overrides):
        return train(build_config({}, [*TINY_RUN, f"tracking.uri={uri}", *overrides])).run_id

    plane = tiny("model.latent_dim=2", "eval.enabled=false", "tracking.experiment=serve_plane")
    wide = tiny("model.name=conv_vae", "model.latent_dim=4", "eval.enabled=false",
                "tracking.log_images=false", "tracking.experiment=serve_wide")
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.get_experiment_by_name("serve_wide").experiment_id,
                               tags={"vae_lab.role": "study"})
    client.set_terminated(parent.info.run_id)
    return Store(uri, plane, wide, parent.info.run_id)


@pytest.fixture(scope="module")
def http(store):
    return create_app(store.uri, default_run_id=store.plane).test_client()


def image_of(response) -> Image.Image:
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "image/png"
    assert response.data.startswith(PNG_SIGNATURE)
    return Image.open(io.BytesIO(response.data))


def pixels(response) -> np.ndarray:
    return np.asarray(image_of(response).convert("L"), dtype=np.int16)


# ----------------------------------------------------------------------------- runs

def test_runs_lists_finished_runs_with_a_model_newest_first(http, store):
    listing = http.get("/api/runs").get_json()
    assert listing["default"] == store.plane
    assert [run["run_id"] for run in listing["runs"]] == [store.wide, store.plane]
    wide, plane = listing["runs"]
    assert (wide["model"], wide["latent_dim"], wide["kl_weight"]) == ("conv_vae", 4, 1.0)
    assert (plane["model"], plane["latent_dim"], plane["experiment"]) == ("linear_vae", 2, "serve_plane")
    assert plane["val_loss"] > 0 and plane["test_loss"] > 0


def test_run_info_describes_the_loaded_model(http, store):
    info = http.get(f"/api/runs/{store.wide}").get_json()
    assert info["latent_dim"] == 4 and info["variational"] is True
    assert info["class_names"] == [str(digit) for digit in range(10)]
    assert info["test_count"] == 256 and info["image_shape"] == [1, 28, 28]


def test_choose_run_newest_or_the_experiments_lowest_val_loss(store):
    catalog = RunCatalog(store.uri)
    assert choose_run(catalog).info.run_id == store.wide
    assert choose_run(catalog, experiment="serve_plane").info.run_id == store.plane
    assert choose_run(catalog, experiment="serve_wide").info.run_id == store.wide  # not the bare parent
    assert choose_run(catalog, run_id=store.plane).info.run_id == store.plane


def log_servable_run(client: MlflowClient, experiment_id: str, metrics: dict[str, float],
                     status: str = "FINISHED", with_model: bool = True, start_time: int | None = None,
                     parent: str | None = None) -> str:
    """A run with these final metrics; `with_model` adds a stand-in state dict, enough for the
    catalog to list it (choosing a run never loads its model)."""
    tags = {"mlflow.parentRunId": parent, "vae_lab.role": "trial"} if parent else None
    run_id = client.create_run(experiment_id, start_time=start_time, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
    if with_model:
        client.log_text(run_id, "stand-in", STATE_DICT_ARTIFACT)
    client.set_terminated(run_id, status)
    return run_id


def test_experiment_choice_follows_val_loss_never_test_loss(tracking_uri):
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    chosen_by_val = get_or_create_experiment(client, "val_decides", tracking_uri)
    best_on_val = log_servable_run(client, chosen_by_val, {"val/loss": 95.0, "test/loss": 120.0})
    log_servable_run(client, chosen_by_val, {"val/loss": 100.0, "test/loss": 80.0})  # the lowest test/loss
    log_servable_run(client, chosen_by_val, {"test/loss": 50.0})  # logged before the validation split
    log_servable_run(client, chosen_by_val, {"val/loss": 10.0}, with_model=False)
    log_servable_run(client, chosen_by_val, {"val/loss": 5.0}, status="FAILED")
    catalog = RunCatalog(tracking_uri)
    assert choose_run(catalog, experiment="val_decides").info.run_id == best_on_val

    # no run logged val/loss: the newest servable run, whatever its test/loss
    before_validation = get_or_create_experiment(client, "before_validation", tracking_uri)
    log_servable_run(client, before_validation, {"test/loss": 50.0}, start_time=1_000)
    newest = log_servable_run(client, before_validation, {"test/loss": 90.0}, start_time=2_000)
    assert choose_run(catalog, experiment="before_validation").info.run_id == newest

    listing = create_app(tracking_uri).test_client().get("/api/runs").get_json()["runs"]
    described = next(run for run in listing if run["run_id"] == best_on_val)
    assert (described["val_loss"], described["test_loss"]) == (95.0, 120.0)
    assert next(run for run in listing if run["run_id"] == newest)["val_loss"] is None


def test_without_a_run_the_newest_studys_best_run_on_validation_is_served(tracking_uri):
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = get_or_create_experiment(client, "studies", tracking_uri)

    def study(start_time: int) -> str:
        return client.create_run(experiment, start_time=start_time, tags={"vae_lab.role": "study"}).info.run_id

    older = study(1_000)
    log_servable_run(client, experiment, {"val/loss": 1.0}, parent=older, start_time=1_100)
    newer = study(2_000)
    best_on_val = log_servable_run(client, experiment, {"val/loss": 90.0, "test/loss": 99.0}, parent=newer,
                                   start_time=2_100)
    log_servable_run(client, experiment, {"val/loss": 95.0, "test/loss": 10.0}, parent=newer, start_time=2_200)
    log_servable_run(client, experiment, {"val/loss": 80.0}, parent=newer, start_time=2_300, with_model=False)
    log_servable_run(client, experiment, {"val/loss": 70.0}, start_time=3_000)  # newest run, in no study
    catalog = RunCatalog(tracking_uri)
    assert choose_run(catalog).info.run_id == best_on_val  # lowest val/loss: no best tag
    named = log_servable_run(client, experiment, {"val/loss": 91.0}, parent=newer, start_time=2_400)
    client.set_tag(newer, "vae_lab.best_run_id", named)  # the study's choice, by its objective over seeds
    assert choose_run(RunCatalog(tracking_uri)).info.run_id == named
    assert create_app(tracking_uri).test_client().get("/api/runs").get_json()["default"] == named
    assert len(create_app(tracking_uri).test_client().get("/api/runs").get_json()["runs"]) == 5  # every servable run listed


def test_when_the_study_chose_an_autoencoder_its_best_vae_is_served(tracking_uri):
    # an AE has no prior to sample from: "Generate" and the prior grid would show nothing useful
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = get_or_create_experiment(client, "ae_wins", tracking_uri)
    parent = client.create_run(experiment, start_time=1_000, tags={
        "vae_lab.role": "study", "vae_lab.objectives": "val/recon:minimize"}).info.run_id
    autoencoder = log_servable_run(client, experiment, {"val/recon": 90.0, "val/loss": 90.0}, parent=parent,
                                   start_time=1_100)
    best_vae = log_servable_run(client, experiment, {"val/recon": 100.0, "val/loss": 130.0, "train/kl": 20.0},
                                parent=parent, start_time=1_200)
    log_servable_run(client, experiment, {"val/recon": 110.0, "val/loss": 125.0, "train/kl": 9.0}, parent=parent,
                     start_time=1_300)  # a lower val/loss, but the study chose on val/recon
    client.set_tag(parent, "vae_lab.best_run_id", autoencoder)
    assert choose_run(RunCatalog(tracking_uri)).info.run_id == best_vae
    assert choose_run(RunCatalog(tracking_uri), run_id=autoencoder).info.run_id == autoencoder  # still pickable


def test_switching_runs_keeps_loaded_models(store):
    app = create_app(store.uri)
    loaded = app.extensions["vae_lab.loaded_runs"]
    first = loaded.get(store.plane)
    loaded.get(store.wide)
    assert loaded.get(store.plane) is first
    assert loaded.get(store.wide).model.latent_dim == 4


# ----------------------------------------------------------------------------- pictures

def test_generate_shows_a_test_input_of_the_class_then_the_samples(http, store):
    response = http.get(f"/api/runs/{store.plane}/generate.png?label=3&count=12&seed=0")
    assert response.headers["X-Seed"] == "0"
    panel = pixels(response)
    # the input (32 px with its border), a 2-px rule, then 8 samples a row: 2 rows for 12
    assert panel.shape == (2 * CELL + 2, 32 + 2 + 8 * CELL + 2)
    data = load_data(build_config({}, TINY_RUN).data, "cpu")
    threes = data.test_images[data.test_labels == 3][:, 0].numpy().astype(np.int16)
    shown_input = panel[2:30, 2:30]
    assert np.abs(threes - shown_input).max(axis=(1, 2)).min() <= 1
    samples = [panel[2 + row * CELL:30 + row * CELL, 36 + col * CELL:64 + col * CELL]
               for row, col in [(0, 0), (0, 1), (1, 3)]]
    assert not np.array_equal(samples[0], samples[1])  # noise scaled by a nonzero std
    assert not np.array_equal(samples[1], samples[2])


def test_same_seed_same_bytes_other_seed_other_picture(http, store):
    url = f"/api/runs/{store.wide}/generate.png?label=7&count=8"
    first = http.get(url + "&seed=5").data
    assert http.get(url + "&seed=5").data == first
    assert http.get(url + "&seed=6").data != first
    assert image_of(http.get(url + "&seed=6")).size == (32 + 2 + 8 * CELL + 2, 32)


def test_without_a_seed_each_request_draws_afresh_and_reports_its_seed(http, store):
    url = f"/api/runs/{store.plane}/prior.png?count=9"
    first, second = http.get(url), http.get(url)
    assert first.data != second.data
    assert first.headers["Cache-Control"] == "no-store"
    replay = http.get(f"{url}&seed={first.headers['X-Seed']}")
    assert replay.data == first.data


def test_prior_grid_sizes_and_seeds(http, store):
    assert image_of(http.get(f"/api/runs/{store.wide}/prior.png?count=16&seed=1")).size == (4 * CELL + 2,) * 2
    assert image_of(http.get(f"/api/runs/{store.wide}/prior.png?count=5&seed=1")).size == \
        (2 * CELL + 2, 3 * CELL + 2)
    assert image_of(http.get(f"/api/runs/{store.wide}/prior.png?count=1&seed=1")).size == (32, 32)
    one = http.get(f"/api/runs/{store.wide}/prior.png?count=16&seed=1").data
    assert http.get(f"/api/runs/{store.wide}/prior.png?count=16&seed=2").data != one


def test_short_paths_use_the_run_the_server_started_with(http, store):
    assert http.get("/prior.png?count=4&seed=3").data == \
        http.get(f"/api/runs/{store.plane}/prior.png?count=4&seed=3").data
    assert http.get("/decode.png?z=0.5,-1.2").status_code == 200


def test_decode_a_point_of_the_plane(http, store):
    near = pixels(http.get(f"/api/runs/{store.plane}/decode.png?z=0.5,-1.2"))
    far = pixels(http.get(f"/api/runs/{store.plane}/decode.png?z=-2,2"))
    assert near.shape == (28, 28)
    assert not np.array_equal(near, far)


def test_latents_of_the_plane_come_from_the_artifact_and_match_test_indices(http, store):
    latents = http.get(f"/api/runs/{store.plane}/latents.json").get_json()
    assert latents["source"] == "artifact" and latents["latent_dim"] == 2
    assert len(latents["z"]) == len(latents["labels"]) == latents["total"] == 256
    assert set(latents["labels"]) == set(range(10))
    # dot i is test image i: decoding it gives what interpolating from image i at t=0 gives
    z = ",".join(str(value) for value in latents["z"][5])
    decoded = pixels(http.get(f"/api/runs/{store.plane}/decode.png?z={z}"))
    interpolated = pixels(http.get(f"/api/runs/{store.plane}/interpolate.png?a=5&b=9&t=0"))
    assert np.abs(decoded - interpolated).max() <= 2


def test_latents_without_the_artifact_are_encoded(http, store):
    latents = http.get(f"/api/runs/{store.wide}/latents.json").get_json()
    assert latents["source"] == "encoded" and latents["latent_dim"] == 4
    assert len(latents["z"]) == 256 and all(len(point) == 4 for point in latents["z"])


def test_interpolation_runs_from_one_posterior_mean_to_the_other(http, store):
    url = f"/api/runs/{store.wide}/interpolate.png?a=0&b=1"
    start, middle, end = (pixels(http.get(f"{url}&t={t}")) for t in (0, 0.5, 1))
    assert start.shape == middle.shape == (28, 28)
    assert not np.array_equal(start, end) and not np.array_equal(start, middle)
    latents = http.get(f"/api/runs/{store.wide}/latents.json").get_json()["z"]
    mean_b = ",".join(str(value) for value in latents[1])
    assert np.abs(end - pixels(http.get(f"/api/runs/{store.wide}/decode.png?z={mean_b}"))).max() <= 2
    assert pixels(http.get(f"/api/runs/{store.wide}/test.png?index=0")).shape == (28, 28)


def test_the_page_and_its_script_are_served(http):
    page = http.get("/")
    assert page.status_code == 200 and b'id="generate"' in page.data
    assert http.get("/static/app.js").status_code == 200
    assert http.get("/static/style.css").status_code == 200


# ----------------------------------------------------------------------------- bad requests

BAD_REQUESTS = [
    ("/api/runs/{plane}/generate.png?label=10", 400, "label=10 is out of range; allowed 0..9"),
    ("/api/runs/{plane}/generate.png?label=-1", 400, "out of range"),
    ("/api/runs/{plane}/generate.png?label=three", 400, "is not an integer"),
    ("/api/runs/{plane}/generate.png", 400, "missing parameter label"),
    ("/api/runs/{plane}/generate.png?label=3&count=65", 400, "count=65 is out of range; allowed 1..64"),
    ("/api/runs/{plane}/generate.png?label=3&count=0", 400, "out of range"),
    ("/api/runs/{plane}/generate.png?label=3&seed=abc", 400, "seed='abc' is not an integer"),
    ("/api/runs/{plane}/prior.png?count=1e3", 400, "is not an integer"),
    ("/api/runs/{plane}/prior.png?seed=-4", 400, "out of range"),
    ("/api/runs/{plane}/decode.png?z=1", 400, "z has 1 values; this run's latent size is 2"),
    ("/api/runs/{plane}/decode.png?z=1,nan", 400, "finite"),
    ("/api/runs/{plane}/decode.png?z=1e39,0", 400, "float32"),  # finite in float64, not in the model
    ("/api/runs/{plane}/decode.png?z=1,x", 400, "is not a number"),
    ("/api/runs/{plane}/decode.png", 400, "missing parameter z"),
    ("/api/runs/{wide}/interpolate.png?a=0&b=256&t=0.5", 400, "b=256 is out of range; allowed 0..255"),
    ("/api/runs/{wide}/interpolate.png?a=0&b=1&t=1.5", 400, "t=1.5 is out of range"),
    ("/api/runs/{wide}/interpolate.png?a=0&b=1&t=inf", 400, "finite"),
    ("/api/runs/{wide}/test.png?index=-1", 400, "out of range"),
    ("/api/runs/0123456789abcdef0123456789abcdef/prior.png", 404, "unknown run id"),
    ("/api/runs/not-a-run/generate.png?label=1", 404, "unknown run id"),
    ("/api/runs/{bare}/prior.png", 404, "has no model"),
    ("/api/runs/{bare}", 404, "has no model"),
    ("/no/such/page", 404, "not found"),
    ("/api/runs//prior.png", 404, "not found"),
]


@pytest.mark.parametrize("url, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_line_and_the_app_keeps_serving(http, store, url, status, message):
    response = http.get(url.format(plane=store.plane, wide=store.wide, bare=store.bare))
    assert response.status_code == status
    body = response.get_json()
    assert list(body) == ["error"] and message in body["error"] and "\n" not in body["error"]
    assert http.get(f"/api/runs/{store.plane}/prior.png?count=2&seed=0").status_code == 200


def test_an_error_inside_the_app_is_a_json_500_without_its_details(store):
    app = create_app(store.uri, default_run_id=store.plane)

    def broken():
        raise RuntimeError(f"secret detail from {store.uri}")

    app.add_url_rule("/broken", view_func=broken)
    app.logger.disabled = True
    response = app.test_client().get("/broken")
    assert response.status_code == 500
    assert list(response.get_json()) == ["error"] and "secret detail" not in response.get_data(as_text=True)


def test_errors_the_server_answers_itself_are_json_too(store):
    """A request line or a header line over 64 KiB never reaches the app: werkzeug's handler
    answers 414 or 431 itself, in JSON."""
    import json
    import socket

    from vae_lab.serve.app import make_json_server

    server = make_json_server("127.0.0.1", 0, create_app(store.uri, default_run_id=store.plane))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def answer(request: bytes) -> tuple[str, dict]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
                connection.sendall(request)
                connection.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := connection.recv(65536):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert b"Content-Type: application/json" in head, head
            return head.split(b"\r\n")[0].decode(), json.loads(body)

        # the first 65,537 bytes of a longer line: all the server reads before it answers (bytes it
        # left unread would make the kernel reset the connection, and the answer could be lost)
        request_line = b"GET /api/runs?z=" + b"1" * 10_000_000
        status, body = answer(request_line[:65_537])
        assert status.startswith("HTTP/1.1 414") and "longer than 65,536 bytes" in body["error"]
        status, body = answer(b"GET /api/runs HTTP/1.1\r\nX-Long: " + b"a" * (65_537 - 8))  # a header line too long
        assert status.startswith("HTTP/1.1 431") and body["error"]
    finally:
        server.shutdown()


def test_a_post_is_refused_with_json(http):
    response = http.post("/api/runs")
    assert response.status_code == 405 and "method not allowed" in response.get_json()["error"]


# ----------------------------------------------------------------------------- command line

def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()  # drop what came before (MLflow's log lines when a test made a store)
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_unknown_run_or_experiment_or_a_run_without_a_model_exit_2(store, capsys):
    code, lines = run_cli(capsys, "--tracking-uri", store.uri, "--run", "0" * 32)
    assert code == 2 and len(lines) == 1 and "unknown run id" in lines[0]
    code, lines = run_cli(capsys, "--tracking-uri", store.uri, "--run", store.bare)
    assert code == 2 and len(lines) == 1 and "has no model" in lines[0]
    code, lines = run_cli(capsys, "--tracking-uri", store.uri, "--experiment", "nope")
    assert code == 2 and len(lines) == 1
    assert "no experiment named 'nope'" in lines[0] and "serve_plane" in lines[0]


def test_cli_experiment_without_a_servable_run_exits_2(store, capsys):
    client = MlflowClient(tracking_uri=store.uri)
    parent = client.create_run(client.create_experiment("serve_only_parents"))
    client.set_terminated(parent.info.run_id)
    code, lines = run_cli(capsys, "--tracking-uri", store.uri, "--experiment", "serve_only_parents")
    assert code == 2 and len(lines) == 1 and "has no finished run with a model" in lines[0]


def test_cli_missing_store_exits_2_and_creates_nothing(tmp_path, capsys):
    database = tmp_path / "nowhere" / "mlflow.db"
    code, lines = run_cli(capsys, "--tracking-uri", f"sqlite:///{database}")
    assert code == 2 and len(lines) == 1 and "no MLflow store" in lines[0]
    assert not database.parent.exists()


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--window-size=1200,1600"]


def require_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"the end-to-end test needs headless Chromium ({', '.join(missing)} not found): "
                    "apt-get install -y chromium chromium-driver", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the end-to-end test needs selenium: pip install -e '.[dev]' (or pip install selenium)",
                    pytrace=False)


class ServerProcess:
    """`python -m vae_lab.serve` on a free loopback port (--port 0), its stdout read by a thread."""

    def __init__(self, store: Store, log_path: Path):
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vae_lab.serve", "--run", store.plane, "--port", "0",
             "--tracking-uri", store.uri],
            stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True, env=env,
        )
        self.printed: list[str] = []
        self.reader = threading.Thread(target=lambda: self.printed.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def url(self, timeout: float = 120) -> str:  # generous: a loaded 2-core machine starts it slowly
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            for line in list(self.printed):
                if line.startswith("serving on "):
                    return line.split()[2]
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError(f"the server did not start:\n{self.log_path.read_text()[-2000:]}")

    def interrupt(self) -> str:
        """Ctrl-C; returns everything it printed."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        finally:
            self.process.kill()
        self.reader.join(timeout=5)
        return "".join(self.printed)


def test_the_page_generates_digits_in_headless_chromium(store, tmp_path):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server = ServerProcess(store, tmp_path / "server.log")
    url = server.url()
    assert url.startswith("http://127.0.0.1:")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 60)

        def natural_width(element_id: str) -> int:
            return driver.execute_script(
                "const img = document.getElementById(arguments[0]);"
                "return img.complete && img.src ? img.naturalWidth : 0;", element_id)

        def shown_images() -> list[dict]:
            return driver.execute_script(
                "return Array.from(document.images).filter((img) => img.offsetParent !== null)"
                ".map((img) => ({id: img.id, loaded: img.complete && img.naturalWidth > 0}));")

        driver.get(url)
        picker = Select(driver.find_element(By.ID, "run-picker"))
        # first paint: every picture on the page drawn, the generate panel with the first class
        wait.until(lambda _: len(picker.options) == 2 and all(image["loaded"] for image in shown_images()))
        assert {image["id"] for image in shown_images()} == {"generated", "prior", "decoded"}
        assert picker.first_selected_option.get_attribute("value") == store.plane
        assert "Class 0" in driver.find_element(By.ID, "generated-caption").text
        assert driver.find_element(By.ID, "decoded-z").text == "z = (0.000,0.000)"
        driver.save_screenshot(str(tmp_path / "first_paint.png"))

        Select(driver.find_element(By.ID, "label")).select_by_value("3")
        count = driver.find_element(By.ID, "count")
        count.clear()
        count.send_keys("8")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda _: "Class 3" in driver.find_element(By.ID, "generated-caption").text)
        assert natural_width("generated") == 32 + 2 + 8 * CELL + 2
        assert "Class 3" in driver.find_element(By.ID, "generated-caption").text

        plane = driver.find_element(By.ID, "latent-map")
        assert plane.is_displayed()
        webdriver.ActionChains(driver).move_to_element_with_offset(plane, 40, -30).click().perform()
        wait.until(lambda _: natural_width("decoded") == 28)
        assert driver.find_element(By.ID, "decoded-z").text.startswith("z = (")

        picker.select_by_value(store.wide)  # a 4-D latent: the slider instead of the plane
        wait.until(lambda _: driver.find_element(By.ID, "interpolate-section").is_displayed()
                   and natural_width("interpolated") == 28)
        assert not plane.is_displayed()
        assert driver.find_element(By.ID, "status").text == ""
    finally:
        driver.quit()
        printed = server.interrupt()
    assert server.process.returncode == 0 and "stopped" in printed
    assert "Traceback" not in (tmp_path / "server.log").read_text()
