"""The pictures a run logs: reconstructions, prior samples, per-class panels, latent maps.

Each function takes a trained model and data, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vae_lab.evaluation.latent_evolution import FAST_PNG  # noqa: E402
from vae_lab.models.autoencoders import Autoencoder  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] images as one [C', H', W'] picture, `nrow` to a row, `padding` pixels of
    `pad_value` around each: `torchvision.utils.make_grid`'s layout (grey images become three
    channels; a lone image is returned unpadded), without importing torchvision, whose import
    brings torch._dynamo (1.6 s of every run's end on a 2-core CPU)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    cell_height, cell_width = height + padding, width + padding
    picture = images.new_full((channels, cell_height * rows + padding, cell_width * columns + padding), pad_value)
    for index in range(count):
        top, left = (index // columns) * cell_height + padding, (index % columns) * cell_width + padding
        picture[:, top:top + height, left:left + width] = images[index]
    return picture


def save_image(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, pad_value: float = 0.0,
               format: str | None = None) -> None:
    """`image_grid` written as a PNG (a path or a binary stream): `torchvision.utils.save_image`'s
    pixels, each value v in [0, 1] stored as round(255 v). zlib's fastest level: the same pixels
    in a file about 10% larger, written 2-6x faster (a run writes four)."""
    picture = image_grid(images.detach().float().cpu(), nrow=nrow, padding=padding, pad_value=pad_value)
    pixels = picture.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, format=format, compress_level=FAST_PNG)


def _pixels(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float()).cpu()


@torch.no_grad()
def save_reconstructions(model: Autoencoder, images: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Inputs in the upper rows, their reconstructions (from the posterior mean) below."""
    outputs = _pixels(model.decode(model.encode(images).mean))
    save_image(torch.cat([images.float().cpu(), outputs]), path, nrow=per_row, padding=2, pad_value=1.0)


@torch.no_grad()
def save_prior_samples(model: Autoencoder, path: Path, count: int = 64, seed: int = 0) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    save_image(_pixels(model.sample(count, generator)), path, nrow=int(count ** 0.5), pad_value=1.0)


@torch.no_grad()
def save_class_panel(model: Autoencoder, images: torch.Tensor, labels: torch.Tensor, path: Path,
                     samples_per_class: int = 8, seed: int = 0) -> None:
    """One row per class (without labels, per one of the first images): a test input, then samples
    drawn around its posterior.

    Samples are mean + std * noise (the standard deviation, not the log-variance).
    An AE's posterior is a point, so its row repeats the reconstruction.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    classes = sorted(labels.unique().tolist())
    examples = ([images[labels == label][:1] for label in classes] if len(classes) > 1
                else list(images[:samples_per_class].split(1)))
    rows = []
    for example in examples:
        posterior = model.encode(example)
        noise = torch.randn((samples_per_class, model.latent_dim), generator=generator, device=device)
        z = posterior.sample(noise)
        rows.append(torch.cat([example.float().cpu(), _pixels(model.decode(z))]))
    save_image(torch.cat(rows), path, nrow=samples_per_class + 1, pad_value=1.0)


@torch.no_grad()
def save_latent_traversal(model: Autoencoder, images: torch.Tensor, labels: torch.Tensor, path: Path,
                          steps: int = 15, means: torch.Tensor | None = None) -> None:
    """2-D latent: the decoder over a grid on [-2, 2]^2. Otherwise: interpolations between
    the latent means of consecutive classes (0->1, 1->2, ..., last->0); `means`: the images'
    posterior means when the caller has them."""
    device = next(model.parameters()).device
    if model.latent_dim == 2:
        axis = torch.linspace(-2.0, 2.0, steps, device=device)
        grid_y, grid_x = torch.meshgrid(axis.flip(0), axis, indexing="ij")  # +y at the top
        z = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
        save_image(_pixels(model.decode(z)), path, nrow=steps, pad_value=1.0)
        return
    if means is None:
        means = model.encode(images).mean
    classes = sorted(labels.unique().tolist())
    class_means = torch.stack([means[labels == label].mean(dim=0) for label in classes])
    weights = torch.linspace(0.0, 1.0, steps, device=device).unsqueeze(1)
    rows = []
    for index in range(len(classes)):
        start, end = class_means[index], class_means[(index + 1) % len(classes)]
        rows.append((1 - weights) * start + weights * end)
    save_image(_pixels(model.decode(torch.cat(rows))), path, nrow=steps, pad_value=1.0)


def project_2d(latents: np.ndarray) -> tuple[np.ndarray, str]:
    """The latents themselves when 2-D, else their first two principal components."""
    if latents.shape[1] == 2:
        return latents, "z"
    if latents.shape[1] == 1:
        return np.column_stack([latents[:, 0], np.zeros(len(latents))]), "z"
    from vae_lab.evaluation.metrics import principal_components

    mean, basis = principal_components(latents, 2)
    return ((torch.tensor(latents, dtype=torch.float64) - mean) @ basis.T).numpy(), "PC"


def scatter_by_class(ax, points: np.ndarray, labels: np.ndarray, class_names=None, size: float = 4) -> None:
    classes = np.unique(labels)
    colours = plt.get_cmap("tab10")
    for index, label in enumerate(classes):
        chosen = labels == label
        name = class_names[label] if class_names is not None else str(label)
        ax.scatter(points[chosen, 0], points[chosen, 1], s=size, color=colours(index % 10),
                   label=name, alpha=0.7, linewidths=0)
