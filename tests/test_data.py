import numpy as np
import pytest
import torch

from vae_lab.config import DataConfig
from vae_lab.data import DataUnavailable, load_data


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    data = load_data(DataConfig())
    assert data.train_images.shape == (4000, 1, 28, 28)
    assert data.test_images.shape == (1000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert np.bincount(data.test_labels.numpy()).tolist() == np.bincount(
        load_data(DataConfig()).test_labels.numpy()).tolist()
    counts = np.bincount(data.test_labels.numpy(), minlength=10)
    assert counts.min() >= 80 and counts.sum() == 1000
    assert torch.equal(data.test_images, load_data(DataConfig()).test_images)


def test_resize_channels_and_binarize():
    data = load_data(DataConfig(resize=32, channels=3, binarize="static", train_limit=64, test_limit=32))
    assert data.train_images.shape == (64, 3, 32, 32)
    assert set(data.train_images.unique().tolist()) <= {0, 255}
    dynamic = load_data(DataConfig(binarize="dynamic", train_limit=64, test_limit=32))
    first = next(dynamic.batches("train", 64, noise_generator=torch.Generator().manual_seed(0)))[0]
    again = next(dynamic.batches("train", 64, noise_generator=torch.Generator().manual_seed(1)))[0]
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, again)  # resampled per draw


def test_shuffled_batches_cover_the_split_once():
    data = load_data(DataConfig(train_limit=300, test_limit=10))
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
