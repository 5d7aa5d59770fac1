"""How good a model's prior samples (and reconstructions) look: Fréchet distance and precision/recall
in the feature space of a small network trained on the dataset itself.

Not "FID": that name means Inception-v3 features of ImageNet, whose weights are not here offline and
which say little about 28 x 28 digits. As the MNIST literature does, the features are the hidden layer
of a LeNet-like classifier trained on the data's own train split (`FeatureNet`, 128 features), its
test accuracy logged beside the distances so a reader can judge the space. Data without labels (or
with a single class) gets a small autoencoder with a conv encoder instead, and its bottleneck is the
space: the metric names then say `autoencoder` (`names.FD_AUTOENCODER`).

The network depends on the data alone: it is trained once (seeded, a fixed number of steps) and
kept in ~/.cache/vae_lab/feature_nets/<kind>-v<version>-<data digest>.pt, and in memory in
`data.derived`, so every run and batched trial on the same data shares it. A file whose stored
digest or version does not match is never used: the network is trained again and the file replaced.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_lab import names
from vae_lab.data.datasets import ImageData, default_root
from vae_lab.files import write_whole
from vae_lab.models.autoencoders import Autoencoder

FEATURE_NET_VERSION = 1  # bump when the network, its training or the stored payload changes
FEATURE_DIM = 128
TRAIN_STEPS = 500  # mnist5k: about 93% test accuracy, about 2 s on two CPU cores
TRAIN_BATCH = 64
LEARNING_RATE = 2e-3
FEATURE_SEED = 0
NEIGHBOURS = 3  # k of the k-NN radii of precision and recall (Kynkäänniemi et al. 2019)
CLASSIFIER, AUTOENCODER = "classifier", "autoencoder"
METRICS = {CLASSIFIER: names.FD_CLASSIFIER, AUTOENCODER: names.FD_AUTOENCODER}

_training_lock = threading.Lock()  # trials evaluated in threads of one process train it once


class FeatureNet(nn.Module):
    """Two stride-2 convolutions and a hidden layer of `FEATURE_DIM` units (the features), then
    a class head (classifier) or a decoder back to pixels (autoencoder). Any C x H x W: the
    convolutions' output is pooled to 4 x 4."""

    def __init__(self, image_shape: tuple[int, int, int], kind: str, classes: int):
        super().__init__()
        channels = image_shape[0]
        self.kind = kind
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, FEATURE_DIM))
        if kind == CLASSIFIER:
            self.head = nn.Linear(FEATURE_DIM, classes)
        else:
            self.head = nn.Sequential(nn.Linear(FEATURE_DIM, 256), nn.ReLU(),
                                      nn.Linear(256, channels * image_shape[1] * image_shape[2]),
                                      nn.Unflatten(1, tuple(image_shape)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(images)
        return F.relu(hidden) if self.kind == CLASSIFIER else hidden  # an autoencoder's code is linear

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        output = self.head(self.features(images))
        if self.kind == CLASSIFIER:
            return F.cross_entropy(output, labels)
        return F.binary_cross_entropy_with_logits(output, images)


@dataclass
class FeatureSpace:
    """A trained feature network and what it scored on the test split: accuracy (classifier) or
    reconstruction MSE per pixel (autoencoder)."""

    net: FeatureNet
    kind: str
    score: float

    @property
    def metric_names(self) -> names.FeatureSpaceMetrics:
        return METRICS[self.kind]

    @property
    def description(self) -> str:
        if self.kind == CLASSIFIER:
            return (f"hidden layer ({FEATURE_DIM} units) of a conv classifier trained on the train split, "
                    f"test accuracy {self.score:.4f}")
        return (f"bottleneck ({FEATURE_DIM} units) of a conv autoencoder trained on the train split (the data "
                f"has no labels), test reconstruction MSE per pixel {self.score:.5f}")

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Features [N, FEATURE_DIM] (float64, on the CPU) of images in [0, 1]."""
        device = next(self.net.parameters()).device
        return torch.cat([self.net.features(images[start:start + batch_size].to(device).float()).double().cpu()
                          for start in range(0, images.shape[0], batch_size)])


def feature_kind(data: ImageData) -> str:
    """The classifier where there are labels to learn, else the autoencoder."""
    labeled = data.labeled and data.train_labels.unique().numel() > 1
    return CLASSIFIER if labeled else AUTOENCODER


def cache_path(digest: str, kind: str) -> Path:
    return default_root() / "feature_nets" / f"{kind}-v{FEATURE_NET_VERSION}-{digest}.pt"


def _classes(data: ImageData) -> int:
    return int(data.train_labels.max().item()) + 1


def _stored(path: Path, digest: str, kind: str, net: FeatureNet) -> float | None:
    """The stored score, with `net` loaded from `path`, or None where the file is absent, unreadable,
    or made for other data, another version or another shape."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if (stored.get("digest"), stored.get("version"), stored.get("kind")) != (digest, FEATURE_NET_VERSION, kind):
            return None
        net.load_state_dict(stored["state_dict"])
        return float(stored["score"])
    except Exception:  # noqa: BLE001 - a torn, foreign or stale file is rebuilt, whatever its fault
        return None


def _store(path: Path, digest: str, kind: str, net: FeatureNet, score: float) -> None:
    """Written whole (a temporary file renamed) or not at all; a read-only home keeps it in memory only."""
    payload = {"digest": digest, "version": FEATURE_NET_VERSION, "kind": kind, "score": score,
               "state_dict": {key: value.detach().cpu() for key, value in net.state_dict().items()}}
    write_whole(path, lambda handle: torch.save(payload, handle))


def _train(data: ImageData, kind: str, device: torch.device) -> tuple[FeatureNet, float]:
    """A freshly initialized network trained for `TRAIN_STEPS` seeded steps on the train split, and
    its test score."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FEATURE_SEED)
        net = FeatureNet(data.image_shape, kind, _classes(data)).to(device)
    images, labels = data.split("train")
    order = torch.Generator().manual_seed(FEATURE_SEED)
    # under dynamic binarization, fresh Bernoulli draws as the models train on: pixels like the test split's
    draws = torch.Generator(device=images.device).manual_seed(FEATURE_SEED)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    net.train()
    with torch.enable_grad():
        for _ in range(TRAIN_STEPS):
            index = torch.randint(images.shape[0], (min(TRAIN_BATCH, images.shape[0]),), generator=order)
            index = index.to(images.device)
            batch = data.to_float(images[index], draws, fresh_draw=True).to(device)
            loss = net.loss(batch, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    return net, _test_score(net, data, device)


@torch.no_grad()
def _test_score(net: FeatureNet, data: ImageData, device: torch.device) -> float:
    total, count = 0.0, 0
    for images, labels in data.batches("test", 1000):
        images, labels = images.to(device), labels.to(device)
        if net.kind == CLASSIFIER:
            total += (net.head(net.features(images)).argmax(1) == labels).sum().item()
        else:
            total += (torch.sigmoid(net.head(net.features(images))) - images).square().mean((1, 2, 3)).sum().item()
        count += images.shape[0]
    return total / count


def feature_space(data: ImageData) -> FeatureSpace:
    """The data's feature network, on the data's device: from memory, else from the disk cache, else
    trained and stored."""
    kind = feature_kind(data)
    key = ("feature_space", kind)
    if key in data.derived:
        return data.derived[key]
    with _training_lock:
        if key not in data.derived:
            device = data.train_images.device
            digest, path = data.digest, cache_path(data.digest, kind)
            net = FeatureNet(data.image_shape, kind, _classes(data))
            score = _stored(path, digest, kind, net)
            if score is None:
                net, score = _train(data, kind, device)
                _store(path, digest, kind, net, score)
            data.derived[key] = FeatureSpace(net.to(device).eval(), kind, score)
    return data.derived[key]


# ----------------------------------------------------------------------------- distances

def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """||μ1 − μ2||² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between Gaussians fitted to two feature sets [N, D].

    tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½, the square root of a symmetric PSD matrix: computed from
    eigenvalues in float64, negative round-off clipped to zero (where scipy's sqrtm of Σ1 Σ2 leaves
    small imaginary parts that the usual implementations drop)."""
    first, second = first.double(), second.double()
    mean_gap = (first.mean(0) - second.mean(0)).square().sum()
    cov_first, cov_second = torch.cov(first.T), torch.cov(second.T)
    values, vectors = torch.linalg.eigh(cov_first)
    root_first = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_first @ cov_second @ root_first
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(mean_gap + cov_first.trace() + cov_second.trace() - 2 * trace_root)


def _knn_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point."""
    k = min(k, points.shape[0] - 1)
    return torch.cat([torch.cdist(points[start:start + chunk], points).kthvalue(k + 1, dim=1).values
                      for start in range(0, points.shape[0], chunk)])


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = NEIGHBOURS,
                     chunk: int = 1024, real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision, the share of generated points inside the real manifold
    (the union of balls around real points reaching their k-th nearest real neighbour); recall, the
    share of real points inside the generated manifold, built the same way. `real_radii`: the
    real points' `_knn_radii`, when the caller keeps them (they are the same for every model).
    Both read one table of generated-to-real distances, in chunks of `chunk` generated points."""
    real, generated = real.float(), generated.float()
    if real_radii is None:
        real_radii = _knn_radii(real, k, chunk)
    generated_radii = _knn_radii(generated, k, chunk)
    precise = []  # per generated point: inside some real point's ball
    recalled = torch.zeros(real.shape[0], dtype=torch.bool)  # per real point: inside some generated point's ball
    for start in range(0, generated.shape[0], chunk):
        distances = torch.cdist(generated[start:start + chunk], real)
        precise.append((distances <= real_radii).any(dim=1))
        recalled |= (distances <= generated_radii[start:start + chunk, None]).any(dim=0)
    return float(torch.cat(precise).double().mean()), float(recalled.double().mean())


# ----------------------------------------------------------------------------- a model's samples

@torch.no_grad()
def prior_samples(model: Autoencoder, count: int, seed: int, batch_size: int = 1000) -> torch.Tensor:
    """`count` decoded draws from the model's prior as images in [0, 1]: the decoder's means, not
    Bernoulli draws."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return torch.cat([torch.sigmoid(model.sample(min(batch_size, count - start), generator).float())
                      for start in range(0, count, batch_size)])


