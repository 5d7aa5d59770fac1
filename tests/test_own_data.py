"""Your own images (`data.name=folder`, `data.name=arrays`, your own function), the colour datasets
(CIFAR-10, SVHN, CelebA, each read from a tiny copy written here in its on-disk format), and what a
run records of its data so that `evaluate` and serve reload the same data or refuse."""

import pickle

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import pandas as pd

from analysis import samples
from conftest import TINY_RUN
from vae_lab.serve.images import ServedRun
from vae_lab.config import ConfigError, DataConfig, build_config
from vae_lab.data.datasets import BadData, DataChanged, DataUnavailable, image_shape_of, load_data

RUN = [override for override in TINY_RUN if not override.startswith("data.")] + [
    "train.batch_size=8", "data.val_size=0.2", "eval.max_points=64"]


def digit_like(rng, count, size=12, colour=False):
    """`count` images with a bright square whose place depends on the class (0 or 1)."""
    labels = np.arange(count) % 2
    shape = (count, size, size, 3) if colour else (count, size, size)
    images = rng.integers(0, 40, size=shape, dtype=np.uint8)
    for index, label in enumerate(labels):
        corner = slice(0, size // 2) if label == 0 else slice(size // 2, size)
        images[index, corner, corner] = 230
    return images, labels


def write_folder(root, images, labels=None, suffix=".png", class_names=("cat", "dog")):
    root.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        folder = root if labels is None else root / class_names[labels[index]]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}{suffix}")
    return root


# ----------------------------------------------------------------------------- folder

def test_a_folder_of_class_subfolders_is_a_labelled_dataset_with_a_held_out_test_split(tmp_path):
    images, labels = digit_like(np.random.default_rng(0), 40)
    root = write_folder(tmp_path / "pets", images, labels)
    config = DataConfig(name="folder", path=str(root), val_size=0)
    data = load_data(config)
    assert data.labeled and data.class_names == ("cat", "dog")
    assert data.image_shape == (1, 12, 12) == image_shape_of(config)
    assert data.train_images.shape[0] == 36 and data.test_images.shape[0] == 4  # a fixed tenth, stratified
    assert sorted(data.test_labels.tolist()) == [0, 0, 1, 1]
    # the pixels are the files' own (PNG is lossless), each under its subfolder's label
    everything = torch.cat([data.train_images, data.test_images])[:, 0].numpy()
    found = {image.tobytes(): label for image, label in zip(everything, torch.cat([data.train_labels, data.test_labels]))}
    assert all(found[image.tobytes()] == label for image, label in zip(images, labels))
    assert load_data(config).digest == data.digest  # the same files, the same split


def test_a_flat_folder_has_no_labels_and_train_test_subfolders_are_the_splits(tmp_path):
    images, labels = digit_like(np.random.default_rng(1), 30, colour=True)
    flat = write_folder(tmp_path / "flat", images, suffix=".jpg")
    data = load_data(DataConfig(name="folder", path=str(flat), val_size=0))
    assert not data.labeled and data.class_names == ("no labels",)
    assert data.image_shape == (3, 12, 12) and data.test_images.shape[0] == 3
    assert set(data.train_labels.tolist()) == {0}
    split = tmp_path / "split"
    write_folder(split / "train", images[:20], labels[:20])
    write_folder(split / "test", images[20:], labels[20:])
    data = load_data(DataConfig(name="folder", path=str(split), val_size=0, channels=1))
    assert data.labeled and data.train_images.shape == (20, 1, 12, 12) and data.test_images.shape == (10, 1, 12, 12)


def test_mixed_sizes_need_data_resize(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.new("L", (12, 12), 30).save(root / "a.png")
    Image.new("RGB", (20, 16), (200, 10, 10)).save(root / "b.png")
    with pytest.raises(BadData, match=r"mixes image sizes \(a.png is 12x12, b.png is 20x16\); set data.resize"):
        load_data(DataConfig(name="folder", path=str(root), val_size=0))
    data = load_data(DataConfig(name="folder", path=str(root), val_size=0, resize=16))
    assert data.image_shape == (3, 16, 16)  # grey and colour together: all colour


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "holds no images"),
    (lambda root: (root / "broken.png").write_bytes(b"not a png"), "broken.png could not be read as an image"),
    (lambda root: (Image.new("L", (8, 8)).save(root / "a.png"), (root / "cats").mkdir()),
     "holds both image files and subfolders"),
])
def test_a_folder_that_cannot_be_used_is_one_line_naming_it(tmp_path, make, message):
    root = tmp_path / "images"
    root.mkdir()
    make(root)
    with pytest.raises(BadData, match=message) as error:
        load_data(DataConfig(name="folder", path=str(root)))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- arrays

