import os

import numpy as np
import pytest
import torch

from vae_lab.config import DataConfig
from vae_lab.data.datasets import DataUnavailable, load_data


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    data = load_data(DataConfig(val_size=0))
    assert data.train_images.shape == (4000, 1, 28, 28)
    assert not data.has_val
    assert data.test_images.shape == (1000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert np.bincount(data.test_labels.numpy()).tolist() == np.bincount(
        load_data(DataConfig()).test_labels.numpy()).tolist()
    counts = np.bincount(data.test_labels.numpy(), minlength=10)
    assert counts.min() >= 80 and counts.sum() == 1000
    assert torch.equal(data.test_images, load_data(DataConfig()).test_images)


def test_resize_channels_and_binarize():
    data = load_data(DataConfig(resize=32, channels=3, binarize="static", train_limit=64, test_limit=32, val_size=0))
    assert data.train_images.shape == (64, 3, 32, 32)
    assert set(data.train_images.unique().tolist()) <= {0, 255}
    dynamic = load_data(DataConfig(binarize="dynamic", train_limit=64, test_limit=32, val_size=0))
    first = next(dynamic.batches("train", 64, noise_generator=torch.Generator().manual_seed(0)))[0]
    again = next(dynamic.batches("train", 64, noise_generator=torch.Generator().manual_seed(1)))[0]
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, again)  # resampled per draw


def test_validation_split_is_stratified_fixed_and_carved_from_train():
    whole = load_data(DataConfig(val_size=0))
    data = load_data(DataConfig(val_size=0.1))
    assert data.val_images.shape == (400, 1, 28, 28) and data.train_images.shape == (3600, 1, 28, 28)
    train_counts = np.bincount(whole.train_labels.numpy(), minlength=10)
    val_counts = np.bincount(data.val_labels.numpy(), minlength=10)
    assert np.abs(val_counts - 0.1 * train_counts).max() <= 1  # stratified by label
    # carved from the training images: together they are the training split, the test split untouched
    together = torch.cat([data.train_images, data.val_images]).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, whole.train_images.flatten(1).numpy()))
    assert torch.equal(data.test_images, whole.test_images)
    # fixed: the same images every load (the split does not depend on train.seed, which load_data never sees)
    assert torch.equal(load_data(DataConfig(val_size=0.1)).val_images, data.val_images)
    counted = load_data(DataConfig(val_size=500))
    assert counted.val_images.shape[0] == 500 and counted.train_images.shape[0] == 3500
    assert len(list(data.batches("val", 128))) == 4


def test_binarized_evaluation_sets_are_drawn_once_and_training_batches_afresh():
    dynamic = load_data(DataConfig(binarize="dynamic", train_limit=300, test_limit=64, val_size=0.2))
    for split in ("val", "test"):
        images, _ = dynamic.split(split)
        assert set(images.unique().tolist()) <= {0, 255}  # stored binarized
        one = next(dynamic.batches(split, 64, noise_generator=torch.Generator().manual_seed(0)))[0]
        two = next(dynamic.batches(split, 64, noise_generator=torch.Generator().manual_seed(5)))[0]
        assert torch.equal(one, two)  # no draw depends on the run's generator
    again = load_data(DataConfig(binarize="dynamic", train_limit=300, test_limit=64, val_size=0.2))
    assert torch.equal(again.test_images, dynamic.test_images) and torch.equal(again.val_images, dynamic.val_images)
    assert set(dynamic.train_images.unique().tolist()) - {0, 255}  # grey levels kept for fresh draws


def test_shuffled_batches_cover_the_split_once():
    data = load_data(DataConfig(train_limit=300, test_limit=10, val_size=0))
    labels = torch.cat([y for _, y in data.batches("train", 64, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0))])
    assert sorted(labels.tolist()) == sorted(data.train_labels.tolist())
    assert not torch.equal(labels, data.train_labels)


def test_digits_dataset():
    data = load_data(DataConfig(name="digits"))
    assert data.image_shape == (1, 8, 8)
    assert data.train_images.max() == 255


def test_missing_offline_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailable) as error:
        load_data(DataConfig(name="kmnist", root=str(tmp_path), download=False))
    assert "kmnist" in str(error.value) and "download" in str(error.value)


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_an_embedded_split_is_kept_whole_in_the_cache_and_read_back_unchanged(name, tmp_path, monkeypatch):
    from vae_lab.data import sources as datasets

    monkeypatch.setenv("HOME", str(tmp_path))
    parsed = datasets._parse_mnist5k() if name == "mnist5k" else datasets._parse_digits()
    datasets._read_embedded.cache_clear()
    try:
        first = datasets._read_embedded(name)
        cached = list((tmp_path / ".cache" / "vae_lab").iterdir())
        assert len(cached) == 1 and cached[0].name.startswith(f"{name}-split-")  # no draft left beside it
        datasets._read_embedded.cache_clear()
        again = datasets._read_embedded(name)  # from the file
        cached[0].write_bytes(cached[0].read_bytes()[:100])  # torn by something else: parsed again
        datasets._read_embedded.cache_clear()
        repaired = datasets._read_embedded(name)
    finally:
        datasets._read_embedded.cache_clear()
    for arrays in (first, again, repaired):
        assert all(np.array_equal(got, want) and got.dtype == want.dtype for got, want in zip(arrays, parsed))
    assert np.load(cached[0])["train_x"].shape == parsed[0].shape  # rewritten whole


def test_data_moves_to_another_device_whole_and_keeps_its_digest():
    data = load_data(DataConfig(train_limit=64, test_limit=32, val_size=0.25))
    assert data.to("cpu") is data
    digest = data.digest
    data.derived["feature_space"] = object()  # something tied to the old device
    moved = data.to("meta")  # a device every machine has: the tensors move, the values do not come along
    assert {tensor.device.type for tensor in (moved.train_images, moved.train_labels, moved.val_images,
                                              moved.val_labels, moved.test_images, moved.test_labels)} == {"meta"}
    assert moved.image_shape == data.image_shape and moved.class_names == data.class_names
    assert moved.derived == {"digest": digest} and data.train_images.device.type == "cpu"


def write_idx(path, array):
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_gzipped_idx_files_are_unpacked_once_and_read_again_when_they_change(tmp_path, monkeypatch):
    from vae_lab.data import sources

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "raw"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (6, 4, 4)), "train-labels-idx1-ubyte": np.arange(6) % 3,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 4, 4)), "t10k-labels-idx1-ubyte": np.arange(2)}
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}.gz", array)
    expected = list(arrays.values())
    first = sources._load_idx_folder(folder)
    cached = list((tmp_path / "home" / ".cache" / "vae_lab").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("idx-raw-")  # whole: no draft beside it
    again = sources._load_idx_folder(folder)
    for got in (first, again):
        assert all(np.array_equal(have, want) for have, want in zip(got, expected))
        assert got[1].dtype == np.int64 and got[0].dtype == np.uint8
    changed = arrays["t10k-labels-idx1-ubyte"][::-1]
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", changed)  # a new file: its size or time differs
    os.utime(folder / "t10k-labels-idx1-ubyte.gz", ns=(1, 1))
    assert np.array_equal(sources._load_idx_folder(folder)[3], changed)