@torch.no_grad()
def sample_quality(model: Autoencoder, data: ImageData, count: int, seed: int,
                   reconstructions: torch.Tensor | None = None) -> tuple[dict[str, float], str]:
    """The metrics of `names.FeatureSpaceMetrics` for `model` against (at most `count`) test images, and
    the feature space in words: reconstructions for every model; prior samples for a VAE (an AE has
    no prior to sample). `reconstructions`: the test images' (at least `count`, in order, from the
    posterior means, in [0, 1]) when the caller has them."""
    space = feature_space(data)
    metric = space.metric_names
    test_images, _ = data.split("test")
    test_images = data.to_float(test_images[:count])
    features_key = ("feature_space_test_features", space.kind, count)  # the same for every trial on this data
    if features_key not in data.derived:
        data.derived[features_key] = space.embed(test_images)
    test_features = data.derived[features_key]
    if reconstructions is None or reconstructions.shape[0] < test_images.shape[0]:
        reconstructions = torch.cat([torch.sigmoid(model.decode(model.encode(test_images[start:start + 1000]).mean).float())
                                     for start in range(0, test_images.shape[0], 1000)])
    reconstructions = reconstructions[:test_images.shape[0]]
    metrics = {metric.quality: space.score,
               metric.fd_recon: frechet_distance(test_features, space.embed(reconstructions))}
    if model.variational:
        sample_features = space.embed(prior_samples(model, count, seed))
        metrics[metric.fd] = frechet_distance(test_features, sample_features)
        radii_key = ("feature_space_test_radii", space.kind, count)
        if radii_key not in data.derived:
            data.derived[radii_key] = _knn_radii(test_features.float(), NEIGHBOURS, 1024)
        metrics[metric.precision], metrics[metric.recall] = precision_recall(
            test_features, sample_features, real_radii=data.derived[radii_key])
    return metrics, space.description
