"""Datasets loaded once per process: trials (and evaluations) that share a data config share
its tensors."""

from __future__ import annotations

import torch

from vae_lab.config import Config
from vae_lab.data.datasets import ImageData, load_data


class DataCache:
    """Datasets by data config and device: trials that share one are not reloaded."""

    def __init__(self):
        self._loaded: dict[str, ImageData] = {}

    def get(self, config: Config, device: torch.device) -> ImageData:
        key = f"{config.data!r}|{device}"
        if key not in self._loaded:
            self._loaded[key] = load_data(config.data, device, config.train.batch_size)
        return self._loaded[key]
