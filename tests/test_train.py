import math
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import mlflow.pytorch
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import TINY_RUN
from vae_lab.config import build_config
from vae_lab.models.autoencoders import MLPAutoencoder
from vae_lab.training.trial import TrainingDiverged
from vae_lab.training.device import resolve_device
from vae_lab.tracking.logged import load_logged_model
from vae_lab.train import main, train

EXPECTED_ARTIFACTS = [
    "config.yaml",
    "images/reconstructions.png",
    "images/prior_samples.png",
    "images/class_panel.png",
    "images/latent_traversal.png",
    "latents/test_latents.parquet",
    "latents/latent_scatter.png",
    "eval/kl_per_dim.csv",
    "model_state/state_dict.pt",
]


def _all_artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(_all_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return found


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tiny conv VAE run with a 2-D latent in its own store, shared by the checks below."""
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    from conftest import TINY_RUN

    config = build_config(overrides=[*TINY_RUN, f"tracking.uri={uri}", "model.name=conv_vae",
                                     "model.latent_dim=2", "train.epochs=2", "tracking.experiment=core"])
    result = train(config)
    return uri, config, result


def test_run_logs_params_tags_and_stepped_metrics(tracked_run):
    uri, config, result = tracked_run
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "conv_vae"
    assert run.data.params["loss.kl_weight"] == "1.0"
    assert set(config.flat()) <= set(run.data.params)
    assert run.data.tags["device"] == str(resolve_device(config.device))
    assert run.data.tags["torch_version"] == torch.__version__
    for key in ["train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl",
                "val/mse_per_pixel", "test/loss", "test/recon", "test/kl", "test/mse_per_pixel",
                "train/images_per_sec", "train/best_epoch", "train/stopped_epoch"]:
        assert key in run.data.metrics, key
    # Bernoulli on grey pixels is a loss, not a likelihood: no ELBO, no IWAE NLL
    assert not {"val/elbo", "test/elbo", "eval/nll_iwae"} & set(run.data.metrics)
    assert "not computed" in run.data.tags["nll_iwae"]
    # val/* every epoch, test/* once, at the step of the last training step
    val_steps = [metric.step for metric in client.get_metric_history(result.run_id, "val/loss")]
    epoch_steps = [metric.step for metric in client.get_metric_history(result.run_id, "epoch")]
    assert len(val_steps) == 2 and val_steps == epoch_steps and val_steps[0] < val_steps[1]
    test_history = client.get_metric_history(result.run_id, "test/loss")
    assert [metric.step for metric in test_history] == [val_steps[-1]]
    assert run.data.metrics["train/stopped_epoch"] == 2
    assert run.data.metrics["test/loss"] == pytest.approx(result.metrics["test/loss"])
    assert run.data.metrics["val/loss"] == pytest.approx(result.metrics["val/loss"])
    assert run.data.metrics["test/loss"] == pytest.approx(run.data.metrics["test/recon"]
                                                          + run.data.metrics["test/kl"])


@pytest.mark.parametrize("normalized", [["data.binarize=dynamic"], ["loss.likelihood=gaussian"]])
def test_elbo_and_iwae_nll_are_logged_where_the_likelihood_is_normalized(tracked_run, normalized):
    from conftest import TINY_RUN

    uri = tracked_run[0]
    config = build_config(overrides=[*TINY_RUN, *normalized, f"tracking.uri={uri}", "tracking.log_images=false",
                                     "tracking.log_model=false", "tracking.experiment=normalized"])
    result = train(config)
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    for split in ("val", "test"):
        assert metrics[f"{split}/elbo"] == pytest.approx(-(metrics[f"{split}/recon"] + metrics[f"{split}/kl"]))
    assert metrics["eval/nll_iwae"] > 0
    if config.loss.likelihood == "gaussian":  # the constant is in: D/2 log(pi) = 449 nats at the default sigma
        assert metrics["test/recon"] > 784 / 2 * math.log(math.pi)


def test_run_logs_every_artifact(tracked_run, tmp_path):
    uri, config, result = tracked_run
    client = MlflowClient(uri)
    artifacts = _all_artifacts(client, result.run_id)
    for name in EXPECTED_ARTIFACTS:
        assert name in artifacts, f"{name} missing from {artifacts}"
    folder = Path(client.download_artifacts(result.run_id, "", str(tmp_path)))
    for png in folder.rglob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 20
    latents = pd.read_parquet(folder / "latents" / "test_latents.parquet")
    assert list(latents.columns) == ["z0", "z1", "label", "class"]
    assert (latents["class"] == latents["label"].astype(str)).all()  # mnist5k's classes are its digits
    assert len(latents) == 256
    with Image.open(folder / "images" / "class_panel.png") as panel:
        assert panel.size[1] > panel.size[0] // 2  # ten rows of (input + 8 samples)


def test_logged_model_loads_back_and_decodes(tracked_run):
    uri, config, result = tracked_run
    model, loaded_config = load_logged_model(result.run_id, uri)
    assert loaded_config.model.name == "conv_vae"
    z = torch.zeros(3, 2)
    assert torch.allclose(model.decode(z), result.model.cpu().eval().decode(z), atol=1e-6)
    mlflow.set_tracking_uri(uri)
    pickled = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")  # the MLflow-native copy
    samples = pickled.sample(4, torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 28, 28)
    assert pickled.encode(torch.rand(2, 1, 28, 28)).mean.shape == (2, 2)


MODEL_WITHOUT_THE_PACKAGE = """
import sys
import mlflow.pytorch, torch
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__]
sys.path[:] = [entry for entry in sys.path if entry not in ("", {repo!r})]
model = mlflow.pytorch.load_model({uri!r})
import vae_lab
print(vae_lab.__file__)
print(tuple(model.sample(4, torch.Generator().manual_seed(0)).shape), tuple(model(torch.rand(2, 1, 28, 28)).logits.shape))
"""


def test_the_mlflow_model_loads_and_runs_with_only_the_code_it_carries(tracked_run, tmp_path):
    """The MLflow model carries the part of vae_lab a model needs (tracker.MODEL_CODE): it
    loads, samples and reconstructs where the installed package cannot be imported."""
    uri, _, result = tracked_run
    model_uri = MlflowClient(uri).download_artifacts(result.run_id, "model", str(tmp_path))
    script = MODEL_WITHOUT_THE_PACKAGE.format(repo=str(Path(__file__).resolve().parents[1]), uri=model_uri)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported_from, shapes = done.stdout.strip().splitlines()[-2:]
    assert imported_from.startswith(str(Path(model_uri) / "code" / "vae_lab"))
    assert shapes == "(4, 1, 28, 28) (2, 1, 28, 28)"
    carried = {path.name for path in (Path(model_uri) / "code" / "vae_lab").iterdir()}
    assert carried == {"__init__.py", "config.py", "components.py", "names.py", "data", "models"}


def test_the_mlflow_model_is_the_runs_output_with_its_end_of_run_metrics_once(tracked_run):
    uri, _, result = tracked_run
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == result.run_id and model.status.name == "READY" and model.name == "model"
    assert model.params["model.name"] == "conv_vae"
    linked = {metric.key: metric.value for metric in model.metrics}
    assert {"eval/probe_accuracy", "eval/fd_classifier", "test/loss"} <= linked.keys()
    assert linked["test/loss"] == run.data.metrics["test/loss"]
    assert len(client.get_metric_history(result.run_id, "eval/probe_accuracy")) == 1  # not logged twice


def test_training_lowers_the_validation_loss(tracked_run):
    uri, _, _ = tracked_run
    config = build_config(overrides=["model.hidden_dims=[128]", "model.latent_dim=8", "train.epochs=3",
                                     "train.progress=false", "eval.enabled=false",
                                     "tracking.enabled=false", f"tracking.uri={uri}"])
    per_epoch = []
    result = train(config, on_epoch_end=lambda epoch, metrics: per_epoch.append(metrics["val/loss"]))
    untrained = 784 * math.log(2)  # BCE of p=0.5 per pixel, the loss of a blank model
    assert per_epoch[-1] < 0.5 * untrained
    assert per_epoch[-1] < per_epoch[0] - 10  # nats per image
    assert result.run_id is None  # tracking off


def test_nan_loss_stops_the_run_and_marks_it_failed(tracked_run):
    from conftest import TINY_RUN

    tracking_uri = tracked_run[0]
    config = build_config(overrides=[*TINY_RUN, f"tracking.uri={tracking_uri}", "train.lr=1e12",
                                     "tracking.experiment=nan", "tracking.log_every_steps=1"])
    with pytest.raises(TrainingDiverged, match="diverged"):
        train(config)
    runs = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("nan").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "diverged" in runs[0].data.tags["failure_reason"]


def test_interrupt_marks_the_run_killed(tracked_run):
    from conftest import TINY_RUN

    tracking_uri = tracked_run[0]
    config = build_config(overrides=[*TINY_RUN, f"tracking.uri={tracking_uri}",
                                     "tracking.experiment=interrupted", "train.epochs=2"])

    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_epoch_end=interrupt)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])
    assert [run.info.status for run in runs] == ["KILLED"]


class _DropsASignal(MLPAutoencoder):
    """A family whose third encoding gets a SIGTERM while a finalizer runs, as a progress bar or
    a generator collected between two steps can: Python drops the exception it raises there."""

    def __init__(self, image_shape, latent_dim, hidden_dims=(400,)):
        super().__init__(image_shape, latent_dim, hidden_dims)
        self.encodings = 0

    def encode(self, images):
        self.encodings += 1
        if self.encodings == 3:
            _SignalsWhenCollected()  # collected at once
        return super().encode(images)


class _SignalsWhenCollected:
    def __del__(self):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # runs the handler here


def test_a_sigterm_that_a_finalizer_drops_still_stops_the_run(tracking_uri, monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    steps_per_epoch = 512 // 64
    assert main([*TINY_RUN, f"tracking.uri={tracking_uri}", "tracking.experiment=dropped", "train.epochs=3",
                 f"model.name={__file__}:_DropsASignal", "tracking.log_every_steps=1"]) == 130
    assert sum(issubclass(kind, KeyboardInterrupt) for kind in dropped) == 1  # Python dropped it
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("dropped").experiment_id])
    assert run.info.status == "KILLED"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) < 3 * steps_per_epoch  # stopped at the next step, not after training on


@pytest.mark.parametrize("arguments, words", [
    (["model.name=resnet"], ["model.name", "conv_vae"]),
    (["data.name=imagenet"], ["data.name", "mnist5k"]),
    (["model.latnt_dim=3"], ["model.latnt_dim"]),
    (["model.latent_dim=two"], ["model.latent_dim", "integer"]),
    (["model.latent_dim=-4"], ["positive"]),
    (["loss.kl_weight=-0.5"], ["loss.kl_weight"]),
    (["data.name=kmnist", "data.download=false", "data.root=/nonexistent"], ["kmnist", "download"]),
    (["data.val_size=1.5"], ["data.val_size", "fraction"]),
    (["data.val_size=-0.1"], ["data.val_size", "fraction"]),
    (["data.val_size=4990"], ["data.val_size", "batch"]),
    (["data.train_limit=256", "data.val_size=0.9"], ["data.val_size", "batch"]),
    (["train.early_stopping_patience=-1"], ["train.early_stopping_patience"]),
    (["train.early_stopping_patience=5", "data.val_size=0"], ["train.early_stopping_patience", "data.val_size"]),
])
def test_bad_input_exits_2_with_one_line_and_no_run(arguments, words, tracking_uri, capsys):
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    for word in words:
        assert word in error
    database = Path(tracking_uri[len("sqlite:///"):])
    assert not database.exists()  # no store, experiment or run was created


def test_bad_yaml_file_exits_2(tmp_path, tracking_uri, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("[1, 2]\n")
    assert main(["--config", str(path)]) == 2
    assert "mapping" in capsys.readouterr().err


def test_command_line_run_end_to_end(tmp_path, tiny_overrides):
    result = subprocess.run([sys.executable, "-m", "vae_lab.train", *tiny_overrides, "model.name=ae",
                             "tracking.log_model=false"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    run_id = re.search(r"^run (\w+) in experiment", result.stdout, re.MULTILINE).group(1)
    assert re.search(rf"^  run:     http://127.0.0.1:5000/#/experiments/\d+/runs/{run_id}\?workflowType=machine_learning$",
                     result.stdout, re.MULTILINE)
    bad = subprocess.run([sys.executable, "-m", "vae_lab.train", "model.name=nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.name" in bad.stderr


def test_early_stopping_restores_the_best_epoch_before_test_and_the_model(tracked_run):
    from conftest import OVERFITS, TINY_RUN

    uri = tracked_run[0]
    config = build_config(overrides=[*TINY_RUN, *OVERFITS, f"tracking.uri={uri}", "tracking.experiment=early",
                                     "train.early_stopping_patience=2", "eval.enabled=false"])
    result = train(config)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    stopped, best = run.data.metrics["train/stopped_epoch"], run.data.metrics["train/best_epoch"]
    assert stopped < 40 and stopped - best == 2 and run.data.tags["vae_lab.stop_reason"] == "early_stopping"
    per_epoch = [metric.value for metric in client.get_metric_history(result.run_id, "val/loss")][:int(stopped)]
    assert len(per_epoch) == stopped and per_epoch.index(min(per_epoch)) + 1 == best
    assert run.data.metrics["val/loss"] == pytest.approx(min(per_epoch))
    # test/* once, after the stop, from the restored weights (also the logged model's)
    assert [m.step for m in client.get_metric_history(result.run_id, "test/loss")] == \
        [client.get_metric_history(result.run_id, "epoch")[-1].step]
    model, _ = load_logged_model(result.run_id, uri)
    z = torch.randn(5, 16)
    assert torch.allclose(model.decode(z), result.model.cpu().eval().decode(z), atol=1e-6)
