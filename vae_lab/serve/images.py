"""What the serve page draws: one logged run's model and test images, and the PNGs made from them.

A `ServedRun` is loaded once per run (safely: `load_logged_model` reads a state dict with
`torch.load(weights_only=True)`) and answers every image request of that run on the CPU.
Every random draw comes from a `torch.Generator` seeded by the request, so one seed always
gives the same picture.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_lab import names
from vae_lab.components import short_name
from vae_lab.config import Config, DataConfig
from vae_lab.data.datasets import ImageData, check_digest, load_data
from vae_lab.evaluation.figures import image_grid, save_image
from vae_lab.models.autoencoders import Autoencoder
from vae_lab.tracking.logged import IncompatibleModel, load_logged_model

LATENTS_ARTIFACT = "latents/test_latents.parquet"
SAMPLES_PER_ROW = 8
ENCODE_BATCH_SIZE = 1000


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP code, the message one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A [C, H, W] image in [0, 1] as PNG bytes."""
    buffer = io.BytesIO()
    save_image(pixels.clamp(0, 1), buffer, format="PNG")
    return buffer.getvalue()


def grid(images: torch.Tensor, per_row: int) -> torch.Tensor:
    """Images in rows with a 2-pixel white border (make_grid leaves a lone image unpadded)."""
    if len(images) == 1:
        return F.pad(images[0].float(), (2, 2, 2, 2), value=1.0)
    return image_grid(images.float(), nrow=per_row, padding=2, pad_value=1.0)


def input_beside_samples(example: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """One picture: the input on the left, a grey rule, then the samples (8 per row)."""
    left = grid(example, 1)
    right = grid(samples, min(len(samples), SAMPLES_PER_ROW))
    channels, height = right.shape[0], max(left.shape[1], right.shape[1])
    rule_width = 2
    canvas = torch.ones(channels, height, left.shape[2] + rule_width + right.shape[2])
    canvas[:, :left.shape[1], :left.shape[2]] = left
    canvas[:, :, left.shape[2]:left.shape[2] + rule_width] = 0.5
    canvas[:, :right.shape[1], left.shape[2] + rule_width:] = right
    return canvas


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_data_cache: dict[tuple, ImageData] = {}


def cached_data(config: DataConfig) -> ImageData:
    """The run's dataset on the CPU; runs with the same data settings share one copy."""
    key = repr(config)
    if key not in _data_cache:
        _data_cache[key] = load_data(config, "cpu")
    return _data_cache[key]


@dataclass
class ServedRun:
    run_id: str
    model: Autoencoder
    config: Config
    data: ImageData
    _latents: tuple[np.ndarray, np.ndarray, str] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, run_id: str, tracking_uri: str) -> ServedRun:
        try:
            model, config = load_logged_model(run_id, tracking_uri, map_location="cpu")
        except IncompatibleModel as error:
            raise RequestError(str(error), status=409) from None
        data = cached_data(config.data)
        recorded = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get(names.DATA_DIGEST_TAG)
        check_digest(data, recorded, f"run {run_id}")
        return cls(run_id, model.eval(), config, data)

    # ------------------------------------------------------------------ facts the page needs

    @property
    def test_count(self) -> int:
        return int(self.data.test_labels.shape[0])

    def describe(self) -> dict:
        return {
            "run_id": self.run_id,
            "model": short_name(self.config.model.name),
            "variational": self.model.variational,
            "prior": self.model.prior.label,
            "latent_dim": self.model.latent_dim,
            "image_shape": list(self.model.image_shape),
            "class_names": list(self.data.class_names),
            "test_count": self.test_count,
        }

    def test_pixels(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        # grey levels, not `data.to_float`: dynamic binarization would make one seed's picture vary
        return self.data.test_images[torch.as_tensor(indices)].float() / 255.0

    def _decoded(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.decode(z).float())

    def check_index(self, index: int, name: str) -> None:
        if not 0 <= index < self.test_count:
            raise RequestError(f"{name}={index} is not a test image index; allowed 0..{self.test_count - 1}")

    # ------------------------------------------------------------------ pictures

    @torch.no_grad()
    def generate(self, label: int, count: int, seed: int) -> bytes:
        """A test input of class `label` (drawn by the seed) and `count` samples around its
        posterior: mean + std * eps (an AE's posterior is a point: its samples repeat)."""
        names = self.data.class_names
        if not 0 <= label < len(names):
            raise RequestError(f"label={label} is out of range; allowed 0..{len(names) - 1} "
                               f"({', '.join(names)})")
        of_class = torch.nonzero(self.data.test_labels == label).flatten()
        if len(of_class) == 0:
            raise RequestError(f"this run's test split has no image of class {label} ({names[label]})",
                               status=404)
        generator = seeded(seed)
        index = of_class[torch.randint(len(of_class), (1,), generator=generator)]
        example = self.test_pixels(index)
        posterior = self.model.encode(example)
        noise = torch.randn((count, self.model.latent_dim), generator=generator)
        samples = self._decoded(posterior.sample(noise))
        return png_bytes(input_beside_samples(example, samples))

    @torch.no_grad()
    def prior(self, count: int, seed: int) -> bytes:
        samples = torch.sigmoid(self.model.sample(count, seeded(seed)).float())
        return png_bytes(grid(samples, max(1, round(count ** 0.5))))

    @torch.no_grad()
    def decode(self, z: list[float]) -> bytes:
        if len(z) != self.model.latent_dim:
            raise RequestError(f"z has {len(z)} values; this run's latent size is {self.model.latent_dim}")
        return png_bytes(self._decoded(torch.tensor([z], dtype=torch.float32))[0])

    @torch.no_grad()
    def interpolate(self, index_a: int, index_b: int, t: float) -> bytes:
        """Decode (1 - t) * mean_a + t * mean_b between two test images' posterior means."""
        self.check_index(index_a, "a")
        self.check_index(index_b, "b")
        means = self.model.encode(self.test_pixels([index_a, index_b])).mean
        return png_bytes(self._decoded(torch.lerp(means[:1], means[1:], t))[0])

    def test_image(self, index: int) -> bytes:
        self.check_index(index, "index")
        return png_bytes(self.test_pixels([index])[0])

    # ------------------------------------------------------------------ latents

    def latents(self, tracking_uri: str) -> tuple[np.ndarray, np.ndarray, str]:
        """Posterior means and labels of the test images, row i = test image i: the run's
        logged artifact when it is there and matches, else encoded now."""
        if self._latents is None:
            self._latents = self._logged_latents(tracking_uri) or self._encoded_latents()
        return self._latents

    def _logged_latents(self, tracking_uri: str):
        columns = [f"z{index}" for index in range(self.model.latent_dim)]
        try:
            with tempfile.TemporaryDirectory() as folder:
                path = MlflowClient(tracking_uri=tracking_uri).download_artifacts(
                    self.run_id, LATENTS_ARTIFACT, folder)
                frame = pd.read_parquet(Path(path))
        except (MlflowException, OSError, ValueError):
            return None  # not logged (tracking.log_images=false) or unreadable: encode instead
        if not set(columns) <= set(frame.columns) or "label" not in frame or len(frame) > self.test_count:
            return None
        return frame[columns].to_numpy(np.float32), frame["label"].to_numpy(np.int64), "artifact"

    @torch.no_grad()
    def _encoded_latents(self):
        batches = torch.arange(self.test_count).split(ENCODE_BATCH_SIZE)
        means = [self.model.encode(self.test_pixels(batch)).mean for batch in batches]
        return torch.cat(means).numpy(), self.data.test_labels.numpy(), "encoded"
