"""Image data as tensors: `sources` (the datasets `data.name` names, ours registered as yours
would be), `datasets` (checks, splits, resizing, binarization, batches), `cache` (datasets loaded
once per process)."""

from vae_lab.data.registry import DATASETS, register_dataset
from vae_lab.data.sources import BadData, DataUnavailable, SourceImages

__all__ = ["DATASETS", "BadData", "DataUnavailable", "SourceImages", "register_dataset"]