def test_arrays_from_npz_and_npy(tmp_path):
    images, labels = digit_like(np.random.default_rng(2), 30)
    np.savez(tmp_path / "set.npz", x=images, y=labels, x_test=images[:6], y_test=labels[:6])
    data = load_data(DataConfig(name="arrays", path=str(tmp_path / "set.npz"), val_size=0))
    assert data.labeled and data.train_images.shape == (30, 1, 12, 12) and data.test_images.shape == (6, 1, 12, 12)
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(images[:6]))
    floats = (images[..., None].repeat(3, axis=-1) / 255.0).astype(np.float32)  # N x H x W x C in [0, 1]
    np.save(tmp_path / "colour.npy", floats)
    data = load_data(DataConfig(name="arrays", path=str(tmp_path / "colour.npy"), val_size=0))
    assert not data.labeled and data.image_shape == (3, 12, 12)
    assert torch.equal(torch.cat([data.train_images, data.test_images]).sort(dim=0).values,
                       torch.from_numpy(images[:, None].repeat(3, axis=1)).sort(dim=0).values)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, "holds 4 labels for 5 images"),
    ({"x": np.full((5, 8, 8), 2.0)}, r"holds floats in \[2, 2\]; allowed: floats in \[0, 1\] or uint8"),
    ({"x": np.zeros((5, 8), np.uint8)}, r"has shape \(5, 8\); allowed: N x H x W"),
    ({"images": np.zeros((5, 8, 8), np.uint8)}, "has no array 'x'"),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(5), "x_test": np.zeros((2, 8, 8), np.uint8)},
     "labels for both splits or for neither"),
])
def test_arrays_that_cannot_be_used_are_one_line_naming_them(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadData, match=message):
        load_data(DataConfig(name="arrays", path=str(tmp_path / "bad.npz")))


# ----------------------------------------------------------------------------- the colour datasets

def test_cifar10_from_its_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 9],
                 "batch_label": name, "filenames": [f"{name}_{index}.png" for index in range(4)]}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)  # the format of the published (Python 2) files
    data = load_data(DataConfig(root=str(tmp_path), name="cifar10", val_size=0, download=False))
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.class_names[9] == "truck" and data.test_labels.tolist() == [1, 2, 3, 9]
    with (folder / "test_batch").open("rb") as handle:
        row = pickle.load(handle)["data"][0]
    assert torch.equal(data.test_images[0], torch.from_numpy(row.reshape(3, 32, 32)))  # channel-major rows
    # a batch that would run code when unpickled is refused
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({"data": Image.new("L", (1, 1))}, handle, protocol=2)
    with pytest.raises(BadData, match="test_batch is not a CIFAR-10 batch"):
        load_data(DataConfig(path=str(folder), name="cifar10", val_size=0))


def test_svhn_from_its_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(4)
    for split, count in (("train", 6), ("test", 3)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8),
                                                  "y": np.array([[10], [1], [2], [3], [4], [5]][:count])})
    data = load_data(DataConfig(path=str(tmp_path), name="svhn", val_size=0))
    assert data.train_images.shape == (6, 3, 32, 32) and data.train_labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_celeba_faces_are_cropped_resized_and_unlabelled(tmp_path):
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for index in range(8):
        face = np.zeros((218, 178, 3), np.uint8)
        face[39:179, 19:159] = 30 * index  # the 140x140 centre crop
        name = f"{index + 1:06d}.jpg"
        Image.fromarray(face).save(folder / "img_align_celeba" / name, quality=95)
        lines.append(f"{name} {2 if index >= 6 else index % 2}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    data = load_data(DataConfig(root=str(tmp_path), name="celeba", resize=32, val_size=0, download=False))
    assert data.train_images.shape == (6, 3, 32, 32) and data.test_images.shape == (2, 3, 32, 32)
    assert not data.labeled
    assert abs(data.test_images[1].float().mean().item() - 210) < 3  # 30 * 7: all crop, no black border
    assert image_shape_of(DataConfig(name="celeba")) == (3, 64, 64)


def test_a_colour_dataset_that_is_not_here_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailable, match="dataset 'svhn' is not under .* to get it: download it"):
        load_data(DataConfig(root=str(tmp_path), name="svhn", download=False))
    assert not (tmp_path / "svhn").exists()  # nothing half-made


# ----------------------------------------------------------------------------- your own function

