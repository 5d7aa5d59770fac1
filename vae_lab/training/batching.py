"""Which trials can train in one pass: `batch_key` (the one predicate) and `plan_batches`.

A study is usually many small models that differ only in a KL weight, a learning
rate or a seed. Trained one after another each leaves most of the machine idle;
`run.run_trials` trains K of them in one pass over the data:

    groups = plan_batches(configs, "auto")   # lists of indices into configs, one per batch

Configs train together when their `batch_key`s are equal: everything that shapes the
tensors or the data pass is the same (data, model, likelihood, epochs, batch size, amp,
device). They may differ in `PER_TRIAL_KEYS` (KL weight and warm-up, learning rate, seed,
gradient clipping, early-stopping patience) and in what only concerns one run (`tracking.*`,
`eval.*`, progress). The step that trains K stacked models with vmap is
`steps.StackedStep`; a trial in a batch reproduces its solo run up to floating-point
summation order (tests/test_batched.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Hashable, Sequence

import torch

from vae_lab.config import Config
from vae_lab.training.device import resolve_device
from vae_lab.data.datasets import image_shape_of
from vae_lab.models.components import build_model, probe_device
from vae_lab.training import padding
from vae_lab.training.steps import NoiseInput

# Config keys that may differ between trials trained together.
PER_TRIAL_KEYS = ("loss.kl_weight", "loss.kl_schedule", "loss.kl_warmup_steps", "loss.kl_cycles",
                  "loss.kl_cycle_ratio", "loss.free_bits", "loss.tc_weight", "train.lr", "train.seed", "train.grad_clip",
                  "train.early_stopping_patience")
# Keys that only concern one trial's run (logging, end-of-run evaluation, its progress bar).
PER_RUN_KEYS = ("train.progress", "train.checkpoint_every")
PER_RUN_SECTIONS = ("tracking.", "eval.")

DEFAULT_CAP = {"cpu": 16, "cuda": 64}
CPU_MEMORY_BUDGET = 2 * 2**30  # bytes one batch of trials may use on the CPU
CUDA_MEMORY_FRACTION = 0.5  # of the free GPU memory


# ----------------------------------------------------------------------------- grouping

def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def batch_key(config: Config) -> Hashable:
    """What must be equal for configs to train in one batch: everything but the per-trial keys,
    and but the sizes (`padding.SIZE_KEYS`, at one depth) where the family pads exactly."""
    items = padding.size_free_items(config) if pads(config) else config.flat()
    return tuple(sorted(
        (key, _hashable(value)) for key, value in items.items()
        if key not in PER_TRIAL_KEYS and key not in PER_RUN_KEYS
        and not key.startswith(PER_RUN_SECTIONS)
    ))


def pads(config: Config) -> bool:
    """Whether trials of this config's family and prior may differ in size within a batch (those
    whose loss does not allow it, `padding.loss_pads`, train at their own sizes)."""
    return config.prior.name == "standard_normal" and pads_exactly(config)


_pads_exactly: dict = {}


def pads_exactly(config: Config) -> bool:
    """Whether a model of this config's family, held in a wider one (`Embedding`), computes what
    it computes alone: the decoder's output and the posterior's statistics equal, the padded
    latent dimensions' KL exactly 0. Checked once per family and depth on the CPU, on small
    random inputs, without touching the global random state."""
    key = tuple(sorted((name, _hashable(value)) for name, value in config.flat().items()
                       if name.startswith(("model.", "prior.", "data.")) and name not in padding.SIZE_KEYS))
    if key not in _pads_exactly:
        small = copy.deepcopy(config)
        small.device = "cpu"
        small.model.latent_dim = 2
        small.model.hidden_dims = [3] * len(config.model.hidden_dims)
        wide = copy.deepcopy(small)
        wide.model.latent_dim = 5
        wide.model.hidden_dims = [7] * len(config.model.hidden_dims)
        try:
            _pads_exactly[key] = _same_outputs(small, wide, image_shape_of(config.data))
        except Exception:  # a family that cannot be built this small, or whose tensors do not nest
            _pads_exactly[key] = False
    return _pads_exactly[key]


def _same_outputs(small: Config, wide: Config, image_shape) -> bool:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        alone = build_model(small.model, image_shape, small.prior)
        host = build_model(wide.model, image_shape, wide.prior)
        padding.Embedding([alone], host).fill(0, alone, host)
        images = torch.rand(4, *image_shape)
        noise = torch.randn(4, small.model.latent_dim)
        padded_noise = torch.cat([noise, torch.zeros(4, wide.model.latent_dim - small.model.latent_dim)], dim=1)
        own = NoiseInput(alone.eval())(images, noise if alone.variational else None)
        padded = NoiseInput(host.eval())(images, padded_noise if host.variational else None)
    if len(own) != len(padded) or not torch.allclose(own[0], padded[0], rtol=1e-4, atol=1e-5):
        return False
    dims = small.model.latent_dim
    for mine, theirs in zip(own[1:], padded[1:]):
        if mine.shape[-1] != dims or not torch.allclose(mine, theirs[..., :dims], rtol=1e-4, atol=1e-5):
            return False
    if alone.variational and not bool((padded[3][..., dims:] == 0).all()):  # the padded dimensions' KL
        return False
    return True


def estimate_trial_bytes(config: Config) -> int:
    """A rough upper bound of one trial's memory in a batch: parameters with gradient and Adam
    state (x6: param, grad, clipped grad, two moments, headroom), plus every module's output for
    one batch (x3: forward, saved for backward, gradient), in float32."""
    image_shape = image_shape_of(config.data)
    outputs = []
    with _probing(config) as device:
        model = build_model(config.model, image_shape, config.prior)
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
        model(torch.zeros(config.train.batch_size, *image_shape, device=device))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return 4 * (6 * parameters + 3 * sum(outputs))


@contextlib.contextmanager
def _probing(config: Config):
    """Build and run a model's probe where `probe_device` says, without gradients or touching
    the global random state; yields the device."""
    device = probe_device(config.model, config.prior, image_shape_of(config.data))
    with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.device(device):
        yield device


CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_stacking_pays: dict = {}


def stacking_pays(config: Config) -> bool:
    """Whether trials of this shape train faster stacked (one vmapped step for K) than one after
    another on their device. Not on the CPU for a model with convolutions: torch runs vmapped
    convolutions 1.45x (K=3) to 1.53x (K=8) slower there than the K models one by one, while
    MLPs break even at K=3 and gain 1.38x at K=8 (benchmarks/RESULTS.md §0k)."""
    if resolve_device(config.device).type != "cpu":
        return True
    key = batch_key(config)
    if key not in _stacking_pays:
        with torch.device("meta"):  # the modules only, no operation
            model = build_model(config.model, image_shape_of(config.data), config.prior)
        _stacking_pays[key] = not any(isinstance(module, CONVOLUTIONS) for module in model.modules())
    return _stacking_pays[key]


def relative_cost(config: Config) -> float:
    """What training one trial of `config` costs next to the other points of a study, for
    ordering only: one image's forward FLOPs times its epochs and its training-images cap."""
    return forward_flops(config) * config.train.epochs * (config.data.train_limit or 1)


