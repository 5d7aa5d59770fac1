"""Train many same-shaped trials in one pass: stacked parameters, one vmapped step.

A study is usually many small models that differ only in a KL weight, a learning
rate or a seed. Trained one after another each leaves most of the machine idle;
here K of them share one pass over the data:

    results = train_batch(configs, data=data, parent_run_id=parent, run_names=names,
                          tags=[{"vae_lab.trial_number": "3"}, ...],
                          on_epoch_end=[callback_or_None, ...])
    # -> one RunResult (or the exception that stopped it) per config, in order

    groups = plan_batches(configs, "auto")   # lists of indices into configs, one per batch

Configs train together when their `batch_key`s are equal: everything that shapes the
tensors or the data pass is the same (data, model, likelihood, epochs, batch size, amp,
device). They may differ in `PER_TRIAL_KEYS` (KL weight and warm-up, learning rate, seed,
gradient clipping) and in what only concerns one run (`tracking.*`, `eval.*`, progress).

How a trial stays the trial it would be alone (`vae_lab.train.train`):
- its model is built right after `seed_everything(seed)`, so it starts from the same weights;
- its batches come from its own `data.batches(...)` iterator with a CPU order generator
  seeded with `train.seed` and a device noise generator seeded with `train.seed + 1`, and
  the reparameterization noise is drawn from that same noise generator in the same order
  (binarization of batch t, then the noise of step t), outside vmap, so every draw is the
  one `fit` makes. Trials with equal seeds share one iterator and one draw;
- Adam and gradient clipping are computed per trial (per row of the stacked parameters)
  with `torch.optim.Adam`'s and `clip_grad_norm_`'s arithmetic.
Only floating-point summation order differs (batched matmuls), so losses agree to
rounding at first and drift apart slowly; after a few epochs the test losses agree well
within 1% (tests/test_batched.py checks it).

Each trial keeps its own MLflow child run, logged exactly as `fit` logs (train/* every
`tracking.log_every_steps`, test/* + throughput + epoch at each epoch's end), and after the
pass each surviving trial is unstacked into a plain model and finished by
`vae_lab.train.finalize_run` (eval/*, images, latents, model). A trial whose loss turns
NaN/inf, or whose `on_epoch_end` raises (optuna.TrialPruned: KILLED, anything else: FAILED),
leaves the batch alone: its run ends with the reason, its slot is dropped from the stack,
and the others go on. A KeyboardInterrupt ends every open run KILLED and is re-raised.
An error of the shared pass itself (out of memory, a bug) ends every open run FAILED and
is returned for each of them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from tqdm.auto import tqdm

from .config import Config
from .data import ImageData
from .losses import kl_to_standard_normal, kl_weight_at, loss_terms, reconstruction_nll
from .models import Posterior, build_model
from .tracking import NullTracker, RunTracker
from .train import (EVAL_BATCH_SIZE, RunResult, _check_finite, autocast, finalize_run,
                    resolve_device, run_status_for, seed_everything)

# Config keys that may differ between trials trained together.
PER_TRIAL_KEYS = ("loss.kl_weight", "loss.kl_warmup_steps", "train.lr", "train.seed", "train.grad_clip")
# Keys that only concern one trial's run (logging, end-of-run evaluation, its progress bar).
PER_RUN_KEYS = ("train.progress",)
PER_RUN_SECTIONS = ("tracking.", "eval.")

DEFAULT_CAP = {"cpu": 16, "cuda": 64}
CPU_MEMORY_BUDGET = 2 * 2**30  # bytes one batch of trials may use on the CPU
CUDA_MEMORY_FRACTION = 0.5  # of the free GPU memory
CLIP_EPS = 1e-6  # clip_grad_norm_'s


# ----------------------------------------------------------------------------- grouping

def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def batch_key(config: Config) -> Hashable:
    """What must be equal for configs to train in one batch (everything but the per-trial keys)."""
    return tuple(sorted(
        (key, _hashable(value)) for key, value in config.flat().items()
        if key not in PER_TRIAL_KEYS and key not in PER_RUN_KEYS
        and not key.startswith(PER_RUN_SECTIONS)
    ))


def _image_shape(config: Config) -> tuple[int, int, int]:
    size = config.data.resize or (8 if config.data.name == "digits" else 28)
    return (config.data.channels, size, size)


def estimate_trial_bytes(config: Config) -> int:
    """A rough upper bound of one trial's memory in a batch: parameters with gradient and Adam
    state (x6: param, grad, clipped grad, two moments, headroom), plus every module's output for
    one batch (x3: forward, saved for backward, gradient), in float32."""
    image_shape = _image_shape(config)
    model = build_model(config.model, image_shape).to("meta")  # sizes only, no arithmetic
    with torch.device("meta"):
        outputs = []
        hooks = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
                 for module in model.modules() if not list(module.children())]
        model(torch.zeros(config.train.batch_size, *image_shape))
    for hook in hooks:
        hook.remove()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return 4 * (6 * parameters + 3 * sum(outputs))


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
    of `estimate_trial_bytes` says so. A group larger than the cap is split into batches of
    near-equal size. Groups keep the order in which their first config appears.
    """
    if max_batch == "off":
        max_batch = 1
    if not (max_batch == "auto" or (isinstance(max_batch, int) and not isinstance(max_batch, bool)
                                    and max_batch >= 1)):
        raise ValueError(f"max_batch must be 'auto', 'off' or a positive integer, got {max_batch!r}")
    groups: dict[Hashable, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(batch_key(config), []).append(index)
    batches = []
    for members in groups.values():
        if max_batch == "auto":
            config = configs[members[0]]
            device = resolve_device(config.device)
            cap = min(DEFAULT_CAP.get(device.type, DEFAULT_CAP["cpu"]), _memory_cap(config, device))
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


# ----------------------------------------------------------------------------- the stacked models

class _NoiseInput(nn.Module):
    """A model whose reparameterization noise is an input (drawn outside vmap, per trial)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, noise):
        posterior = self.model.encode(images)
        z = posterior.mean if posterior.logvar is None else posterior.mean + noise * posterior.std
        if posterior.logvar is None:
            return self.model.decode(z), posterior.mean
        return self.model.decode(z), posterior.mean, posterior.logvar


@dataclass
class _Trial:
    index: int  # position in the caller's list
    config: Config
    tracker: Any = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    running_count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class _StackedModels:
    """K models' parameters stacked along a new first dimension (`torch.func.stack_module_state`),
    with one Adam state, learning rate, clipping norm and KL schedule per trial (per row).

    The optimizer is `torch.optim.Adam` itself: one param group per trial whose params are
    that trial's rows of the stacked tensors, so each trial has its own lr and moments and the
    fused kernel updates all of them in a few calls.
    """

    def __init__(self, models: list[nn.Module], configs: list[Config], device: torch.device):
        params, buffers = stack_module_state(models)
        # "model." because the template wraps the model in _NoiseInput
        self.params = {f"model.{name}": value.detach() for name, value in params.items()}
        self.buffers = {f"model.{name}": value for name, value in buffers.items()}
        self.template = _NoiseInput(copy.deepcopy(models[0]).to("meta"))
        self.lrs = [config.train.lr for config in configs]
        self.optimizer = self._adam(self.lrs, states=None)
        column = dict(dtype=torch.float32, device=device)
        clips = [config.train.grad_clip for config in configs]
        self.clipping = any(clip > 0 for clip in clips)
        self.clip = torch.tensor([clip if clip > 0 else math.inf for clip in clips], **column)
        self.kl_weight = torch.tensor([config.loss.kl_weight for config in configs], **column)
        self.warmup = torch.tensor([config.loss.kl_warmup_steps for config in configs], **column)
        self.warming = any(config.loss.kl_warmup_steps > 0 for config in configs)

    def _adam(self, lrs: list[float], states: list[dict] | None) -> torch.optim.Optimizer:
        """One param group per run of equal learning rates: the rows [start:stop] of every
        stacked tensor (rows are ordered by lr, so a KL sweep is one group of whole tensors)."""
        groups, start = [], 0
        for lr in dict.fromkeys(lrs):
            stop = start + lrs.count(lr)
            groups.append({"params": [value[start:stop] for value in self.params.values()], "lr": lr})
            start = stop
        optimizer = torch.optim.Adam(groups, fused=True)
        if states is not None:  # carried over from the previous optimizer, already row-selected
            params = [param for group in optimizer.param_groups for param in group["params"]]
            for param, state in zip(params, states):
                optimizer.state[param] = state
        return optimizer

    def kl_weights(self, step: int) -> torch.Tensor:
        """Each row's β at `step` (kl_weight_at, on the device without a host sync)."""
        if not self.warming:
            return self.kl_weight
        ramp = torch.where(self.warmup > 0, (step / self.warmup.clamp(min=1)).clamp(max=1.0),
                           torch.ones_like(self.warmup))
        return self.kl_weight * ramp

    def adam_step(self, grads: dict[str, torch.Tensor]) -> None:
        """Per trial: clip_grad_norm_ (its total norm over all of the trial's tensors), then Adam."""
        stacked = [grads[name] for name in self.params]
        if self.clipping:
            norms = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(grad.flatten(1), dim=1) for grad in stacked]), dim=0)
            scale = (self.clip / (norms + CLIP_EPS)).clamp(max=1.0)
            stacked = [grad * scale.view(-1, *[1] * (grad.dim() - 1)) for grad in stacked]
        start = 0
        for group in self.optimizer.param_groups:
            stop = start + group["params"][0].shape[0]
            for param, grad in zip(group["params"], stacked):
                param.grad = grad[start:stop]
            start = stop
        self.optimizer.step()

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (trials that left the batch), Adam moments included."""
        index = torch.tensor(rows, device=self.clip.device)
        old_params = {name: value for name, value in self.params.items()}
        moments = {}  # per stacked tensor: its full-height exp_avg / exp_avg_sq / step
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = {name: torch.cat([self.optimizer.state[group["params"][position]][key]
                                             for group in self.optimizer.param_groups])
                            if self.optimizer.state else None
                            for position, name in enumerate(old_params)}
        step = next(iter(self.optimizer.state.values()))["step"] if self.optimizer.state else None
        self.params = {name: value.index_select(0, index) for name, value in self.params.items()}
        self.buffers = {name: value.index_select(0, index) for name, value in self.buffers.items()}
        self.lrs = [self.lrs[row] for row in rows]
        states = None
        if step is not None:
            states, start = [], 0
            for lr in dict.fromkeys(self.lrs):
                stop = start + self.lrs.count(lr)
                for name in self.params:
                    states.append({"step": step.clone(),
                                   **{key: moments[key][name].index_select(0, index)[start:stop].clone()
                                      for key in moments}})
                start = stop
        self.optimizer = self._adam(self.lrs, states)
        self.clip, self.kl_weight, self.warmup = (
            tensor.index_select(0, index) for tensor in (self.clip, self.kl_weight, self.warmup))

    def unstack(self, row: int, config: Config, image_shape, device: torch.device) -> nn.Module:
        """Trial `row` as a plain model of its own."""
        model = build_model(config.model, image_shape).to(device)
        state = {name.removeprefix("model."): value[row].clone()
                 for name, value in (*self.params.items(), *self.buffers.items())}
        model.load_state_dict(state)
        return model


# ----------------------------------------------------------------------------- one pass

class _BatchTrainer:
    """The shared loop: one data pass, one vmapped forward/backward per step for all trials."""

    def __init__(self, trials: list[_Trial], models: list[nn.Module], data: ImageData, device: torch.device):
        self.trials = trials
        self.data = data
        self.device = device
        self.stack = _StackedModels(models, [trial.config for trial in trials], device)
        config = trials[0].config
        self.config = config  # the shared part (batch_key) is the same in every trial
        self.variational = models[0].variational
        self.latent_dim = models[0].latent_dim
        self.noise_dtype = torch.bfloat16 if config.train.amp else torch.float32
        self.progress = any(trial.config.train.progress for trial in trials)
        self.failed: dict[int, BaseException] = {}  # trial index -> why it left the batch
        self.step = 0

    # -- per-seed streams: trials with one seed share one order, one binarization, one noise
    def _seeds(self) -> tuple[list[int], torch.Tensor | None]:
        seeds = list(dict.fromkeys(trial.config.train.seed for trial in self.trials))
        if len(seeds) == 1:
            return seeds, None
        slot = torch.tensor([seeds.index(trial.config.train.seed) for trial in self.trials], device=self.device)
        return seeds, slot

    @staticmethod
    def _gather(per_seed: list[torch.Tensor], slot: torch.Tensor | None):
        """(tensor, vmap in_dim): one shared tensor, or a [K, ...] stack of each trial's own."""
        if slot is None:
            return per_seed[0], None
        return torch.stack(per_seed).index_select(0, slot), 0

    def _draw_noise(self, generators, batch: int) -> list[torch.Tensor] | None:
        if not self.variational:
            return None  # an AE's reparameterize draws nothing
        return [torch.randn((batch, self.latent_dim), generator=generator, device=self.device,
                            dtype=self.noise_dtype) for generator in generators]

    def _forward(self, params, buffers, images, noise):
        """(logits, mean[, logvar]): vmap's outputs must be tensors, so no Posterior here."""
        with autocast(self.device, self.config.train.amp):
            return functional_call(self.stack.template, (params, buffers), (images, noise))

    def _train_step_fn(self):
        likelihood = self.config.loss.likelihood

        def trial_loss(params, buffers, images, noise, kl_weight):
            logits, *stats = self._forward(params, buffers, images, noise)
            posterior = Posterior(stats[0], stats[1] if len(stats) > 1 else None)
            terms = loss_terms(logits, images, posterior, likelihood, kl_weight)
            sums = torch.stack([terms.loss.detach() * images.shape[0],
                                terms.recon.detach().sum(), terms.kl.detach().sum()])
            return terms.loss, sums

        return grad_and_value(trial_loss, has_aux=True)

    def run(self) -> None:
        config = self.config
        batch_size, epochs = config.train.batch_size, config.train.epochs
        seeds, slot = self._seeds()
        order_generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        noise_generators = [torch.Generator(device=self.device).manual_seed(seed + 1) for seed in seeds]
        steps_per_epoch = self.data.num_batches("train", batch_size)
        step_fn = self._train_step_fn()

        for epoch in range(1, epochs + 1):
            running = torch.zeros(len(self.trials), 3, device=self.device)
            for trial in self.trials:
                trial.running_count = 0
            started = time.perf_counter()
            streams = [self.data.batches("train", batch_size, shuffle=True, generator=order,
                                         noise_generator=noise)
                       for order, noise in zip(order_generators, noise_generators)]
            bar = tqdm(zip(*streams), total=steps_per_epoch, leave=False, dynamic_ncols=True,
                       desc=f"{len(self.trials)} trials, epoch {epoch}/{epochs}", disable=not self.progress)
            for batches in bar:
                images, images_dim = self._gather([images for images, _ in batches], slot)
                noise = self._draw_noise(noise_generators, images.shape[-4])
                noise, noise_dim = self._gather(noise, slot) if noise is not None else (None, None)
                kl_weights = self.stack.kl_weights(self.step)
                grads, (_, sums) = vmap(step_fn, in_dims=(0, 0, images_dim, noise_dim, 0))(
                    self.stack.params, self.stack.buffers, images, noise, kl_weights)
                self.stack.adam_step(grads)
                self.step += 1
                running += sums
                for trial in self.trials:
                    trial.running_count += images.shape[-4]
                running = self._log_train(running, epoch, steps_per_epoch, bar)
                if not self.trials:
                    bar.close()
                    return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            bar.close()
            self._end_epoch(epoch, seconds)
            if not self.trials:
                return

    def _log_train(self, running: torch.Tensor, epoch: int, steps_per_epoch: int, bar) -> torch.Tensor:
        """Log train/* for the trials whose log step this is (one host sync); drop diverged ones."""
        step = self.step
        due = [row for row, trial in enumerate(self.trials)
               if step % trial.config.tracking.log_every_steps == 0 or step % steps_per_epoch == 0]
        if not due:
            return running
        sums = running.tolist()  # the one host sync
        leaving, logged_losses = [], []
        for row in due:
            trial = self.trials[row]
            loss, recon, kl = (value / trial.running_count for value in sums[row])
            trial.running_count = 0
            logged = {"train/loss": loss, "train/recon": recon}
            if self.variational:
                loss_cfg = trial.config.loss
                logged.update({"train/kl": kl,
                               "train/kl_weight": kl_weight_at(step - 1, loss_cfg.kl_weight,
                                                               loss_cfg.kl_warmup_steps)})
            try:
                _check_finite(logged, step, epoch)
            except Exception as error:  # TrainingDiverged
                leaving.append((row, error))
                continue
            trial.tracker.log_metrics(logged, step)
            logged_losses.append(loss)
        if logged_losses:
            bar.set_postfix(loss=f"{min(logged_losses):.2f}..{max(logged_losses):.2f}")
        running[torch.tensor(due, device=running.device)] = 0.0
        return self._leave(running, leaving)

    def _leave(self, running: torch.Tensor | None, leaving: list[tuple[int, BaseException]]):
        """End the runs of trials that stopped, and drop their rows from the stack."""
        if not leaving:
            return running
        for row, error in leaving:
            trial = self.trials[row]
            trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
            self.failed[trial.index] = error
        gone = {row for row, _ in leaving}
        rows = [row for row in range(len(self.trials)) if row not in gone]
        self.trials = [self.trials[row] for row in rows]
        if rows:
            self.stack.keep(rows)
        return None if running is None else running[rows]

    @torch.no_grad()
    def _test_metrics(self) -> list[dict[str, float]]:
        """`evaluate_test` for every trial at once, with each trial's own noise draws."""
        seeds, slot = self._seeds()
        generators = [torch.Generator(device=self.device).manual_seed(seed + 1_000_003) for seed in seeds]
        likelihood = self.config.loss.likelihood
        forward = vmap(self._forward, in_dims=(0, 0, 0 if slot is not None else None,
                                               0 if slot is not None and self.variational else None))
        totals = torch.zeros(3, len(self.trials), dtype=torch.float64, device=self.device)
        count = 0
        streams = [self.data.batches("test", EVAL_BATCH_SIZE, noise_generator=generator)
                   for generator in generators]
        for batches in zip(*streams):
            images, _ = self._gather([images for images, _ in batches], slot)
            noise = self._draw_noise(generators, images.shape[-4])
            noise, _ = self._gather(noise, slot) if noise is not None else (None, None)
            logits, *stats = forward(self.stack.params, self.stack.buffers, images, noise)
            posterior = Posterior(stats[0], stats[1] if len(stats) > 1 else None)
            logits = logits.float()
            trials, batch = logits.shape[:2]
            targets = images.expand(trials, *images.shape[-4:])
            recon = reconstruction_nll(logits.flatten(0, 1), targets.flatten(0, 1), likelihood).view(trials, batch)
            kl = kl_to_standard_normal(posterior).float().flatten(2).sum(dim=2)
            squared = (torch.sigmoid(logits) - targets).square().flatten(2).sum(dim=2)
            totals += torch.stack([recon.sum(1), kl.sum(1), squared.sum(1)]).double()
            count += batch
        recon_sums, kl_sums, squared_sums = totals.tolist()
        pixels = math.prod(self.data.image_shape)
        metrics = []
        for row, trial in enumerate(self.trials):
            recon, kl = recon_sums[row] / count, kl_sums[row] / count
            values = {"test/loss": recon + trial.config.loss.kl_weight * kl, "test/recon": recon,
                      "test/mse_per_pixel": squared_sums[row] / (count * pixels)}
            if self.variational:
                values.update({"test/kl": kl, "test/elbo": -(recon + kl)})
            metrics.append(values)
        return metrics

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        all_metrics = self._test_metrics()
        leaving = []
        for row, (trial, metrics) in enumerate(zip(self.trials, all_metrics)):
            try:
                _check_finite(metrics, self.step, epoch)
            except Exception as error:  # TrainingDiverged
                leaving.append((row, error))
                continue
            metrics["train/images_per_sec"] = self.data.train_images.shape[0] / seconds
            metrics["train/epoch_seconds"] = seconds
            trial.tracker.log_metrics({**metrics, "epoch": epoch}, self.step)
            trial.tracker.flush()
            trial.metrics = metrics
        if self.progress:
            losses = [metrics["test/loss"] for metrics in all_metrics if math.isfinite(metrics["test/loss"])]
            summary = f"test/loss {min(losses):.2f}..{max(losses):.2f}" if losses else "all diverged"
            tqdm.write(f"epoch {epoch}/{self.config.train.epochs}  {len(self.trials)} trials  {summary}  "
                       f"{self.data.train_images.shape[0] / seconds:.0f} img/s per trial")
        for row, trial in enumerate(self.trials):
            if trial.on_epoch_end is None or any(row == gone for gone, _ in leaving):
                continue
            try:
                trial.on_epoch_end(epoch, trial.metrics)
            except Exception as error:  # optuna.TrialPruned (KILLED) or a failing callback (FAILED)
                leaving.append((row, error))
        self._leave(None, leaving)


