"""2-D maps of the runs' test latents: PCA and t-SNE side by side, coloured by class.

Reads each run's `latents/test_latents.parquet` (columns z0..z{d-1}, label) from MLflow.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vae_lab.evaluation.figures import project_2d, scatter_by_class  # noqa: E402

from .plots import DPI, Figure  # noqa: E402
from .runs import download_artifact  # noqa: E402

LATENTS_ARTIFACT = "latents/test_latents.parquet"
TSNE_MAX_POINTS = 2000
MAX_MAPS = 24  # beyond this, one map per configuration (its first seed)
PAIRS_PER_ROW = 2


def load_latents(client, runs: pd.DataFrame) -> tuple[list[tuple[str, pd.DataFrame]], list[str]]:
    """(title, latents frame) for each run that has latents, and the titles of those that do not."""
    found, missing = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _, run in tqdm(list(runs.iterrows()), desc="latents", leave=False, unit="run"):
            title = f"{run['label']} · {run['run_id'][:8]}"
            local = download_artifact(client, run["run_id"], LATENTS_ARTIFACT, Path(folder) / run["run_id"])
            if local is None:
                missing.append(title)
                continue
            found.append((title, pd.read_parquet(local)))
    return found, missing


def subsample(frame: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    if len(frame) <= limit:
        return frame
    return frame.sample(n=limit, random_state=seed).sort_index()


def tsne_2d(latents: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(min(30.0, max(2.0, (len(latents) - 1) / 3)))
    init = "pca" if latents.shape[1] >= 2 else "random"
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed, max_iter=500)
    # a few thousand points: one thread is several times faster than OpenMP threads
    # contending on a busy machine, and never much slower
    with threadpool_limits(limits=1):
        return tsne.fit_transform(latents.astype(np.float32))


def latent_maps(maps: list[tuple[str, pd.DataFrame]], path: Path, class_names=None, seed: int = 0) -> Figure:
    title = "Test latents: PCA and t-SNE"
    usable = [(name, frame) for name, frame in maps if len(frame) >= 5]
    if not usable:
        return Figure(title, skipped="no run has test latents (artifact latents/test_latents.parquet)")
    rows = math.ceil(len(usable) / PAIRS_PER_ROW)
    columns = 2 * min(PAIRS_PER_ROW, len(usable))
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    if class_names is None and all("class" in frame for _, frame in usable):  # the names the runs logged
        pairs = pd.concat([frame[["label", "class"]] for _, frame in usable]).drop_duplicates("label")
        class_names = dict(zip(pairs["label"], pairs["class"]))
    for index, (name, frame) in enumerate(tqdm(usable, desc="t-SNE", leave=False, unit="run")):
        frame = subsample(frame, TSNE_MAX_POINTS, seed)
        latents = frame[[column for column in frame.columns if column.startswith("z")]].to_numpy()
        labels = frame["label"].to_numpy()
        projected, axis_name = project_2d(latents)
        row, column = divmod(index, PAIRS_PER_ROW)
        pca_ax, tsne_ax = axes[row, 2 * column], axes[row, 2 * column + 1]
        for ax, points, kind in ((pca_ax, projected, "PCA" if axis_name == "PC" else "z (2-D)"),
                                 (tsne_ax, tsne_2d(latents, seed), "t-SNE")):
            ax.set_visible(True)
            scatter_by_class(ax, points, labels, class_names, size=3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{kind}\n{name}", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=min(len(labels), 10), markerscale=3,
                  fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * rows)))
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    points = max(len(frame) for _, frame in usable)
    return Figure(title, path, caption=f"Posterior means of the test images, one pair of maps per run; "
                                       f"t-SNE (seed {seed}) on at most {TSNE_MAX_POINTS} points "
                                       f"(largest run: {points} points).")


EVOLUTION_ARTIFACT = "latents/evolution.gif"


def evolution_figures(client, runs: pd.DataFrame, folder: Path) -> list[Figure]:
    """One animated figure per run that logged latents/evolution.gif (pass one run per configuration)."""
    figures = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (_, run) in enumerate(runs.iterrows()):
            local = download_artifact(client, run["run_id"], EVOLUTION_ARTIFACT, Path(scratch) / run["run_id"])
            if local is None:
                continue
            path = folder / f"latent_evolution_{index}.gif"
            path.write_bytes(local.read_bytes())
            seed = run.get("params.train.seed")
            figures.append(Figure(f"The latent space forming: {run['label']}", path, caption=(
                f"Run {run['run_id'][:8]}" + (f" (seed {seed})" if isinstance(seed, str) else "") +
                ": posterior means of the first test images during training, by class; beyond 2-D "
                "through one PCA of the last frame, so the axes stay fixed and hold every frame's points.")))
    return figures
