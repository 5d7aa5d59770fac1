"""q(z|x) as the encoder gives it, and the reparameterization (the one place it is written)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Posterior:
    mean: torch.Tensor  # [B, latent_dim]
    logvar: torch.Tensor | None  # None for a deterministic (AE) encoder

    @property
    def std(self) -> torch.Tensor:
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor | None) -> torch.Tensor:
        """The reparameterization, the one place it is written: z = mean + noise · std, with
        noise ~ N(0, I) drawn by the caller (so seeds and batched trials decide it). An AE's
        posterior is a point: its mean (repeated along the noise's leading dimensions)."""
        if noise is None:
            if self.logvar is not None:
                raise ValueError("a variational posterior is sampled with noise")
            return self.mean
        return self.mean + noise * self.std
