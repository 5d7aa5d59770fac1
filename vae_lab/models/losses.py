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


KL_SCHEDULES = ("constant", "linear", "cyclical")


def kl_ramp(step: int, schedule: torch.Tensor, warmup_steps: torch.Tensor, period: torch.Tensor,
            ratio: torch.Tensor) -> torch.Tensor:
    """β / loss.kl_weight at optimizer step `step` (0-based) for each trial, the one place the
    schedules are written; each argument a tensor of one value per trial (`schedule`: the index
    in KL_SCHEDULES).

    constant: 1. linear: min(1, step / warmup_steps). cyclical (Fu et al. 2019): the run's steps
    split into cycles of `period` steps; within one, min(1, τ / ratio) with τ = (step mod period) / period.
    """
    linear = (step / warmup_steps.clamp(min=1)).clamp(max=1.0)
    cyclical = (torch.remainder(torch.full_like(period, float(step)), period) / period / ratio).clamp(max=1.0)
    return torch.where(schedule == 1, linear, torch.where(schedule == 2, cyclical, torch.ones_like(linear)))


def schedule_columns(losses: list, total_steps: int, device=None) -> dict[str, torch.Tensor]:
    """`kl_ramp`'s arguments for these trials' `LossConfig`s over a run of `total_steps` steps."""
    column = dict(dtype=torch.float32, device=device)
    return {"schedule": torch.tensor([KL_SCHEDULES.index(loss.kl_schedule) for loss in losses], device=device),
            "warmup_steps": torch.tensor([float(loss.kl_warmup_steps) for loss in losses], **column),
            "period": torch.tensor([max(total_steps, 1) / loss.kl_cycles for loss in losses], **column),
            "ratio": torch.tensor([loss.kl_cycle_ratio for loss in losses], **column)}


def kl_weight_at(step: int, loss, total_steps: int) -> float:
    """β of one run (`loss`: its LossConfig) at optimizer step `step` of `total_steps`."""
    return loss.kl_weight * float(kl_ramp(step, **schedule_columns([loss], total_steps))[0])


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: what the optimizer sees (batch mean of recon + β·kl, free bits applied)
    recon: torch.Tensor  # [B]
    kl: torch.Tensor  # [B]: the KL itself, whatever free bits did to the loss


def total_correlation_mws(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dataset_size: int) -> torch.Tensor:
    """Chen et al. (2018)'s minibatch-weighted-sampling estimate of the total correlation
    KL(q(z) || Π_j q(z_j)) from one batch of B posteriors and their samples z ([B, D] each), with
    q(z_i) ≈ (1 / (N B)) Σ_j q(z_i | x_j) for a training set of N images."""
    per_dim = -0.5 * (math.log(2 * math.pi) + logvar.unsqueeze(0)
                      + (z.unsqueeze(1) - mean.unsqueeze(0)).square() / logvar.exp().unsqueeze(0))  # [B_i, B_j, D]
    log_norm = math.log(z.shape[0] * dataset_size)
    log_joint = torch.logsumexp(per_dim.sum(-1), dim=1) - log_norm
    log_marginals = (torch.logsumexp(per_dim, dim=1) - log_norm).sum(-1)
    return (log_joint - log_marginals).mean()


def iwae_loss(recon: torch.Tensor, log_ratio: torch.Tensor, samples: int, kl_weight) -> torch.Tensor:
    """The importance-weighted objective (Burda et al. 2016) as a loss: the batch mean of
    -log (1/k) Σ_j exp(-(recon_j + β · log_ratio_j)), with recon_j = -log p(x|z_j) and
    log_ratio_j = log q(z_j|x) - log p(z_j) for k = `samples` draws per image, given image-major
    ([B·k]: image b's draws at rows b·k .. b·k + k - 1). β = 1: minus the k-sample bound; k = 1:
    the ELBO with its KL estimated at the one sample."""
    log_weights = -(recon + kl_weight * log_ratio).view(-1, samples)
    return -(torch.logsumexp(log_weights, dim=1) - math.log(samples)).mean()


def loss_terms(logits: torch.Tensor, images: torch.Tensor, kl_terms: torch.Tensor | None,
               likelihood: str, kl_weight, gaussian_std: float = DEFAULT_GAUSSIAN_STD,
               free_bits=0.0, total_correlation: torch.Tensor | None = None, tc_weight=1.0) -> LossTerms:
    """The training loss and its per-image terms. With `free_bits` λ > 0 (Kingma et al. 2016)
    the KL part of the loss is Σ_j max(λ, mean over the batch of KL_j): a latent dimension
    whose KL is below λ nats is not pushed down further. `kl_weight` and `free_bits` may be
    0-d tensors (one trial's row under vmap). `kl_terms`: the model's `kl_terms` ([B, D] per
    latent dimension, or a [B, 1] estimate), None for an AE. With a `total_correlation` estimate
    (`total_correlation_mws`) the loss is β-TCVAE's (Chen et al. 2018): the ELBO's, plus
    (tc_weight - 1) · TC, so the total correlation weighs tc_weight and the other two parts of
    the KL stay at β."""
    recon = reconstruction_nll(logits.float(), images, likelihood, gaussian_std)
    kl_dims = torch.zeros_like(recon).unsqueeze(1) if kl_terms is None else kl_terms.float()
    kl = kl_dims.sum(dim=1)
    free_bits = torch.as_tensor(free_bits, dtype=kl.dtype, device=kl.device)
    clamped = recon.mean() + kl_weight * torch.maximum(kl_dims.mean(dim=0), free_bits).sum()
    loss = torch.where(free_bits > 0, clamped, (recon + kl_weight * kl).mean())
    if total_correlation is not None:
        loss = loss + (tc_weight - 1.0) * total_correlation
    return LossTerms(loss, recon, kl)
