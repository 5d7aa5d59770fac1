"""Trials of different sizes in one pass: each trial held inside a copy of the widest model.

Trials of one family that differ only in `SIZE_KEYS` (latent size, hidden widths at one depth)
train stacked as copies of the widest of them (`widest`). Each trial's tensors sit at the
positions its model names (`Autoencoder.positions_in`); every other entry is zero. With zero
weights in and out of them, the padded hidden units and latent dimensions are inert: a padded
unit's pre-activation is 0, its outgoing weights are 0, a padded latent dimension has mean 0 and
log-variance 0 (a KL of exactly 0 to N(0, I)), and the decoder's weights from it are 0. Gradients
are masked to each trial's own entries (`Embedding.mask`) before clipping and Adam, so padded
entries never move (Adam's moments of a zero gradient stay zero) and a trial's gradient norm is
its own. A trial then computes what it computes alone, up to floating-point summation order.

`vae_lab.training.batching.pads` checks that a family behaves so, once per family and depth, by
running a model and a wider one holding it on the same inputs; a family that does not (a
normalization over the features, a layout `positions_in` does not describe) trains by shape as
before. Losses that act per latent dimension beyond its KL (free bits, the total correlation)
or priors other than N(0, I) are kept out (`loss_pads`, `batching.pads`).

`partition` groups sizes so that padding never costs more than it saves, by the step-time model
`STEP_COST` measured in `benchmarks/padding.py` (benchmarks/RESULTS.md §0l).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

from vae_lab.config import Config

SIZE_KEYS = ("model.latent_dim", "model.hidden_dims")

# One training step's seconds on a CPU, as a function of the trials stacked (K) and one step's
# forward FLOPs of the widest of them (f): alone c0 + c1·f; K stacked s0 + K·(s2 + s1·f).
# Fitted to linear_vae steps (batch 128, hidden 32..512) on a 2-core AVX-512 Xeon
# (benchmarks/padding.py; benchmarks/RESULTS.md §0l).
# A padded batch costs PADDED_OVERHEAD times a same-sized one (masking every gradient: 1.05-1.1x
# for K = 4..8 at hidden 256).
STEP_COST = {"cpu": {"c0": 1.7e-3, "c1": 1.28e-11, "s0": 2.42e-3, "s2": 5.4e-4, "s1": 1.37e-11}}
PADDED_OVERHEAD = 1.08


def sizes_of(config: Config) -> tuple:
    return config.model.latent_dim, tuple(config.model.hidden_dims)


def sizes_differ(configs: Sequence[Config]) -> bool:
    return len({sizes_of(config) for config in configs}) > 1


def size_free_items(config: Config) -> dict:
    """The config's flat items with the size keys reduced to what must still match: the depth."""
    flat = dict(config.flat())
    flat.pop("model.latent_dim", None)
    flat["model.hidden_dims"] = ("depth", len(config.model.hidden_dims))
    return flat


def widest(configs: Sequence[Config]) -> Config:
    """The first config with each size key at its largest over `configs` (widths per layer)."""
    wide = copy.deepcopy(configs[0])
    wide.model.latent_dim = max(config.model.latent_dim for config in configs)
    wide.model.hidden_dims = [max(widths) for widths in zip(*(config.model.hidden_dims for config in configs))]
    return wide


def describe_sizes(config: Config) -> str:
    """'latent_dim=64, hidden_dims=[512]': the sizes a padded batch's trials are held in."""
    return f"latent_dim={config.model.latent_dim}, hidden_dims={list(config.model.hidden_dims)}"


def loss_pads(config: Config) -> bool:
    """Whether the config's loss keeps padded latent dimensions inert: free bits would count each
    padded dimension's λ, the total correlation its marginal. Per trial: trials that differ here
    share a batch key, and `vae_lab.training.batching.plan_batches` keeps them to their own sizes."""
    return config.loss.free_bits == 0 and config.loss.tc_weight == 1