def test_your_own_dataset_function_with_its_options(tmp_path):
    module = tmp_path / "my_data.py"
    module.write_text(
        "import numpy as np\n"
        "from vae_lab.data import SourceImages\n"
        "def stripes(width: int, count: int = 20):\n"
        "    x = np.zeros((count, 10, 10), np.uint8)\n"
        "    x[:, :, :width] = 255\n"
        "    return SourceImages(x, np.arange(count) % 2, class_names=('even', 'odd'), source='stripes')\n")
    config = build_config(overrides=[f"data.name={module}:stripes", "data.options.width=3", "data.val_size=0"])
    data = load_data(config.data)
    assert data.class_names == ("even", "odd") and data.train_images[0, 0, 0, :4].tolist() == [255, 255, 255, 0]
    with pytest.raises(ConfigError, match=r"data.options.height is not an option of stripes; allowed: "
                                          r"data.options.count, data.options.width"):
        image_shape_of(build_config(overrides=[f"data.name={module}:stripes", "data.options.height=3"]).data)
    module.write_text("def wrong():\n    return [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"data.name='.*my_data.py:wrong' returned list, not vae_lab.data.SourceImages"):
        load_data(build_config(overrides=[f"data.name={module}:wrong"]).data)
    with pytest.raises(ConfigError, match=r"data.name='cifar100' is not a registered dataset; registered: "
                                          r"arrays, celeba, cifar10, digits, fashion-mnist, folder"):
        image_shape_of(build_config(overrides=["data.name=cifar100"]).data)


# ----------------------------------------------------------------------------- runs on it

def test_bad_data_stops_the_command_with_one_line_and_creates_nothing(tmp_path, capsys):
    from vae_lab.train import main

    store = tmp_path / "store"
    for problem in ([f"data.path={tmp_path / 'absent'}"], [f"data.path={tmp_path}"]):
        assert main(["data.name=folder", *problem, f"tracking.uri=sqlite:///{store / 'mlflow.db'}"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: data.path=") or error.startswith(f"error: {tmp_path} holds no images")
        assert error.count("\n") == 1 and not store.exists()


def test_a_colour_run_records_its_data_and_evaluate_refuses_changed_data(tmp_path, tracking_uri, capsys):
    from vae_lab.evaluate import main as evaluate
    from vae_lab.train import train

    images, labels = digit_like(np.random.default_rng(5), 64, size=32, colour=True)
    path = tmp_path / "colour.npz"
    np.savez(path, x=images)  # no labels
    config = build_config(overrides=[*RUN, "data.name=arrays", f"data.path={path}", "model.name=conv_vae",
                                     "loss.likelihood=gaussian", f"tracking.uri={tracking_uri}"])
    result = train(config)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.params["data.path"] == str(path) and run.data.tags["vae_lab.labels"] == "none"
    assert run.data.tags["vae_lab.data_digest"] == load_data(config.data, batch_size=8).digest
    assert run.data.tags["vae_lab.data_source"] == str(path)
    assert "eval/probe_accuracy" not in run.data.metrics and "eval/mse_per_pixel" in run.data.metrics
    assert evaluate(["--run", result.run_id, "--tracking-uri", tracking_uri]) == 0
    images[0, 0, 0] = 255 - images[0, 0, 0]
    np.savez(path, x=images)
    assert evaluate(["--run", result.run_id, "--tracking-uri", tracking_uri]) == 2
    error = capsys.readouterr().err.strip()
    assert "the images changed since" in error and "\n" not in error
    with pytest.raises(DataChanged, match=f"run {result.run_id} trained on data with digest"):
        ServedRun.load(result.run_id, tracking_uri)  # the serve page answers it as a 503 with this line
    models, _ = samples.load_models(pd.DataFrame([{"label": "colour", "run_id": result.run_id,
                                                   "tags.vae_lab.data_digest": run.data.tags["vae_lab.data_digest"]}]),
                                    tracking_uri)
    figures, missing = samples.reconstructions(models, tmp_path)
    assert figures[0].skipped == "dataset arrays changed since these runs trained on it"
    assert missing[0].startswith("colour: data arrays changed since the run")


def test_conv_models_take_64_pixel_colour_images():
    from vae_lab.config import ModelConfig
    from vae_lab.models.components import build_model

    for name in ("conv_vae", "conv_ae"):
        model = build_model(ModelConfig(name=name, latent_dim=8), (3, 64, 64))
        images = torch.rand(2, 3, 64, 64)
        assert model.decode(model.encode(images).mean).shape == (2, 3, 64, 64)
