"""Links that open MLflow's UI on a study's or a run's page, and what a command prints with them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from vae_lab import names
from vae_lab.cli import shell_command
from vae_lab.tracking.uris import redact


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told otherwise


def ui_links(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> list[str]:
    """Links that open MLflow's UI in model-training mode on the experiment's runs (and on one run):
    on the tracking server itself, or on what `mlflow ui` serves for a local store. No credentials."""
    base = UI_ADDRESS
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        base = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                           parts.path.rstrip("/"), "", ""))
    links = [f"{base}/#/experiments/{experiment_id}?{names.UI_WORKFLOW}"]
    if run_id:
        links.append(f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{names.UI_WORKFLOW}")
    return links


def browse_lines(tracking_uri: str, experiment_id: str, run_id: str, run_words: str) -> list[str]:
    """What a command prints so a person can look at its runs in MLflow's UI."""
    experiment_link, run_link = ui_links(tracking_uri, experiment_id, run_id)
    serve = [] if tracking_uri.startswith(("http://", "https://")) else \
        [("browse", f"{shell_command('mlflow')} ui --backend-store-uri {redact(tracking_uri)}   (then open the links below)")]
    return [f"  {label + ':':9}{text}" for label, text in [*serve, ("runs", experiment_link), (run_words, run_link)]]
