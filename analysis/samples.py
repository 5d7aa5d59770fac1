"""Logged models side by side: the same test images through every model, and prior samples.

Each model comes back from MLflow with `vae_lab.tracking.logged.load_logged_model` (state dict +
config, loaded with weights_only=True) and its test images from `vae_lab.data.datasets.load_data`
with the run's own data config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vae_lab.data.datasets import DataUnavailable, load_data  # noqa: E402
from vae_lab.evaluation.figures import image_grid  # noqa: E402
from vae_lab import names  # noqa: E402
from vae_lab.names import STATE_DICT_ARTIFACT  # noqa: E402
from vae_lab.tracking.logged import has_logged_model, load_logged_model  # noqa: E402

from .plots import DPI, Figure  # noqa: E402

IMAGE_COUNT = 10
SAMPLE_COUNT = 12
MAX_MODELS = 24


@dataclass
class LoadedModel:
    label: str
    run_id: str
    model: torch.nn.Module
    config: object  # vae_lab.config.Config
    data_digest: str | None = None  # what the run recorded it trained on (None: a run from before digests)


def one_run_per_configuration(finished: pd.DataFrame) -> pd.DataFrame:
    """The run with the lowest seed of each configuration, in table order."""
    if "params.train.seed" in finished:
        seeds = pd.to_numeric(finished["params.train.seed"], errors="coerce")
        finished = finished.assign(_seed=seeds).sort_values("_seed", kind="stable").drop(columns="_seed")
    return finished.drop_duplicates("label", keep="first")


def load_models(runs: pd.DataFrame, tracking_uri: str) -> tuple[list[LoadedModel], list[str]]:
    """Models of the given runs, and 'label (run): why' for each run whose model could not be loaded."""
    client = MlflowClient(tracking_uri=tracking_uri)
    loaded, missing = [], []
    for _, run in tqdm(list(runs.iterrows()), desc="models", leave=False, unit="run"):
        name = f"{run['label']} ({run['run_id'][:8]})"
        if not has_logged_model(client, run["run_id"]):
            missing.append(f"{name}: no logged model ({STATE_DICT_ARTIFACT})")
            continue
        try:
            model, config = load_logged_model(run["run_id"], tracking_uri)
        except Exception as error:  # noqa: BLE001 - an unreadable model is reported, not fatal
            missing.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        digest = run.get(f"tags.{names.DATA_DIGEST_TAG}")
        loaded.append(LoadedModel(run["label"], run["run_id"], model, config, digest if isinstance(digest, str) else None))
    return loaded, missing


def _data_key(config) -> tuple:
    data = config.data
    return data.name, data.path, data.resize, data.channels, data.binarize, data.root, repr(data.options)


def _rows_figure(rows: list[tuple[str, torch.Tensor]], path: Path, per_row: int) -> Path:
    """One labelled row of images per entry, images as [N, C, H, W] in [0, 1]."""
    grids = [image_grid(images.float().cpu().clamp(0, 1), nrow=per_row, padding=2, pad_value=1.0)
             for _, images in rows]
    height, width = grids[0].shape[1], max(grid.shape[2] for grid in grids)
    canvas = torch.ones(3 if grids[0].shape[0] == 3 else 1, height * len(grids), width)
    for index, grid in enumerate(grids):
        canvas[:, index * height:(index + 1) * height, :grid.shape[2]] = grid[:canvas.shape[0]]
    figure, ax = plt.subplots(figsize=(0.55 * per_row + 2.6, 0.6 * len(rows) + 0.4))
    ax.imshow(canvas.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(index + 0.5) * height for index in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


@torch.no_grad()
def reconstructions(models: list[LoadedModel], folder: Path) -> tuple[list[Figure], list[str]]:
    """'Original | model 1 | model 2 | ...' on the same test images; one figure per dataset."""
    groups: dict[tuple, list[LoadedModel]] = {}
    for entry in models:
        groups.setdefault(_data_key(entry.config), []).append(entry)
    figures, missing = [], []
    for index, (key, entries) in enumerate(groups.items()):
        title = "Reconstructions" + (f" ({key[0]})" if len(groups) > 1 else "")
        try:
            data = load_data(entries[0].config.data, "cpu")
        except DataUnavailable as error:
            missing.extend(f"{entry.label}: data {key[0]} unavailable ({error})" for entry in entries)
            figures.append(Figure(title, skipped=f"dataset {key[0]} is not on this machine"))
            continue
        changed = [entry for entry in entries if entry.data_digest and entry.data_digest != data.digest]
        missing.extend(f"{entry.label}: data {key[0]} changed since the run (digest {entry.data_digest[:12]}, "
                       f"now {data.digest[:12]})" for entry in changed)
        entries = [entry for entry in entries if entry not in changed]
        if not entries:
            figures.append(Figure(title, skipped=f"dataset {key[0]} changed since these runs trained on it"))
            continue
        generator = torch.Generator().manual_seed(0)
        originals = data.to_float(data.test_images[:IMAGE_COUNT], generator)
        rows = [("original", originals)]
        for entry in entries:
            model = entry.model
            rows.append((entry.label, torch.sigmoid(model.decode(model.encode(originals).mean))))
        path = _rows_figure(rows, folder / f"reconstructions{'' if index == 0 else f'_{index}'}.png", IMAGE_COUNT)
        figures.append(Figure(title, path, caption=f"The first {IMAGE_COUNT} test images of {key[0]} (top row) "
                                                   "and each model's reconstruction from the posterior mean."))
    return figures, missing


@torch.no_grad()
def prior_samples(models: list[LoadedModel], path: Path, seed: int = 0) -> Figure:
    title = "Prior samples"
    if not models:
        return Figure(title, skipped="no logged model could be loaded")
    rows = []
    for entry in models:
        generator = torch.Generator().manual_seed(seed)
        rows.append((entry.label, torch.sigmoid(entry.model.sample(SAMPLE_COUNT, generator))))
    shapes = {images.shape[1:] for _, images in rows}
    if len(shapes) > 1:  # different image sizes cannot share rows; keep the most common size
        common = max(shapes, key=lambda shape: sum(images.shape[1:] == shape for _, images in rows))
        rows = [(label, images) for label, images in rows if images.shape[1:] == common]
    has_ae = any(not entry.model.variational for entry in models)
    caption = f"{SAMPLE_COUNT} decoded draws z ~ N(0, I) per model (seed {seed})."
    if has_ae:
        caption += " A plain AE has no prior: its row shows what its decoder makes of N(0, I) noise."
    return Figure(title, _rows_figure(rows, path, SAMPLE_COUNT), caption=caption)
