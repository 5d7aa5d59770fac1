"""What a finished run logged, read back: its config and its model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from vae_lab.components import load_file_module
from vae_lab.config import COMPONENT_KEYS, Config, ConfigError, config_from_flat, file_reference, flatten, parse_yaml
from vae_lab.models.components import build_model
from vae_lab.models.registry import MODEL_FAMILIES, PRIORS
from vae_lab.names import COMPONENTS_ARTIFACT_DIR, CONFIG_ARTIFACT, STATE_DICT_ARTIFACT
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
        pin_logged_components(client, run_id, flat)
        return config_from_flat(flat)


def pin_logged_components(client: MlflowClient, run_id: str, flat: dict) -> None:
    """A `file.py:Class` component means, from now on in this process, the copy of the file the
    run logged (the code it trained with), wherever the file is now or whatever it holds."""
    registries = {"model.name": MODEL_FAMILIES, "prior.name": PRIORS}
    for key in COMPONENT_KEYS:
        reference = flat.get(key)
        found = file_reference(reference) if isinstance(reference, str) else None
        if found is None:
            continue
        path, attribute = found
        with tempfile.TemporaryDirectory() as folder:
            try:
                logged = Path(client.download_artifacts(run_id, f"{COMPONENTS_ARTIFACT_DIR}/{path.name}", folder))
            except (mlflow.exceptions.MlflowException, OSError):
                continue  # not logged (or unreachable): the file itself is used, if it is there
            module = load_file_module(logged)
        component = module
        for part in attribute.split("."):
            component = getattr(component, part, None)
        if component is None:
            raise ConfigError(f"run {run_id}'s logged {path.name} has no {attribute}")
        registries[key].pin(reference, component)


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
