"""An example of your own training objective: the variational Rényi bound (Li & Turner 2016),

    L_α(x) = 1/(1 - α) · log (1/k) Σ_j w_j^(1 - α),   w_j = p(x, z_j) / q(z_j | x),

which is the IWAE bound at α = 0 and tends to the ELBO as α → 1. Run it with

    python -m vae_lab.train loss.objective=experiments/components/renyi_objective.py:RenyiBound \\
        loss.iwae_samples=5 loss.options.alpha=0.5

The interface (the README's 'Your own components'): subclass `Objective`, set `draws_per_image`
(here from loss.iwae_samples, which the constructor names), and return the loss for one trial's
`Draws` (recon and log q(z|x) - log p(z) per draw, image-major) as a 0-d tensor. It runs under
vmap when trials share a batch, so only tensor operations on its inputs.
"""

import math

import torch

from vae_lab.models import Objective


class RenyiBound(Objective):
    shapes_the_elbo = False  # it weighs whole draws: loss.free_bits and loss.tc_weight do not apply
    needs_a_kl = True  # a VAE's bound

    def __init__(self, iwae_samples: int = 1, alpha: float = 0.5):
        if alpha == 1:
            raise ValueError("alpha = 1 is the ELBO: use loss.objective=elbo")
        self.draws_per_image = iwae_samples
        self.alpha = alpha

    def __call__(self, draws, kl_weight):
        log_weights = -(draws.recon + kl_weight * draws.log_ratio).view(-1, self.draws_per_image)
        scaled = (1 - self.alpha) * log_weights
        bound = (torch.logsumexp(scaled, dim=1) - math.log(self.draws_per_image)) / (1 - self.alpha)
        return -bound.mean()
