"""Training objectives: what a step minimizes, from one trial's batch of draws.

    objective = build_objective(config.loss)   # ELBO(), IWAE(iwae_samples=k), or yours (loss.objective)
    images = objective.repeat(images)          # each image draws_per_image times in a row (image-major)
    loss = objective(draws, kl_weight)         # a 0-d tensor; draws: `Draws`

An objective is registered (`register_objective`) or named by import path or file, like a model
family, and built from the `loss.*` keys its constructor names (`iwae_samples`) and
`loss.options`. It runs inside `torch.func.vmap` when trials share a batch: `kl_weight` is then
a 0-d tensor, one trial's row, and everything it does must be a tensor operation.
"""

from __future__ import annotations

from typing import Callable

import torch

from vae_lab.models.losses import iwae_loss
from vae_lab.models.registry import register_objective


class Draws:
    """One trial's batch: B images, `samples` draws z of each, image-major ([B·k] rows: image b's
    draws at b·k .. b·k + k - 1).

    recon      [B·k]  -log p(x|z), nats
    kl         [B·k]  KL(q(z|x) || p(z)) of each row (closed form, or its estimate at z); 0 for an AE
    elbo_loss  0-d    the ELBO's loss: batch mean of recon + β·KL, with free bits and β-TCVAE's
                      total-correlation weight applied (`vae_lab.models.losses.loss_terms`)
    log_ratio  [B·k]  log q(z|x) - log p(z) at each draw (computed when first read)
    """

    def __init__(self, recon: torch.Tensor, kl: torch.Tensor, elbo_loss: torch.Tensor, samples: int,
                 log_ratio: Callable[[], torch.Tensor]):
        self.recon, self.kl, self.elbo_loss, self.samples = recon, kl, elbo_loss, samples
        self._log_ratio = log_ratio

    @property
    def log_ratio(self) -> torch.Tensor:
        return self._log_ratio()


class Objective:
    """The interface. `draws_per_image`: k, the draws of each image a step takes.
    `shapes_the_elbo`: loss.free_bits and loss.tc_weight act on it (they change `Draws.elbo_loss`);
    an objective that does not read elbo_loss sets it False, and they are refused with it.
    `needs_a_kl`: only a VAE can train with it."""

    draws_per_image = 1
    shapes_the_elbo = True
    needs_a_kl = False

    def repeat(self, images: torch.Tensor) -> torch.Tensor:
        k = self.draws_per_image
        return images if k == 1 else images.repeat_interleave(k, dim=-4)

    def __call__(self, draws: Draws, kl_weight) -> torch.Tensor:
        raise NotImplementedError


@register_objective("elbo")
class ELBO(Objective):
    """The evidence lower bound (with β, its schedule, free bits and the TC weight), as a loss."""

    def __call__(self, draws, kl_weight):
        return draws.elbo_loss


@register_objective("iwae")
class IWAE(Objective):
    """Burda et al. 2016: minus the bound of k = `iwae_samples` importance samples per image, β on
    each draw's log q(z|x) - log p(z) (`vae_lab.models.losses.iwae_loss`); k = 1 is the ELBO with
    its KL estimated at the draw."""

    shapes_the_elbo = False
    needs_a_kl = True

    def __init__(self, iwae_samples: int = 1):
        if iwae_samples < 1:
            raise ValueError(f"iwae_samples must be 1 or more, got {iwae_samples}")
        self.draws_per_image = iwae_samples

    def __call__(self, draws, kl_weight):
        return iwae_loss(draws.recon, draws.log_ratio, self.draws_per_image, kl_weight)
