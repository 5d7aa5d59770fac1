"""What a finished run logged, read back: its config and its model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from vae_lab.config import Config, config_from_flat, flatten, parse_yaml
from vae_lab.models.autoencoders import build_model
from vae_lab.names import CONFIG_ARTIFACT, STATE_DICT_ARTIFACT
from vae_lab.tracking.uris import resolve_tracking_uri


def has_logged_model(client: MlflowClient, run_id: str) -> bool:
    """Did the run log its state dict (what `load_logged_model` reads)?"""
    try:
        listed = client.list_artifacts(run_id, STATE_DICT_ARTIFACT.rsplit("/", 1)[0])
    except (mlflow.exceptions.MlflowException, OSError):  # artifact store unreachable or gone
        return False
    return STATE_DICT_ARTIFACT in {item.path for item in listed}


def load_run_config(client: MlflowClient, run_id: str) -> Config:
    """The config a run trained with (its config.yaml). Keys added since are filled with the
    value that reproduces what the run did (a run from before validation splits had none)."""
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, folder)
        flat = flatten(parse_yaml(Path(path).read_text()))
        flat.setdefault("data.val_size", 0)
        return config_from_flat(flat)


def load_logged_model(run_id: str, tracking_uri: str | None = None,
                      map_location: str | torch.device = "cpu", config: Config | None = None):
    """Rebuild a run's model from its config (read from the run unless given) and its state
    dict (`torch.load(weights_only=True)`)."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri or ""))
    config = config or load_run_config(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, STATE_DICT_ARTIFACT, folder)
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(config.model, tuple(checkpoint["image_shape"]), config.prior)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # e.g. a conv model from before the kernel-4 decoder
        raise IncompatibleModel(
            f"run {run_id}'s {config.model.name} was logged by an older vae_lab whose layers differ from "
            f"today's ({str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}); "
            "train it again to use it here") from None
    return model.eval(), config


class IncompatibleModel(ValueError):
    """A logged state dict that today's model of its config cannot hold; the message is one line."""
