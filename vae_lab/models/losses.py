"""Reconstruction and KL terms, per image, in nats.

Every term is summed over the pixels (or latent dimensions) of one image, so AE and
VAE report numbers on one scale; the training loss averages them over the batch.

- bernoulli: -log p(x|z) with p = sigmoid(logits), computed stably from the logits. A
  normalized likelihood only for binary pixels (`data.binarize`); on grey pixels it is a
  loss (cross-entropy), not a log-likelihood.
- gaussian: -log N(x; sigmoid(logits), sigma^2 I) with its constant:
  sum (x - mu)^2 / (2 sigma^2) + D/2 log(2 pi sigma^2), sigma = `loss.gaussian_std`
  (default 1/sqrt(2): the summed squared error plus D/2 log(pi), 449 nats for 28x28).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vae_lab.config import DEFAULT_GAUSSIAN_STD
from vae_lab.models.autoencoders import Posterior


def reconstruction_nll(logits: torch.Tensor, images: torch.Tensor, likelihood: str,
                       gaussian_std: float = DEFAULT_GAUSSIAN_STD) -> torch.Tensor:
    """Per-image reconstruction term, shape [B]."""
    if likelihood == "bernoulli":
        # BCE with logits as softplus(l) - l*x: the same stable value, one fused elementwise
        # op (binary_cross_entropy_with_logits decomposes into six under vmap)
        return (F.softplus(logits) - logits * images).flatten(1).sum(dim=1)
    if likelihood == "gaussian":
        variance = gaussian_std ** 2
        squared = (torch.sigmoid(logits) - images).square().flatten(1)
        return squared.sum(dim=1) / (2 * variance) + 0.5 * squared.shape[1] * math.log(2 * math.pi * variance)
    raise ValueError(f"unknown likelihood {likelihood!r}")


def kl_to_standard_normal(posterior: Posterior) -> torch.Tensor:
    """Per-dimension KL(q(z|x) || N(0, I)) in closed form, shape [B, latent_dim]."""
    if posterior.logvar is None:
        return torch.zeros_like(posterior.mean)
    mean, logvar = posterior.mean, posterior.logvar
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def kl_weight_at(step: int, kl_weight: float, warmup_steps: int) -> float:
    """β at a training step: linear warm-up from 0 over `warmup_steps`, then constant."""
    if warmup_steps <= 0:
        return kl_weight
    return kl_weight * min(1.0, step / warmup_steps)


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: batch mean of recon + β·kl, what the optimizer sees
    recon: torch.Tensor  # [B]
    kl: torch.Tensor  # [B]


def loss_terms(logits: torch.Tensor, images: torch.Tensor, posterior: Posterior,
               likelihood: str, kl_weight: float, gaussian_std: float = DEFAULT_GAUSSIAN_STD) -> LossTerms:
    recon = reconstruction_nll(logits.float(), images, likelihood, gaussian_std)
    kl = kl_to_standard_normal(Posterior(posterior.mean.float(),
                                         None if posterior.logvar is None else posterior.logvar.float())).sum(dim=1)
    loss = (recon + kl_weight * kl).mean()
    return LossTerms(loss, recon, kl)