class Embedding:
    """Each trial's tensors inside the widest model's: per row and tensor name, the flat
    positions of the trial's entries (in its own tensor's order) and its own shape."""

    def __init__(self, models: Sequence[torch.nn.Module], wide: torch.nn.Module):
        wide_tensors = tensors_of(wide)
        self.wide_shapes = {name: tensor.shape for name, tensor in wide_tensors.items()}
        self.rows = []
        for model in models:
            own = tensors_of(model)
            if own.keys() != wide_tensors.keys():
                raise ValueError("a padded trial's model has other tensors than the widest one's")
            self.rows.append({name: (_flat_positions(model.positions_in(wide, name), self.wide_shapes[name]),
                                     tensor.shape) for name, tensor in own.items()})

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[row] for row in rows]

    def pad(self, row: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """A trial's tensor placed in a zero tensor of the widest model's shape."""
        positions, _ = self.rows[row][name]
        padded = value.new_zeros(self.wide_shapes[name])
        padded.view(-1)[positions.to(value.device)] = value.reshape(-1)
        return padded

    @torch.no_grad()
    def fill(self, row: int, model: torch.nn.Module, host: torch.nn.Module) -> None:
        """Set every tensor of `host` (a widest model) to trial `row`'s `model`, padded."""
        own = tensors_of(model)
        for name, tensor in tensors_of(host).items():
            tensor.copy_(self.pad(row, name, own[name].detach()))

    def unpad(self, row: int, name: str, padded: torch.Tensor) -> torch.Tensor:
        """A trial's own tensor, read out of its row of the widest model's."""
        positions, shape = self.rows[row][name]
        return padded.reshape(-1)[positions.to(padded.device)].view(shape)

    def mask(self, name: str, device) -> torch.Tensor:
        """[K, *wide shape]: 1 at each row's own entries, 0 at its padding."""
        mask = torch.zeros(len(self.rows), math.prod(self.wide_shapes[name]), device=device)
        for row, positions in enumerate(self.rows):
            mask[row, positions[name][0].to(device)] = 1.0
        return mask.view(len(self.rows), *self.wide_shapes[name])


def tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _flat_positions(per_dim: tuple[torch.Tensor, ...], wide_shape: torch.Size) -> torch.Tensor:
    """Flat indices into a tensor of `wide_shape` of the grid `per_dim` spans, row-major."""
    flat = torch.zeros((), dtype=torch.long)
    for index, size in zip(per_dim, wide_shape):
        if index.numel() and int(index.max()) >= size:
            raise ValueError("a padded trial's tensor does not fit in the widest model's")
        flat = flat.unsqueeze(-1) * size + index.long()
    return flat.reshape(-1)


# ----------------------------------------------------------------------------- grouping by size

def step_seconds(trials: int, flops: float, device_type: str, padded: bool = False) -> float:
    """One step's modelled seconds for `trials` stacked, the widest at `flops` per step
    (`STEP_COST`); `padded`: of several sizes."""
    cost = STEP_COST.get(device_type)
    if cost is None:  # an accelerator: a step costs its kernel launches, whatever the widths
        return 1.0
    if trials == 1:
        return cost["c0"] + cost["c1"] * flops
    return (cost["s0"] + trials * (cost["s2"] + cost["s1"] * flops)) * (PADDED_OVERHEAD if padded else 1.0)


def partition(flops: Sequence[float], device_type: str) -> list[list[int]]:
    """Indices into `flops` (each trial's forward FLOPs per image) grouped into batches that
    minimize the modelled time (`step_seconds`): the trials sorted widest first, each batch
    a run of them padded to its first. Equal sizes always share a batch."""
    order = sorted(range(len(flops)), key=lambda index: (-flops[index], index))
    sizes: list[list[int]] = []  # runs of equal FLOPs: never split
    for index in order:
        if sizes and flops[sizes[-1][0]] == flops[index]:
            sizes[-1].append(index)
        else:
            sizes.append([index])
    best = [0.0] + [math.inf] * len(sizes)  # best[j]: the first j sizes batched at least cost
    cut = [0] * (len(sizes) + 1)
    for stop in range(1, len(sizes) + 1):
        for start in range(stop):
            count = sum(len(run) for run in sizes[start:stop])
            seconds = best[start] + step_seconds(count, flops[sizes[start][0]], device_type, padded=stop - start > 1)
            if seconds < best[stop]:
                best[stop], cut[stop] = seconds, start
    batches, stop = [], len(sizes)
    while stop:
        start = cut[stop]
        batches.append(sorted(index for run in sizes[start:stop] for index in run))
        stop = start
    return sorted(batches)