_forward_flops: dict = {}


def forward_flops(config: Config) -> float:
    """One image's forward FLOPs through the config's model (counted where `probe_device` says:
    on the meta device, no arithmetic, for large models)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (batch_key(config), padding.sizes_of(config))
    if key not in _forward_flops:
        image_shape = image_shape_of(config.data)
        with _probing(config) as device, FlopCounterMode(display=False) as counter:
            build_model(config.model, image_shape, config.prior)(torch.zeros(1, *image_shape, device=device))
        _forward_flops[key] = float(counter.get_total_flops())
    return _forward_flops[key]


def _memory_cap(config: Config, device: torch.device) -> int:
    per_trial = max(1, estimate_trial_bytes(config))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = CUDA_MEMORY_FRACTION * free
    else:
        budget = CPU_MEMORY_BUDGET
    return max(1, int(budget // per_trial))


def plan_batches(configs: Sequence[Config], max_batch: int | str = "auto") -> list[list[int]]:
    """Group configs that can train together; returns lists of indices into `configs`.

    `max_batch`: "off" (or 1) trains each config alone; an integer N caps a batch at N
    trials; "auto" caps it at 16 on the CPU, 64 on CUDA, and lower when the memory estimate
    of `estimate_trial_bytes` says so, and at 1 where stacking does not pay (`stacking_pays`).
    Under "auto", configs of different sizes (`pads`) are first split where padding them to one
    size would cost more than it saves (`padding.partition`); a cap N pads them anyway, as it
    stacks convolutions anyway. A group larger than the cap is split into batches of near-equal
    size. Batches keep the order in which their first config appears.
    """
    if max_batch == "off":
        max_batch = 1
    if not (max_batch == "auto" or (isinstance(max_batch, int) and not isinstance(max_batch, bool)
                                    and max_batch >= 1)):
        raise ValueError(f"max_batch must be 'auto', 'off' or a positive integer, got {max_batch!r}")
    groups: dict[Hashable, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(batch_key(config), []).append(index)
    parts = []
    for members in groups.values():
        group = [configs[index] for index in members]
        if padding.sizes_differ(group) and not all(padding.loss_pads(config) for config in group):
            by_size: dict = {}
            for index, config in zip(members, group):
                by_size.setdefault(padding.sizes_of(config), []).append(index)
            parts += by_size.values()
        elif max_batch == "auto" and padding.sizes_differ(group):
            device_type = resolve_device(group[0].device).type
            step_flops = [forward_flops(config) * config.train.batch_size for config in group]
            parts += [[members[index] for index in part] for part in padding.partition(step_flops, device_type)]
        else:
            parts.append(members)
    batches = []
    for members in sorted(parts):
        if max_batch == "auto":
            config = padding.widest([configs[index] for index in members])
            device = resolve_device(config.device)
            cap = 1 if not stacking_pays(config) else min(DEFAULT_CAP.get(device.type, DEFAULT_CAP["cpu"]),
                                                           _memory_cap(config, device))
        else:
            cap = max_batch
        count = math.ceil(len(members) / cap)
        size, extra = divmod(len(members), count)
        start = 0
        for part in range(count):
            stop = start + size + (1 if part < extra else 0)
            batches.append(members[start:stop])
            start = stop
    return batches
