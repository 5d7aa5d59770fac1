"""An example of your own model family: an MLP VAE whose encoder and decoder are stacks of
pre-norm residual blocks. Run it with

    python -m vae_lab.train model.name=experiments/components/residual_vae.py:ResidualVAE model.options.blocks=2
    python -m vae_lab.sweep experiments/components/residual_study.yaml

The whole interface (the README's 'Your own components'): subclass `Autoencoder`, say whether
the family is `variational`, take `image_shape` and `latent_dim` (and your own options, here
`blocks` and `width`, set as model.options.*), and implement

    encode_stats(x)  images [B, C, H, W] in [0, 1] -> [B, 2 * latent_dim]: means, then log-variances
    decode(z)        latents [B, latent_dim] -> logits [B, C, H, W] (sigmoid gives the pixel means)

vae_lab does the rest: reparameterizing, the prior (prior.name), the KL, sampling, batching
trials under vmap (so use LayerNorm or GroupNorm, not BatchNorm, whose running statistics vmap
cannot stack), checkpoints, evaluation and the serve page.
"""

import math

import torch
from torch import nn

from vae_lab.models import Autoencoder


class ResidualBlock(nn.Module):
    """h + W2 relu(W1 LayerNorm(h))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.inner(self.norm(h))


class ResidualVAE(Autoencoder):
    variational = True

    def __init__(self, image_shape, latent_dim: int, blocks: int = 2, width: int = 256):
        super().__init__(image_shape, latent_dim)
        if blocks < 0 or width < 1:
            raise ValueError(f"blocks must be 0 or more and width 1 or more, got {blocks} and {width}")
        pixels = math.prod(image_shape)
        self.encoder = nn.Sequential(nn.Linear(pixels, width), *[ResidualBlock(width) for _ in range(blocks)],
                                     nn.ReLU(), nn.Linear(width, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, width), *[ResidualBlock(width) for _ in range(blocks)],
                                     nn.ReLU(), nn.Linear(width, pixels))

    def encode_stats(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.image_shape)