# ----------------------------------------------------------------------------- entry point

def _per_trial(values, count: int, name: str) -> list:
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} must hold one entry per config ({count}), got {len(values)}")
    return values


def train_batch(configs: list[Config], *, data: ImageData, parent_run_id: str | None = None,
                run_names: list[str | None] | None = None, tags: list[dict[str, str] | None] | None = None,
                on_epoch_end: list[Callable[[int, dict[str, float]], None] | None] | None = None,
                ) -> list[RunResult | BaseException]:
    """Train `configs` (equal `batch_key`s) together; one MLflow run and one result per config.

    Returns, in the order of `configs`, a `RunResult` for each trial that finished, or the
    exception that stopped it (TrainingDiverged, optuna.TrialPruned, a callback's error, an
    error of the shared pass). `run_names`, `tags` and `on_epoch_end` hold one entry (or None)
    per config, as `train(...)` takes them for one run; `data` is loaded by the caller once.
    KeyboardInterrupt ends every open run KILLED and is re-raised.
    """
    configs = list(configs)
    if not configs:
        return []
    keys = [batch_key(config) for config in configs]
    if any(key != keys[0] for key in keys):
        first = dict(keys[0])
        differing = sorted({name for key in keys for name, value in key if first.get(name, object()) != value})
        raise ValueError("train_batch needs configs that differ only in "
                         f"{', '.join(PER_TRIAL_KEYS)}; these differ too: {', '.join(differing)}")
    count = len(configs)
    run_names = _per_trial(run_names, count, "run_names")
    tags = _per_trial(tags, count, "tags")
    callbacks = _per_trial(on_epoch_end, count, "on_epoch_end")
    device = resolve_device(configs[0].device)

    models = []
    for config in configs:
        seed_everything(config.train.seed)
        models.append(build_model(config.model, data.image_shape).to(device))
    trials = [_Trial(index, config, on_epoch_end=callback)
              for index, (config, callback) in enumerate(zip(configs, callbacks))]
    results: list[RunResult | BaseException | None] = [None] * count
    try:
        for trial in trials:
            run_tags = {**(tags[trial.index] or {}), "vae_lab.batched_trials": str(count)}
            trial.tracker = (RunTracker.start(trial.config, device, parent_run_id, run_names[trial.index],
                                              run_tags)
                             if trial.config.tracking.enabled else NullTracker())
        by_lr = sorted(range(count), key=lambda index: configs[index].train.lr)  # see _StackedModels._adam
        trainer = _BatchTrainer([trials[index] for index in by_lr], [models[index] for index in by_lr],
                                data, device)
        del models
        try:
            trainer.run()
        except Exception as error:  # the shared pass failed: every trial still in it fails
            for trial in trainer.trials:
                trial.tracker.end("FAILED", reason=f"{type(error).__name__}: {error}")
                trainer.failed[trial.index] = error
            trainer.trials = []
        results_from_failures = dict(trainer.failed)
        for index, error in results_from_failures.items():
            results[index] = error
        for row, trial in enumerate(trainer.trials):
            try:
                model = trainer.stack.unstack(row, trial.config, data.image_shape, device)
                metrics = finalize_run(model, data, trial.config, device, trial.tracker, trial.metrics)
                results[trial.index] = RunResult(metrics=metrics, run_id=trial.tracker.run_id,
                                                 model=model.to(device))
            except Exception as error:
                trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
                results[trial.index] = error
    except KeyboardInterrupt as error:
        for trial in trials:
            if trial.tracker is not None:
                trial.tracker.end("KILLED", reason=f"{type(error).__name__}: {error}")
        raise
    return results
