"""The VAE's prior p(z): `prior.name` standard_normal | mog | vampprior.

    log_p = prior.log_prob(z, model)           # [..., D] -> [...], nats
    z = prior.sample(count, model, generator)  # [count, D]
    kl = prior.kl_terms(posterior, z, model)   # [B, D] analytic per dimension, or [B, 1] estimated

Each prior is a module of its model (`Autoencoder.prior`): its learned parameters train,
checkpoint and stack under vmap with the model's. The model is passed in, not kept: the
VampPrior's density is the model's own encoder at its pseudo-inputs.

The KL is analytic where it exists (the standard normal: `analytic_kl`), otherwise the
single-sample Monte Carlo estimate log q(z|x) - log p(z) at the z the decoder saw; either is
logged under the same names, the estimator in the run's tag `vae_lab.kl_estimator`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_lab.models.posterior import Posterior
from vae_lab.models.registry import register_prior

LOG_2PI = math.log(2 * math.pi)
MOG_COMPONENTS, VAMPPRIOR_COMPONENTS = 10, 500  # prior.components=0; 500 pseudo-inputs as in the VampPrior paper


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).square() / logvar.exp()).sum(dim=-1)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.square()).sum(dim=-1)


def kl_to_standard_normal(posterior: Posterior) -> torch.Tensor:
    """Per-dimension KL(q(z|x) || N(0, I)) in closed form, shape [B, latent_dim]."""
    if posterior.logvar is None:
        return torch.zeros_like(posterior.mean)
    mean, logvar = posterior.mean, posterior.logvar
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


class Prior(nn.Module):
    """The interface (see the module's doc). `analytic_kl`: whether `kl_terms` is exact per dimension."""

    analytic_kl = False

    def log_prob(self, z: torch.Tensor, model) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, count: int, model, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def kl_terms(self, posterior: Posterior, z: torch.Tensor, model) -> torch.Tensor:
        """One sample's estimate log q(z|x) - log p(z), as a [B, 1] column."""
        log_q = gaussian_log_density(z.float(), posterior.mean.float(), posterior.logvar.float())
        return (log_q - self.log_prob(z.float(), model)).unsqueeze(-1)

    @property
    def label(self) -> str:
        """What to call this prior on a page ("the N(0, I) prior")."""
        return type(self).__name__

    @property
    def estimator(self) -> str:
        return "analytic" if self.analytic_kl else "monte carlo, one sample (log q(z|x) - log p(z))"


@register_prior("standard_normal")
class StandardNormal(Prior):
    """N(0, I): no parameters, the KL in closed form."""

    analytic_kl = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    @property
    def label(self):
        return "N(0, I)"

    def log_prob(self, z, model=None):
        return standard_normal_log_density(z)

    def sample(self, count, model=None, generator=None):
        device = next(model.parameters()).device if model is not None else None
        return torch.randn((count, self.latent_dim), generator=generator, device=device)

    def kl_terms(self, posterior, z, model=None):
        return kl_to_standard_normal(Posterior(posterior.mean.float(), posterior.logvar.float()))


@register_prior("mog")
class MixtureOfGaussians(Prior):
    """A mixture of K learned diagonal Gaussians with learned weights. The means start as
    N(0, I) draws (taken from the model's seeded initialization), the variances at 1, the
    weights equal."""

    def __init__(self, latent_dim: int, components: int = 0):
        super().__init__()
        components = components or MOG_COMPONENTS
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    @property
    def label(self):
        return f"mixture-of-{self.means.shape[0]}-Gaussians"

    def log_prob(self, z, model=None):
        per_component = gaussian_log_density(z.unsqueeze(-2), self.means, self.logvars)  # [..., K]
        return torch.logsumexp(per_component + torch.log_softmax(self.logits, dim=-1), dim=-1)

    def sample(self, count, model=None, generator=None):
        device = self.means.device
        picks = torch.multinomial(torch.softmax(self.logits.detach().float(), -1).to(device), count,
                                  replacement=True, generator=generator)
        noise = torch.randn((count, self.means.shape[1]), generator=generator, device=device)
        return self.means[picks] + noise * torch.exp(0.5 * self.logvars[picks])


@register_prior("vampprior")
class VampPrior(Prior):
    """Tomczak & Welling 2018: p(z) = (1/K) Σ_k q(z | u_k), the model's own encoder at K learned
    pseudo-inputs u_k. As in their code, u_k = hardtanh_[0,1](w_k) with w_k drawn from
    N(`init_mean`, `init_std`) (0.05, 0.01 there: `prior.init_mean`, `prior.init_std`)."""

    def __init__(self, image_shape: tuple[int, int, int], components: int = 0, init_mean: float = 0.05,
                 init_std: float = 0.01):
        super().__init__()
        components = components or VAMPPRIOR_COMPONENTS
        self.pseudo_weights = nn.Parameter(torch.randn(components, *image_shape) * init_std + init_mean)

    @property
    def label(self):
        return f"VampPrior ({self.pseudo_weights.shape[0]} pseudo-inputs)"

    def pseudo_inputs(self) -> torch.Tensor:
        return torch.nn.functional.hardtanh(self.pseudo_weights, 0.0, 1.0)

    def _components(self, model) -> Posterior:
        return model.encode(self.pseudo_inputs())

    def log_prob(self, z, model):
        components = self._components(model)
        per_component = gaussian_log_density(z.unsqueeze(-2), components.mean.float(), components.logvar.float())
        return torch.logsumexp(per_component, dim=-1) - math.log(per_component.shape[-1])

    def sample(self, count, model, generator=None):
        components = self._components(model)
        device = components.mean.device
        picks = torch.randint(components.mean.shape[0], (count,), generator=generator, device=device)
        noise = torch.randn((count, components.mean.shape[1]), generator=generator, device=device)
        return components.mean[picks] + noise * components.std[picks]
