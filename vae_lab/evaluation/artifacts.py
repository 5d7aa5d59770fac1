"""The files a finished run leaves in MLflow besides its metrics: images and latents (its
config.yaml is logged when the run starts, `vae_lab.tracking.tracker`).

    images/reconstructions.png   inputs above, reconstructions below
    images/prior_samples.png     64 decoded draws from the prior
    images/class_panel.png       per class: one test input, then samples around its posterior
    images/latent_traversal.png  decoder grid over [-2, 2]^2 (2-D latent) or class-mean interpolations
    latents/test_latents.parquet posterior means of the test set, columns z0..z{d-1} and label
    latents/latent_scatter.png   those latents coloured by class (PCA first beyond 2-D)
    eval/kl_per_dim.csv          mean KL per latent dimension (VAEs)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vae_lab.evaluation import figures, latent_evolution
from vae_lab.config import Config
from vae_lab.data.datasets import ImageData
from vae_lab.evaluation.metrics import EvaluationResult
from vae_lab.models.autoencoders import Autoencoder

IMAGE_COUNT = 16


@torch.no_grad()
def test_latents(model: Autoencoder, data: ImageData, limit: int, batch_size: int = 1000):
    """Posterior means and labels of (at most `limit`) test images, as numpy arrays."""
    means, labels = [], []
    for images, batch_labels in data.batches("test", batch_size, limit=limit):
        means.append(model.encode(images).mean.float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(means).numpy(), torch.cat(labels).numpy()


def latents_frame(latents: np.ndarray, labels: np.ndarray, class_names=None) -> pd.DataFrame:
    """Columns z0..z{d-1}, label, and class (the label's name, for plots read back from the run)."""
    frame = pd.DataFrame(latents, columns=[f"z{index}" for index in range(latents.shape[1])])
    frame["label"] = labels.astype(np.int64)
    if class_names is not None:
        frame["class"] = [str(class_names[label]) for label in frame["label"]]
    return frame


def write_kl_per_dim(evaluation: EvaluationResult, folder: Path) -> None:
    """eval/kl_per_dim.csv: the mean KL of each latent dimension on the test split."""
    (folder / "eval").mkdir(exist_ok=True)
    pd.DataFrame({"dim": np.arange(len(evaluation.kl_per_dim)), "kl": evaluation.kl_per_dim}).to_csv(
        folder / "eval" / "kl_per_dim.csv", index=False)


@torch.no_grad()
def write_run_artifacts(model: Autoencoder, data: ImageData, config: Config, folder: Path,
                        evaluation: EvaluationResult | None = None, images: bool = True) -> None:
    """Write every artifact above into `folder` (mirroring the artifact layout)."""
    model.eval()
    if evaluation is not None and evaluation.kl_per_dim is not None:
        write_kl_per_dim(evaluation, folder)
    if not images:
        return
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "latents").mkdir(parents=True, exist_ok=True)

    test_images, test_labels = data.split("test")
    examples = data.to_float(test_images[:IMAGE_COUNT])
    figures.save_reconstructions(model, examples, folder / "images" / "reconstructions.png")
    figures.save_prior_samples(model, folder / "images" / "prior_samples.png", seed=config.train.seed)
    panel_count = min(len(test_labels), 2000)
    panel_images = data.to_float(test_images[:panel_count])
    figures.save_class_panel(model, panel_images, test_labels[:panel_count],
                             folder / "images" / "class_panel.png", seed=config.train.seed)
    if evaluation is not None and evaluation.test_means is not None:  # encoded once, by the evaluation
        means, labels = evaluation.test_means, evaluation.test_labels
    else:
        means, labels = test_latents(model, data, config.eval.max_points)
    panel_means = torch.from_numpy(means[:panel_count]).to(panel_images.device) if len(means) >= panel_count else None
    figures.save_latent_traversal(model, panel_images, test_labels[:panel_count],
                                  folder / "images" / "latent_traversal.png", means=panel_means)

    latents_frame(means, labels, data.class_names).to_parquet(folder / "latents" / "test_latents.parquet", index=False)
    latent_evolution.save_still(means, labels, folder / "latents" / "latent_scatter.png",
                                class_names=data.class_names)
