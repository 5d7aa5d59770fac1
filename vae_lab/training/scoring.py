"""A split's loss, reconstruction, KL, ELBO and MSE for K models at once, per image in nats, and
the per-seed noise and data streams that keep a trial in a batch the trial it would be alone."""

from __future__ import annotations

import math

import torch

from vae_lab.config import Config
from vae_lab.data.datasets import ImageData
from vae_lab.models.losses import reconstruction_nll

EVAL_BATCH_SIZE = 1000
ORDER_SEED_OFFSET, NOISE_SEED_OFFSET, EVAL_NOISE_SEED_OFFSET = 0, 1, 1_000_003


@torch.no_grad()
def evaluate_split(forward, data: ImageData, split: str, configs: list[Config], variational: bool,
                   latent_dims: list[int], device: torch.device, noise_dtype=torch.float32) -> list[dict[str, float]]:
    """`split`/* of K models at once, per image in nats, from one posterior sample per image.

    `forward(images, noise, noise_dim)` gives (logits, mean[, logvar, kl_terms]) with a leading
    K dimension (`steps.NoiseInput`); `latent_dims` is each model's latent size. The images are the
    split's fixed pixels, shared by every trial; each trial's noise comes from a generator seeded
    with its `train.seed` (trials with one seed and latent size share it), reseeded on every call
    so every epoch is scored on the same draws.
    """
    streams, slot = stream_slots(configs, latent_dims, device)
    generators = [torch.Generator(device=device).manual_seed(seed + EVAL_NOISE_SEED_OFFSET) for seed, _ in streams]
    loss = configs[0].loss  # the likelihood is part of the batch key: the same for every trial
    totals = torch.zeros(3, len(configs), dtype=torch.float64, device=device)
    count = 0
    for images, _ in data.batches(split, EVAL_BATCH_SIZE):
        noise, noise_dim = draw_noise(generators, streams, slot, images.shape[0], variational, device, noise_dtype)
        logits, *stats = forward(images, noise, noise_dim)
        logits = logits.float()
        trials, batch = logits.shape[:2]
        targets = images.expand(trials, *images.shape)
        recon = reconstruction_nll(logits.flatten(0, 1), targets.flatten(0, 1), loss.likelihood,
                                   loss.gaussian_std).view(trials, batch)
        # the KL to each model's prior, as its forward gave it ([K, B, D] or a [K, B, 1] estimate)
        kl = stats[2].float().sum(dim=2) if len(stats) > 2 else torch.zeros_like(recon)
        squared = (torch.sigmoid(logits) - targets).square().flatten(2).sum(dim=2)
        totals += torch.stack([recon.sum(1), kl.sum(1), squared.sum(1)]).double()
        count += batch
    recon_sums, kl_sums, squared_sums = totals.tolist()
    pixels = math.prod(data.image_shape)
    metrics = []
    for row, config in enumerate(configs):
        recon, kl = recon_sums[row] / count, kl_sums[row] / count
        values = {f"{split}/loss": recon + config.loss.kl_weight * kl, f"{split}/recon": recon,
                  f"{split}/mse_per_pixel": squared_sums[row] / (count * pixels)}
        if variational:
            values[f"{split}/kl"] = kl
            if config.likelihood_is_normalized:  # only then is recon + KL a bound on -log p(x)
                values[f"{split}/elbo"] = -(recon + kl)
        metrics.append(values)
    return metrics


def stream_slots(configs: list[Config], latent_dims: list[int],
                 device: torch.device) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
    """The distinct random streams, one per (seed, latent size), and each trial's index into them
    (None when all share one). A trial draws what it would draw alone: its seed's data order and
    noise, at its own latent size (trials of different sizes train together padded,
    `vae_lab.training.padding`)."""
    keys = [(config.train.seed, dims) for config, dims in zip(configs, latent_dims)]
    streams = list(dict.fromkeys(keys))
    if len(streams) == 1:
        return streams, None
    return streams, torch.tensor([streams.index(key) for key in keys], device=device)


def gather(per_seed: list[torch.Tensor], slot: torch.Tensor | None):
    """(tensor, vmap in_dim): one shared tensor, or a [K, ...] stack of each trial's own."""
    if slot is None:
        return per_seed[0], None
    return torch.stack(per_seed).index_select(0, slot), 0


def draw_noise(generators, streams: list[tuple[int, int]], slot, batch: int, variational: bool, device, dtype):
    """Each stream's reparameterization noise [batch, its latent size], zero-padded to the widest."""
    if not variational:  # an AE's reparameterize draws nothing
        return None, None
    width = max(dims for _, dims in streams)
    draws = [torch.randn((batch, dims), generator=generator, device=device, dtype=dtype)
             for generator, (_, dims) in zip(generators, streams)]
    return gather([torch.nn.functional.pad(draw, (0, width - draw.shape[1])) if draw.shape[1] < width else draw
                   for draw in draws], slot)
