"""The four built-in model families, and the interface every family (yours too) has.

    posterior = model.encode(x)            # Posterior(mean, logvar) [B, D] each; an AE's logvar is None
    z = model.reparameterize(posterior)    # a sample (the mean for an AE)
    logits = model.decode(z)               # [B, C, H, W] logits; sigmoid gives pixel means
    samples = model.sample(n)              # decoded draws from the model's prior, as logits
    kl = model.kl_terms(posterior, z)      # the KL to its prior (`vae_lab.models.priors`)

A family subclasses `Autoencoder`, says whether it is `variational`, and implements `decode`
and either `encode_stats` (the encoder's [B, 2D] output, mean then log-variance; [B, D] for an
AE) or `encode` itself. Its constructor takes `image_shape` and `latent_dim` and whatever else
it names (`vae_lab.models.components.build_model`). `linear_vae`/`ae` are MLPs over the
flattened image (`hidden_dims`), `conv_vae`/`conv_ae` stack stride-2 convolutions
(`conv_channels`) and mirror them with transposed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vae_lab.models.posterior import Posterior
from vae_lab.models.priors import Prior, StandardNormal
from vae_lab.models.registry import register_model

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class ModelOutput:
    logits: torch.Tensor
    posterior: Posterior
    z: torch.Tensor


class Autoencoder(nn.Module):
    """Shared behaviour of every family (the module's doc has the interface). `prior` is p(z):
    N(0, I) until `build_model` gives a VAE the configured one; an AE's is only where `sample`
    draws from."""

    variational = True  # a VAE: encode gives a log-variance, the loss has a KL to the prior

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, prior: Prior | None = None):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.prior = prior if prior is not None else StandardNormal(latent_dim)

    def encode_stats(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output for images `x` [B, C, H, W] in [0, 1]: [B, 2D], the posterior's
        means then log-variances (a VAE), or [B, D] codes (an AE)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither encode nor encode_stats")

    def encode(self, x: torch.Tensor) -> Posterior:
        stats = self.encode_stats(x)
        if not self.variational:
            return Posterior(stats, None)
        mean, logvar = stats.chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def reparameterize(self, posterior: Posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        if posterior.logvar is None:
            return posterior.mean
        noise = torch.randn(posterior.mean.shape, generator=generator,
                            device=posterior.mean.device, dtype=posterior.mean.dtype)
        return posterior.sample(noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, D] to per-pixel Bernoulli logits (or Gaussian means before the sigmoid)
        [B, C, H, W]; `torch.sigmoid` of them is the image."""
        raise NotImplementedError(f"{type(self).__name__} does not implement decode")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> ModelOutput:
        posterior = self.encode(x)
        z = self.reparameterize(posterior, generator)
        return ModelOutput(self.decode(z), posterior, z)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode `count` draws from the model's prior; returns logits."""
        return self.decode(self.prior.sample(count, self, generator))

    def kl_terms(self, posterior: Posterior, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per image: [B, D] per dimension where analytic, else a [B, 1]
        one-sample estimate at `z` (`Prior.kl_terms`)."""
        return self.prior.kl_terms(posterior, z, self)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z, self)

    def positions_in(self, wider: "Autoencoder", name: str) -> tuple[torch.Tensor, ...]:
        """Where this model's parameter (or buffer) `name` sits in the same tensor of `wider`, a
        model of its family whose sizes (`model.latent_dim`, `model.hidden_dims`) are at least
        this one's: one index tensor per dimension. Trials of different sizes train in one pass
        as copies of the widest model holding each trial at these positions and zeros elsewhere
        (`vae_lab.training.padding`). By default a tensor's entries lead every dimension; a
        family that lays a dimension out otherwise overrides this (the MLPs' [mean, logvar])."""
        shape = dict(self.named_parameters(), **dict(self.named_buffers()))[name].shape
        return tuple(torch.arange(size) for size in shape)


class GatedDense(nn.Module):
    """A gated dense layer (Dauphin et al. 2017; Tomczak & Welling's VampPrior code):
    h = (W x + b) * sigmoid(V x + c)."""

    def __init__(self, size_in: int, size_out: int):
        super().__init__()
        self.value = nn.Linear(size_in, size_out)
        self.gate = nn.Linear(size_in, size_out)

    def forward(self, x):
        return self.value(x) * torch.sigmoid(self.gate(x))


def _mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    """Hidden layers of `activation` (a Linear + ReLU, or a GatedDense), then a plain Linear."""
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index == len(sizes) - 2:
            layers.append(nn.Linear(size_in, size_out))
        elif activation == "gated":
            layers.append(GatedDense(size_in, size_out))
        else:
            layers += [nn.Linear(size_in, size_out), nn.ReLU()]
    return nn.Sequential(*layers)


class MLPAutoencoder(Autoencoder):
    """`ae` / `linear_vae`: pixels -> hidden_dims -> latent -> reversed hidden_dims -> pixels."""

    def __init__(self, image_shape, latent_dim: int, hidden_dims: list[int] = (400,), activation: str = "relu"):
        super().__init__(image_shape, latent_dim)
        pixels = math.prod(image_shape)
        stats_size = 2 * latent_dim if self.variational else latent_dim
        self.encoder = _mlp([pixels, *hidden_dims, stats_size], activation)
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), pixels], activation)

    def encode_stats(self, x):
        return self.encoder(x.flatten(1))

    def positions_in(self, wider, name):
        positions = super().positions_in(wider, name)
        stats_layer = f"encoder.{len(self.encoder) - 1}."
        if self.variational and name in (stats_layer + "weight", stats_layer + "bias"):
            # the output rows are [mean, logvar]: each half goes to the wider model's half
            half = torch.arange(self.latent_dim)
            positions = (torch.cat([half, wider.latent_dim + half]), *positions[1:])
        return positions

    def decode(self, z):
        return self.decoder(z).view(-1, *self.image_shape)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: no running statistics, so a model behaves the same in train
    and eval mode, and stacked copies of it train under vmap (vae_lab.training.steps). The convolution
    before it has no bias: the norm removes it, so its gradient is rounding noise that Adam
    would turn into a random walk."""
    return nn.GroupNorm(min(8, channels), channels)


def _conv_output_size(size: int) -> int:
    return (size + 2 * 1 - 3) // 2 + 1  # kernel 3, stride 2, padding 1


UPSAMPLE_KERNEL, UPSAMPLE_STRIDE = 4, 2  # a kernel the stride divides: every output pixel gets as many taps


def _upsample(channels_in: int, channels_out: int, size: tuple[int, int], target: tuple[int, int],
              bias: bool) -> nn.ConvTranspose2d:
    """A stride-2 kernel-4 transposed convolution from `size` to `target` (2x, give or take one).
    Kernel 3 with stride 2 overlaps unevenly (alternate output pixels get 1 and 2 taps), which
    leaves a checkerboard; kernel 4 overlaps every pixel twice. Padding and output padding trim
    the 2x output to the target: 2 * size + 2 - 2 * padding + output_padding = target."""
    paddings, output_paddings = [], []
    for have, want in zip(size, target):
        excess = 2 * have + 2 - want  # = 2 * padding - output_padding
        paddings.append((excess + 1) // 2)
        output_paddings.append(2 * paddings[-1] - excess)
    return nn.ConvTranspose2d(channels_in, channels_out, UPSAMPLE_KERNEL, stride=UPSAMPLE_STRIDE,
                              padding=tuple(paddings), output_padding=tuple(output_paddings), bias=bias)


class ConvAutoencoder(Autoencoder):
    """`conv_ae` / `conv_vae`: stride-2 3x3 convolutions (each followed by GroupNorm and ReLU),
    mirrored by stride-2 4x4 transposed ones (`_upsample`: no checkerboard).

    With `latent_layout="vector"` a linear layer maps the last feature map to the latent
    vector. With `"cube"` the latent stays a C x H x W feature cube (seed 001's 4x4x4):
    `latent_dim` must then be a multiple of the last feature map's H*W.
    """

    def __init__(self, image_shape, latent_dim: int, conv_channels: list[int] = (32, 64, 64),
                 latent_layout: str = "vector"):
        super().__init__(image_shape, latent_dim)
        variational = self.variational
        in_channels, height, width = image_shape
        sizes = [(height, width)]
        for _ in conv_channels:
            sizes.append((_conv_output_size(sizes[-1][0]), _conv_output_size(sizes[-1][1])))
        self.feature_shape = (conv_channels[-1], *sizes[-1])
        self.latent_layout = latent_layout
        stats_factor = 2 if variational else 1

        encoder: list[nn.Module] = []
        for channels_in, channels_out in zip([in_channels, *conv_channels[:-1]], conv_channels):
            encoder += [nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False),
                        _norm(channels_out), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)

        feature_size = conv_channels[-1] * sizes[-1][0] * sizes[-1][1]
        area = sizes[-1][0] * sizes[-1][1]
        if latent_layout == "cube":
            if latent_dim % area:
                raise ValueError(
                    f"model.latent_dim={latent_dim} must be a multiple of the latent cube's "
                    f"area {sizes[-1][0]}x{sizes[-1][1]}={area} when model.latent_layout=cube"
                )
            self.latent_cube = (latent_dim // area, *sizes[-1])
            self.to_stats = nn.Conv2d(conv_channels[-1], stats_factor * self.latent_cube[0], 3, padding=1)
            self.from_latent = nn.Sequential(
                nn.Conv2d(self.latent_cube[0], conv_channels[-1], 3, padding=1, bias=False), _norm(conv_channels[-1]),
                nn.ReLU())
        else:
            self.latent_cube = None
            self.to_stats = nn.Linear(feature_size, stats_factor * latent_dim)
            self.from_latent = nn.Sequential(nn.Linear(latent_dim, feature_size), nn.ReLU())

        decoder: list[nn.Module] = []
        channels = list(reversed(conv_channels))
        targets = list(reversed(sizes[:-1]))  # spatial size after each transposed conv
        outs = channels[1:] + [in_channels]
        current = sizes[-1]
        for index, (channels_in, channels_out, target) in enumerate(zip(channels, outs, targets)):
            normed = index < len(channels) - 1
            decoder.append(_upsample(channels_in, channels_out, current, target, bias=not normed))
            if normed:
                decoder += [_norm(channels_out), nn.ReLU()]
            current = target
        self.decoder = nn.Sequential(*decoder)

    def encode_stats(self, x):
        features = self.encoder(x)
        if self.latent_cube is None:
            return self.to_stats(features.flatten(1))
        stats = self.to_stats(features)  # [B, factor*C, H, W]
        if not self.variational:
            return stats.flatten(1)
        mean, logvar = stats.chunk(2, dim=1)
        return torch.cat([mean.flatten(1), logvar.flatten(1)], dim=1)

    def decode(self, z):
        if self.latent_cube is None:
            features = self.from_latent(z).view(-1, *self.feature_shape)
        else:
            features = self.from_latent(z.view(-1, *self.latent_cube))
        return self.decoder(features)


@register_model("ae")
class MLPAE(MLPAutoencoder):
    variational = False


@register_model("linear_vae")
class MLPVAE(MLPAutoencoder):
    variational = True


@register_model("conv_ae")
class ConvAE(ConvAutoencoder):
    variational = False


@register_model("conv_vae")
class ConvVAE(ConvAutoencoder):
    variational = True
