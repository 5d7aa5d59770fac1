"""Datasets as tensors on the device, and batches as index slices of a permutation.

A dataset (`vae_lab.data.sources`: ours and yours, registered alike) gives numpy images; they
are checked, put in one uint8 tensor of shape [N, C, H, W] per split (plus int64 labels),
resized (`data.resize`), converted to the asked channels (`data.channels`) and moved to the
device. A batch is `images[permutation[i:i + batch]]`, converted to float in [0, 1] (and
binarized when asked) on the device: no per-item PIL pipeline, no worker processes.

Three splits: `train`, `val` (carved from the training images by `data.val_size`,
stratified by label, with a fixed seed: every `train.seed` sees the same split) and
`test` (the source's own, or a fixed tenth of its images held out the same way). Under
`data.binarize=dynamic` only training batches get a fresh Bernoulli draw; the val and test
images are binarized once, with a fixed seed, so every run is scored on the same pixels (as
the density-estimation literature does).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vae_lab.components import check_options, constructor_parameters, short_name
from vae_lab.config import ConfigError, DataConfig
from vae_lab.data.registry import DATASETS
from vae_lab.data.sources import (SPLIT_SEED, BadData, DataUnavailable, SourceImages, default_class_names,
                                  default_root)

EVAL_BINARIZE_SEED = 1  # the one draw of the val and test images under dynamic binarization
SPLITS = ("train", "val", "test")
HELD_OUT_TEST_FRACTION = 0.1  # of a source without a test split
UNLABELED = ("no labels",)  # the one class of a dataset without labels (what plot legends say)
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as PIL's convert("L")
DATA_KEYS = ("path", "root", "download", "resize")  # the data.* keys a dataset function may take

__all__ = ["BadData", "DataChanged", "DataUnavailable", "ImageData", "SourceImages", "SplitTooSmall",
           "default_root", "image_shape_of", "load_data", "load_source"]


class SplitTooSmall(ConfigError):
    """`data.val_size` leaves too little (or too much) of the training split; says what fits."""


class DataChanged(DataUnavailable):
    """The data a run recorded is not what its config loads now (a digest mismatch)."""


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
    labeled: bool = True  # False: the source had no labels (every label 0, class_names UNLABELED)
    derived: dict = field(default_factory=dict, repr=False)  # values computed from the data alone
    source: str = ""  # the file or folder the images were read from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def has_val(self) -> bool:
        return self.val_images is not None and self.val_images.shape[0] > 0

    def to(self, device: torch.device | str) -> ImageData:
        """The same data with its tensors on `device`: itself when they are there already, else a
        copy (values that hold tensors or modules on the old device are not carried over)."""
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the tensors say
        if self.train_images.device == device:
            return self
        moved = {item.name: value.to(device) if isinstance(value := getattr(self, item.name), torch.Tensor) else value
                 for item in dataclasses.fields(self)}
        moved["derived"] = {key: value for key, value in self.derived.items() if key == "digest"}
        return ImageData(**moved)

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


# ----------------------------------------------------------------------------- loading

def dataset_arguments(config: DataConfig, dataset) -> dict:
    """What a dataset function is called with: the data.* keys its signature names, and data.options."""
    parameters, takes_any = constructor_parameters(dataset)
    supplied = {key: getattr(config, key) for key in DATA_KEYS if key in parameters or takes_any}
    return {**supplied, **config.options}


def check_dataset(config: DataConfig) -> None:
    """data.name names a dataset function, and data.options are arguments it takes (ConfigError)."""
    dataset = DATASETS.resolve(config.name)
    if not callable(dataset):
        raise ConfigError(f"data.name={config.name!r} is not a function that returns vae_lab.data.SourceImages")
    supplied = [key for key in DATA_KEYS if key in constructor_parameters(dataset)[0]]
    check_options(dataset, short_name(config.name), "data", supplied, config.options)


SOURCES_KEPT = 2  # the datasets' images a process keeps read (a study's data, and one more)
_read_sources: OrderedDict[tuple, SourceImages] = OrderedDict()  # by (name, arguments, stamp), oldest first


def _stamp(config: DataConfig) -> tuple:
    """What changes when the files under data.path change (so a long-lived process reads them again)."""
    if not config.path:
        return ()
    path = Path(config.path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        return ("absent",)
    return (stat.st_mtime_ns, stat.st_size)


def load_source(config: DataConfig) -> SourceImages:
    """The dataset's images as checked uint8 [N, C, H, W] arrays (labels int64 or None), read
    once per process for the last two data configs."""
    check_dataset(config)
    dataset = DATASETS.resolve(config.name)
    arguments = dataset_arguments(config, dataset)
    key = (config.name, repr(sorted(arguments.items())), _stamp(config))
    if key not in _read_sources:
        source = dataset(**arguments)
        if not isinstance(source, SourceImages):
            raise ConfigError(f"data.name={config.name!r} returned {type(source).__name__}, "
                              "not vae_lab.data.SourceImages")
        _read_sources[key] = _checked(source, config.name)
        while len(_read_sources) > SOURCES_KEPT:
            _read_sources.popitem(last=False)
    _read_sources.move_to_end(key)
    return _read_sources[key]


def _as_images(array, what: str) -> np.ndarray:
    """uint8 [N, C, H, W] from N x H x W or N x H x W x C (C 1 or 3), uint8 or float in [0, 1]."""
    images = np.asarray(array)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise BadData(f"{what} has shape {tuple(images.shape)}; allowed: N x H x W or N x H x W x C with C 1 or 3, "
                      "N at least 1")
    if images.dtype == np.uint8:
        pass
    elif images.dtype == np.bool_:
        images = images.astype(np.uint8) * 255
    elif np.issubdtype(images.dtype, np.floating):
        low, high = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 1):
            raise BadData(f"{what} holds floats in [{low:g}, {high:g}]; allowed: floats in [0, 1] or uint8 0..255")
        images = np.rint(images * 255).astype(np.uint8)
    else:
        raise BadData(f"{what} holds {images.dtype}; allowed: uint8 (0..255) or float in [0, 1]")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _as_labels(array, count: int, what: str) -> np.ndarray:
    labels = np.asarray(array)
    if labels.ndim != 1 or len(labels) != count:
        raise BadData(f"{what} holds {labels.shape[0] if labels.ndim else 1} labels for {count} images "
                      f"(shape {tuple(labels.shape)}); allowed: one integer label per image")
    if not (np.issubdtype(labels.dtype, np.integer) or (np.issubdtype(labels.dtype, np.floating)
                                                         and np.all(labels == np.round(labels)))):
        raise BadData(f"{what} holds {labels.dtype} labels; allowed: integers 0..K-1")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise BadData(f"{what} holds a negative label ({labels.min()}); allowed: integers 0..K-1")
    return labels


def _checked(source: SourceImages, name: str) -> SourceImages:
    where = source.source or name
    train = _as_images(source.train_images, f"{where}'s training images")
    labeled = source.train_labels is not None
    train_labels = _as_labels(source.train_labels, len(train), f"{where}'s training labels") if labeled else None
    test = test_labels = None
    if source.test_images is not None:
        test = _as_images(source.test_images, f"{where}'s test images")
        if test.shape[1:] != train.shape[1:]:
            raise BadData(f"{where}: the test images are {tuple(test.shape[1:])} (C, H, W) and the training images "
                          f"{tuple(train.shape[1:])}; set data.resize=N for N x N, and give both the same channels")
        if labeled != (source.test_labels is not None):
            raise BadData(f"{where}: labels for {'the training' if labeled else 'the test'} images only; "
                          "give both splits labels, or neither")
        if labeled:
            test_labels = _as_labels(source.test_labels, len(test), f"{where}'s test labels")
    classes = 1 + max(int(train_labels.max()), int(test_labels.max()) if test_labels is not None else 0) \
        if labeled else 1
    names = tuple(source.class_names) if source.class_names is not None else default_class_names(classes)
    if labeled and len(names) < classes:
        raise BadData(f"{where}: labels go up to {classes - 1} but only {len(names)} class names are given")
    return SourceImages(train, train_labels, test, test_labels, names if labeled else UNLABELED, source.source)


def _prepare(images: np.ndarray, config: DataConfig, fixed_draw: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] (on the CPU): resized, its channels converted (data.channels), and
    binarized once when the config (static) or the split (`fixed_draw`: val/test under dynamic) asks."""
    tensor = torch.from_numpy(images)
    if config.resize and tuple(tensor.shape[-2:]) != (config.resize, config.resize):
        resized = F.interpolate(tensor.float(), size=(config.resize, config.resize),
                                mode="bilinear", antialias=True, align_corners=False)
        tensor = resized.round_().clamp_(0, 255).to(torch.uint8)
    if config.channels == 1 and tensor.shape[1] == 3:
        weights = torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
        tensor = (tensor.float() * weights).sum(dim=1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    if config.binarize == "static" or (config.binarize == "dynamic" and fixed_draw):
        seed = SPLIT_SEED if config.binarize == "static" else EVAL_BINARIZE_SEED
        generator = torch.Generator().manual_seed(seed)
        tensor = (torch.bernoulli(tensor.float() / 255.0, generator=generator) * 255).to(torch.uint8)
    if config.channels == 3 and tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    return tensor.contiguous()


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
    """The (C, H, W) of the images `config` loads: the dataset's declared `image_shape`, else
    that of its images (read once per process)."""
    check_dataset(config)
    declared = getattr(DATASETS.resolve(config.name), "image_shape", None)
    channels, height, width = declared or load_source(config).train_images.shape[1:]
    if config.resize:
        height = width = config.resize
    return (config.channels or channels, height, width)


def hold_out_test(source: SourceImages) -> SourceImages:
    """A source without a test split, with a fixed tenth of its images (stratified by label) held out as one."""
    if source.test_images is not None:
        return source
    count = len(source.train_images)
    if count < 2:
        raise BadData(f"{source.source}: {count} image; a dataset needs at least 2 (one to train on, one to test)")
    labels = source.train_labels if source.train_labels is not None else np.zeros(count, dtype=np.int64)
    kept, held_out = stratified_holdout(labels, max(1, round(HELD_OUT_TEST_FRACTION * count)), SPLIT_SEED)
    labels = source.train_labels
    return dataclasses.replace(source, train_images=source.train_images[kept], test_images=source.train_images[held_out],
                               train_labels=None if labels is None else labels[kept],
                               test_labels=None if labels is None else labels[held_out])


def load_data(config: DataConfig, device: torch.device | str = "cpu", batch_size: int = 1) -> ImageData:
    """Load the dataset `config.name` names as tensors on `device`; raise DataUnavailable when it
    is not here, BadData when its files cannot be used, SplitTooSmall when `data.val_size` leaves
    less than `batch_size` training images."""
    device = torch.device(device)
    source = hold_out_test(load_source(config))
    labeled = source.train_labels is not None
    train_x, test_x = source.train_images, source.test_images
    train_y = source.train_labels if labeled else np.zeros(len(train_x), dtype=np.int64)
    test_y = source.test_labels if labeled else np.zeros(len(test_x), dtype=np.int64)
    if config.train_limit:
        train_x, train_y = train_x[:config.train_limit], train_y[:config.train_limit]
    if config.test_limit:
        test_x, test_y = test_x[:config.test_limit], test_y[:config.test_limit]
    train_x, train_y, val_x, val_y = carve_validation(train_x, train_y, config.val_size, batch_size)

    def labels(values):
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)

    def images(values, fixed_draw):
        return _prepare(values, config, fixed_draw).to(device)

    return ImageData(
        name=config.name,
        train_images=images(train_x, False),
        train_labels=labels(train_y),
        test_images=images(test_x, True),
        test_labels=labels(test_y),
        val_images=None if val_x is None else images(val_x, True),
        val_labels=None if val_y is None else labels(val_y),
        binarize="dynamic" if config.binarize == "dynamic" else "none",
        class_names=tuple(source.class_names),
        labeled=labeled,
        source=source.source,
    )


def check_digest(data: ImageData, recorded: str | None, run_label: str) -> None:
    """Refuse (DataChanged, one line) when `data` is not the data a run recorded it trained on."""
    if recorded and recorded != data.digest:
        where = data.source or data.name
        raise DataChanged(f"{run_label} trained on data with digest {recorded[:12]}, but data.name={data.name} now "
                          f"loads {data.digest[:12]} from {where}: the images changed since; restore them (or score "
                          "the run on other data knowingly with a new run)")
