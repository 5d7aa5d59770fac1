"""The one training loop, for K >= 1 models: a single run is a batch of one.

    results = train_group(configs, data=data, parent_run_id=parent, run_names=names,
                          tags=[{...}, ...], on_epoch_end=[callback_or_None, ...])
    # -> one RunResult (or the exception that stopped it) per config, in order

Each model is one trial with its own MLflow run. Per epoch: one pass over the training
data (`vae_lab.steps`: a plain autograd step for one model, a vmapped one for K), train/*
every `tracking.log_every_steps`, then val/* on the validation split, the divergence check,
early stopping and the trial's `on_epoch_end` (Optuna's pruning). When a trial is done
(its epochs, or early stopping) its best weights are restored when early stopping is on,
test/* is scored once at its last training step, and `finalize_run` adds eval/*, images,
latents and the model and ends the run FINISHED.

How a trial in a batch stays the trial it would be alone:
- its model is built right after `seed_everything(seed)`, so it starts from the same weights;
- its batches come from a CPU order generator seeded with `train.seed` and a device noise
  generator seeded with `train.seed + 1` that draws dynamic binarization (batch t) and then
  the reparameterization noise (step t); trials with equal seeds share one stream;
- Adam and gradient clipping are per trial (`vae_lab.steps`).
A trial that diverges (NaN/inf: FAILED), is pruned (KILLED), whose callback fails (FAILED)
or that stops early (FINISHED) leaves the batch: its run ends with its own status and the
others go on; `on_trial_end(index, outcome)` hears of it at once. KeyboardInterrupt ends every
open run KILLED and is re-raised. An error of the shared pass itself (out of memory, a bug)
ends every open run FAILED and is returned for each.

Checkpoints (`train.checkpoint_every`, `vae_lab.checkpoints`): at its checkpoint epochs and at its
last epoch a trial's whole state is saved to its run, and only then are the metrics buffered
since the previous checkpoint sent to the store. `resume=[Resume(run_id, checkpoint), ...]`
continues those runs from there; trials trained together resume from one epoch.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import latent_evolution, names
from .config import Config, ConfigError
from .data import ImageData
from .losses import kl_to_standard_normal, kl_weight_at, reconstruction_nll
from .checkpoints import Checkpoint, Resume, save_checkpoint
from .models import Autoencoder, Posterior, build_model
from .steps import PlainStep, StackedStep, plain_forward

EVAL_BATCH_SIZE = 1000
ORDER_SEED_OFFSET, NOISE_SEED_OFFSET, EVAL_NOISE_SEED_OFFSET = 0, 1, 1_000_003

EpochCallback = Callable[[int, dict[str, float]], None]
TrialEndCallback = Callable[[int, Any], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    metrics: dict[str, float]
    run_id: str | None
    model: Autoencoder = field(repr=False)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no usable CUDA GPU; use device=auto or device=cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_status_for(error: BaseException) -> str:
    """MLflow status for a run stopped by `error`: interrupted or pruned runs, and runs cut off
    from their store (resumable), are KILLED."""
    if isinstance(error, KeyboardInterrupt) or type(error).__name__ in ("TrialPruned", "StoreUnavailable"):
        return "KILLED"
    return "FAILED"


def check_finite(values: dict[str, float], step: int, epoch: int) -> None:
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        name, value = next(iter(bad.items()))
        raise TrainingDiverged(
            f"training diverged: {name} is {value} at step {step} (epoch {epoch}); "
            "try a lower train.lr, train.grad_clip>0 or loss.kl_warmup_steps>0"
        )


# ----------------------------------------------------------------------------- bf16

_warned_amp: set[str] = set()


def cpu_has_native_bf16() -> bool | None:
    """True/False from the CPU's flags (AVX-512 BF16, AMX, Arm BF16); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def effective_amp(requested: bool, device: torch.device) -> bool:
    """`train.amp` as it will run. On a CPU without native bf16, autocast emulates bf16 and an
    epoch was measured 7.8x slower (AVX2, 784-400-20 VAE): fall back to fp32 with a warning."""
    if not requested:
        return False
    if device.type == "cpu" and cpu_has_native_bf16() is False:
        if "cpu" not in _warned_amp:
            _warned_amp.add("cpu")
            warnings.warn("train.amp=true ignored: this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                          "where bf16 autocast was measured 7.8x slower than fp32; training in fp32",
                          RuntimeWarning, stacklevel=2)
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:  # bf16 is emulated before Ampere
        if "cuda" not in _warned_amp:
            _warned_amp.add("cuda")
            warnings.warn("train.amp=true ignored: this GPU has no bf16; training in fp32",
                          RuntimeWarning, stacklevel=2)
        return False
    return True


# ----------------------------------------------------------------------------- one trial

@dataclass
class Trial:
    """One model's run through the engine, and its early-stopping state."""

    index: int  # position in the caller's list
    config: Config
    tracker: Any = None
    on_epoch_end: EpochCallback | None = None
    running_count: int = 0  # images summed in the engine's running sums since the last log
    last_train: dict[str, float] = field(default_factory=dict)
    last_epoch: dict[str, float] = field(default_factory=dict)  # throughput of the last epoch
    val: dict[str, float] = field(default_factory=dict)  # val/* of the weights it will keep
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # kept only under early stopping
    epochs_trained: int = 0
    last_step: int = 0
    finished_training: bool = False  # what is left is test/*, eval/*, artifacts
    checkpoints_written: int = 0
    outcome: Any = None  # RunResult or the exception that stopped it
    latent_frames: list = field(default_factory=list)  # (step, posterior means) for latents/evolution.gif

    @property
    def patience(self) -> int:
        return self.config.train.early_stopping_patience

    def restore(self, checkpoint: Checkpoint, device: torch.device) -> None:
        """Take up the early-stopping state and counters a checkpoint recorded."""
        self.epochs_trained, self.last_step = checkpoint.epoch, checkpoint.step
        self.finished_training = checkpoint.finished_training
        self.checkpoints_written = checkpoint.sequence + 1
        self.best_val_loss, self.best_epoch = checkpoint.best_val_loss, checkpoint.best_epoch
        self.best_state = None if checkpoint.best_state is None else {
            name: value.to(device) for name, value in checkpoint.best_state.items()}
        self.val, self.last_train, self.last_epoch = checkpoint.val, checkpoint.last_train, checkpoint.last_epoch

    def end_of_epoch(self, epoch: int, step: int, val: dict[str, float], state_of: Callable[[], dict]) -> bool:
        """Record the epoch; True when early stopping says this trial is done."""
        self.epochs_trained, self.last_step = epoch, step
        loss = val.get(names.VAL_LOSS)
        if loss is None:  # no validation split: the last epoch is kept
            self.best_epoch = epoch
            return False
        if loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = loss, epoch
            if self.patience:
                self.best_state, self.val = state_of(), dict(val)
        if not self.patience:
            self.val = dict(val)
            return False
        return epoch - self.best_epoch >= self.patience


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_split(forward, data: ImageData, split: str, configs: list[Config], variational: bool,
                   latent_dim: int, device: torch.device, noise_dtype=torch.float32) -> list[dict[str, float]]:
    """`split`/* of K models at once, per image in nats, from one posterior sample per image.

    `forward(images, noise, noise_dim)` gives (logits, mean[, logvar]) with a leading K
    dimension. The images are the split's fixed pixels, shared by every trial; each trial's
    noise comes from a generator seeded with its `train.seed` (trials with one seed share it),
    reseeded on every call so every epoch is scored on the same draws.
    """
    seeds, slot = seed_slots(configs, device)
    generators = [torch.Generator(device=device).manual_seed(seed + EVAL_NOISE_SEED_OFFSET) for seed in seeds]
    loss = configs[0].loss  # the likelihood is part of the batch key: the same for every trial
    totals = torch.zeros(3, len(configs), dtype=torch.float64, device=device)
    count = 0
    for images, _ in data.batches(split, EVAL_BATCH_SIZE):
        noise, noise_dim = draw_noise(generators, slot, images.shape[0], latent_dim, variational, device, noise_dtype)
        logits, *stats = forward(images, noise, noise_dim)
        posterior = Posterior(stats[0], stats[1] if len(stats) > 1 else None)
        logits = logits.float()
        trials, batch = logits.shape[:2]
        targets = images.expand(trials, *images.shape)
        recon = reconstruction_nll(logits.flatten(0, 1), targets.flatten(0, 1), loss.likelihood,
                                   loss.gaussian_std).view(trials, batch)
        kl = kl_to_standard_normal(Posterior(posterior.mean.float(), None if posterior.logvar is None
                                             else posterior.logvar.float())).flatten(2).sum(dim=2)
        squared = (torch.sigmoid(logits) - targets).square().flatten(2).sum(dim=2)
        totals += torch.stack([recon.sum(1), kl.sum(1), squared.sum(1)]).double()
        count += batch
    recon_sums, kl_sums, squared_sums = totals.tolist()
    pixels = math.prod(data.image_shape)
    metrics = []
    for row, config in enumerate(configs):
        recon, kl = recon_sums[row] / count, kl_sums[row] / count
        values = {f"{split}/loss": recon + config.loss.kl_weight * kl, f"{split}/recon": recon,
                  f"{split}/mse_per_pixel": squared_sums[row] / (count * pixels)}
        if variational:
            values[f"{split}/kl"] = kl
            if config.likelihood_is_normalized:  # only then is recon + KL a bound on -log p(x)
                values[f"{split}/elbo"] = -(recon + kl)
        metrics.append(values)
    return metrics


def seed_slots(configs: list[Config], device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """The distinct seeds, and each trial's index into them (None when all share one)."""
    seeds = list(dict.fromkeys(config.train.seed for config in configs))
    if len(seeds) == 1:
        return seeds, None
    return seeds, torch.tensor([seeds.index(config.train.seed) for config in configs], device=device)


def gather(per_seed: list[torch.Tensor], slot: torch.Tensor | None):
    """(tensor, vmap in_dim): one shared tensor, or a [K, ...] stack of each trial's own."""
    if slot is None:
        return per_seed[0], None
    return torch.stack(per_seed).index_select(0, slot), 0


def draw_noise(generators, slot, batch: int, latent_dim: int, variational: bool, device, dtype):
    if not variational:  # an AE's reparameterize draws nothing
        return None, None
    return gather([torch.randn((batch, latent_dim), generator=generator, device=device, dtype=dtype)
                   for generator in generators], slot)


# ----------------------------------------------------------------------------- the loop

class Engine:
    """K trials of one shape through one data pass per epoch."""

    def __init__(self, trials: list[Trial], models: list[Autoencoder], data: ImageData,
                 device: torch.device, stacked: bool, amp: bool,
                 checkpoints: list[Checkpoint | None] | None = None,
                 on_trial_end: TrialEndCallback | None = None):
        self.trials = trials
        self.on_trial_end = on_trial_end
        self.data = data
        self.device = device
        self.config = trials[0].config  # the shared part (vae_lab.batched.batch_key) is the same in each
        self.amp = amp
        self.variational = models[0].variational
        self.latent_dim = models[0].latent_dim
        self.noise_dtype = torch.bfloat16 if self.amp else torch.float32
        configs = [trial.config for trial in trials]
        self.step_impl = (StackedStep(models, configs, device, self.amp) if stacked
                          else PlainStep(models[0], configs[0], device, self.amp))
        column = dict(dtype=torch.float32, device=device)
        self.kl_weight = torch.tensor([config.loss.kl_weight for config in configs], **column)
        self.warmup = torch.tensor([config.loss.kl_warmup_steps for config in configs], **column)
        self.warming = any(config.loss.kl_warmup_steps > 0 for config in configs)
        self.progress = any(config.train.progress for config in configs)
        self.step = 0
        self.checkpoints = checkpoints or [None] * len(trials)
        if any(checkpoint is not None for checkpoint in self.checkpoints):
            self.step = self.checkpoints[0].step
            self.step_impl.load_optimizer_states([checkpoint.optimizer_state for checkpoint in self.checkpoints])

    @property
    def configs(self) -> list[Config]:
        return [trial.config for trial in self.trials]

    def kl_weights(self) -> torch.Tensor:
        """Each trial's β at this step (`kl_weight_at`, on the device without a host sync)."""
        if not self.warming:
            return self.kl_weight
        ramp = torch.where(self.warmup > 0, (self.step / self.warmup.clamp(min=1)).clamp(max=1.0),
                           torch.ones_like(self.warmup))
        return self.kl_weight * ramp

    # -- the epochs
    def run(self) -> None:
        config = self.config
        batch_size, epochs = config.train.batch_size, config.train.epochs
        # one data order and one noise stream per seed, shared by the trials of that seed; a
        # seed's streams stop being drawn once its last trial has left (the others are unchanged)
        self.seeds, self.slot = seed_slots(self.configs, self.device)
        order_generators = {seed: torch.Generator().manual_seed(seed + ORDER_SEED_OFFSET) for seed in self.seeds}
        noise_generators = {seed: torch.Generator(device=self.device).manual_seed(seed + NOISE_SEED_OFFSET)
                            for seed in self.seeds}
        self.order_generators, self.noise_generators = order_generators, noise_generators
        for trial, checkpoint in zip(self.trials, self.checkpoints):  # a resumed seed's streams go on
            if checkpoint is not None:
                order_generators[trial.config.train.seed].set_state(checkpoint.order_generator)
                noise_generators[trial.config.train.seed].set_state(checkpoint.noise_generator)
        start_epoch = self.trials[0].epochs_trained
        trained = [trial for trial in self.trials if trial.finished_training]
        if trained:  # stopped after training, before its run finished: only the end is left
            self._finish(trained)
            self._drop(None, {id(trial) for trial in trained})
            if not self.trials:
                return
        steps_per_epoch = self.data.num_batches("train", batch_size)
        self.frame_images, self.frame_labels = latent_evolution.frame_images(self.data)
        self._capture_frames()  # where the latent codes start (or, resumed, where they were)
        for epoch in range(start_epoch + 1, epochs + 1):
            running = torch.zeros(len(self.trials), 3, device=self.device)
            for trial in self.trials:
                trial.running_count = 0
            started = time.perf_counter()
            streams = {seed: self.data.batches("train", batch_size, shuffle=True, generator=order_generators[seed],
                                               noise_generator=noise_generators[seed]) for seed in self.seeds}
            bar = tqdm(range(steps_per_epoch), leave=False, dynamic_ncols=True,
                       desc=self._describe(f"epoch {epoch}/{epochs}"), disable=not self.progress)
            for _ in bar:
                images, images_dim = gather([next(streams[seed])[0] for seed in self.seeds], self.slot)
                noise, noise_dim = draw_noise([noise_generators[seed] for seed in self.seeds], self.slot,
                                              images.shape[-4], self.latent_dim, self.variational, self.device,
                                              self.noise_dtype)
                running += self.step_impl.train_step(images, images_dim, noise, noise_dim, self.kl_weights())
                self.step += 1
                self._capture_frames()
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
            self._end_epoch(epoch, seconds, last=epoch == epochs)
            if not self.trials:
                return

    def _capture_frames(self) -> None:
        """The frame images' posterior means for each trial whose frame step this is."""
        rows = [row for row, trial in enumerate(self.trials) if latent_evolution.due(self.step, trial.config)]
        if not rows:
            return
        means = latent_evolution.capture(self.step_impl.forward, self.frame_images, self.latent_dim, self.variational)
        for row in rows:
            self.trials[row].latent_frames.append((self.step, means[row]))

    def _describe(self, what: str) -> str:
        return what if len(self.trials) == 1 else f"{len(self.trials)} trials, {what}"

    def _log_train(self, running: torch.Tensor, epoch: int, steps_per_epoch: int, bar) -> torch.Tensor:
        """Log train/* for the trials whose log step this is (one host sync); drop diverged ones."""
        step = self.step
        due = [row for row, trial in enumerate(self.trials)
               if step % trial.config.tracking.log_every_steps == 0 or step % steps_per_epoch == 0]
        if not due:
            return running
        sums = running.tolist()  # the one host sync
        failed, losses = {}, []
        for row in due:
            trial = self.trials[row]
            loss, recon, kl = (value / trial.running_count for value in sums[row])
            trial.running_count = 0
            logged = {names.TRAIN_LOSS: loss, names.TRAIN_RECON: recon}
            if self.variational:
                loss_cfg = trial.config.loss
                logged.update({names.TRAIN_KL: kl, names.TRAIN_KL_WEIGHT: kl_weight_at(
                    step - 1, loss_cfg.kl_weight, loss_cfg.kl_warmup_steps)})
            try:
                check_finite(logged, step, epoch)
            except TrainingDiverged as error:
                failed[id(trial)] = error
                continue
            trial.tracker.log_metrics(logged, step)
            trial.last_train = logged
            losses.append(loss)
        if losses:
            bar.set_postfix(loss=f"{losses[0]:.2f}" if len(losses) == 1 else f"{min(losses):.2f}..{max(losses):.2f}")
        running[torch.tensor(due, device=running.device)] = 0.0
        return self._drop(running, self._end_failed(failed))

    def _end_epoch(self, epoch: int, seconds: float, last: bool) -> None:
        """val/*, throughput and `epoch` for every trial; then divergence, early stopping, callbacks."""
        if self.data.has_val:
            all_val = evaluate_split(self.step_impl.forward, self.data, "val", self.configs, self.variational,
                                     self.latent_dim, self.device, self.noise_dtype)
        else:
            all_val = [{} for _ in self.trials]
        throughput = {names.IMAGES_PER_SEC: self.data.train_images.shape[0] / seconds,
                      names.EPOCH_SECONDS: seconds}
        failed, done, saved = {}, [], []
        for row, (trial, val) in enumerate(zip(self.trials, all_val)):
            try:
                check_finite(val, self.step, epoch)
            except TrainingDiverged as error:
                failed[id(trial)] = error
                continue
            trial.tracker.log_metrics({**val, **throughput, names.EPOCH: epoch}, self.step)
            trial.last_epoch = throughput
            stop = trial.end_of_epoch(epoch, self.step, val, lambda row=row: self.step_impl.state(row))
            if trial.on_epoch_end is not None:
                try:
                    trial.on_epoch_end(epoch, {**trial.last_train, **throughput, **val})
                except Exception as error:  # optuna.TrialPruned (KILLED) or a failing callback (FAILED)
                    failed[id(trial)] = error
                    continue
            trial.finished_training = stop or last
            saved.append((row, trial))
        # every checkpoint of the batch first, then the metrics: a process killed in between has
        # sent no trial's metrics past its previous checkpoint (see study_trials.align_resumes)
        may_send = {}
        for row, trial in saved:
            try:
                may_send[id(trial)] = self._checkpoint(row, trial)
            except Exception as error:  # the store stayed unreachable (tracking.StoreUnavailable)
                failed[id(trial)] = error
        for row, trial in saved:
            if id(trial) in failed:
                continue
            if may_send[id(trial)]:
                trial.tracker.attempt(trial.tracker.flush, "metrics")
            if trial.finished_training:
                done.append(trial)
        if self.progress:
            self._print_epoch(epoch, all_val, throughput)
        self._drop(None, self._end_failed(failed))
        self._finish(done)
        self._drop(None, {id(trial) for trial in done})

    def _checkpoint(self, row: int, trial: Trial) -> bool:
        """Whether the trial's buffered metrics may go to the store now: always without
        `train.checkpoint_every`; with it, at its checkpoint epochs and its last, once the
        checkpoint that re-sends them is saved."""
        every = trial.config.train.checkpoint_every
        if not every or trial.tracker.run_id is None:
            return True
        if trial.epochs_trained % every and not trial.finished_training:
            return False  # the metrics wait for the next checkpoint
        seed = trial.config.train.seed
        checkpoint = Checkpoint(
            epoch=trial.epochs_trained, step=self.step, sequence=trial.checkpoints_written,
            finished_training=trial.finished_training, model_state=self.step_impl.state(row),
            optimizer_state=self.step_impl.optimizer_state(row),
            order_generator=self.order_generators[seed].get_state(),
            noise_generator=self.noise_generators[seed].get_state(),
            best_val_loss=trial.best_val_loss, best_epoch=trial.best_epoch, best_state=trial.best_state,
            val=trial.val, last_train=trial.last_train, last_epoch=trial.last_epoch,
            pending_metrics=trial.tracker.pending())
        if trial.tracker.attempt(lambda: save_checkpoint(trial.tracker, checkpoint), "a checkpoint"):
            trial.checkpoints_written += 1
            return True
        return False

    def _print_epoch(self, epoch: int, all_val: list[dict], throughput: dict) -> None:
        losses = [val[names.VAL_LOSS] for val in all_val if math.isfinite(val.get(names.VAL_LOSS, math.nan))]
        if not losses:
            summary = "no validation split" if not self.data.has_val else "all diverged"
        elif len(all_val) == 1:
            summary = f"val/loss {losses[0]:.2f}  val/recon {all_val[0][names.VAL_RECON]:.2f}"
        else:
            summary = f"val/loss {min(losses):.2f}..{max(losses):.2f}"
        per_trial = " per trial" if len(all_val) > 1 else ""
        tqdm.write(f"{self._describe(f'epoch {epoch}/{self.config.train.epochs}')}  {summary}  "
                   f"{throughput[names.IMAGES_PER_SEC]:.0f} img/s{per_trial}")

    def _end_failed(self, failed: dict[int, BaseException]) -> set[int]:
        """End the runs of trials stopped by an error (keyed by id(trial)); returns those keys."""
        for trial in self.trials:
            error = failed.get(id(trial))
            if error is not None:
                trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
                self._ended(trial, error)
        return set(failed)

    def _ended(self, trial: Trial, outcome: Any) -> None:
        trial.outcome = outcome
        if self.on_trial_end is not None:
            self.on_trial_end(trial.index, outcome)

    def _drop(self, running: torch.Tensor | None, gone: set[int]):
        """Remove the trials `gone` (ids) from the stack, with their rows of every per-trial state."""
        if not gone:
            return running
        rows = [row for row, trial in enumerate(self.trials) if id(trial) not in gone]
        self.trials = [self.trials[row] for row in rows]
        if rows:
            index = torch.tensor(rows, device=self.device)
            self.step_impl.keep(rows)
            self.kl_weight, self.warmup = self.kl_weight.index_select(0, index), self.warmup.index_select(0, index)
            self.seeds, self.slot = seed_slots(self.configs, self.device)
        return None if running is None else running[rows]

    # -- the end of a trial
    def _finish(self, done: list[Trial]) -> None:
        """Restore kept weights, score test/* once, and finalize each of these trials' runs."""
        if not done:
            return
        rows = [self.trials.index(trial) for trial in done]
        for row, trial in zip(rows, done):
            if trial.best_state is not None and trial.best_epoch < trial.epochs_trained:
                self.step_impl.load_state(row, trial.best_state)
            trial.best_state = None
        models = [self.step_impl.model(row) for row in rows]
        if len(done) == len(self.trials):  # everyone left is done: one shared test pass
            all_test = evaluate_split(self.step_impl.forward, self.data, "test", self.configs, self.variational,
                                      self.latent_dim, self.device, self.noise_dtype)
        else:
            all_test = [evaluate_split(plain_forward(model, self.amp, self.device), self.data, "test",
                                       [trial.config], self.variational, self.latent_dim, self.device,
                                       self.noise_dtype)[0] for trial, model in zip(done, models)]
        for trial, model, test in zip(done, models, all_test):
            try:
                outcome = self._finalize_trial(trial, model, test)
            except Exception as error:
                trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
                outcome = error
            self._ended(trial, outcome)

    def _finalize_trial(self, trial: Trial, model: Autoencoder, test: dict[str, float]) -> RunResult:
        check_finite(test, trial.last_step, trial.epochs_trained)
        summary = {**test, names.STOPPED_EPOCH: float(trial.epochs_trained)}
        if self.data.has_val:
            summary[names.BEST_EPOCH] = float(trial.best_epoch)
        if trial.patience and trial.best_epoch < trial.epochs_trained:
            summary.update(trial.val)  # the restored weights' val/* become the run's latest val values
        trial.tracker.log_metrics(summary, trial.last_step)
        stopped_early = trial.epochs_trained < trial.config.train.epochs
        trial.tracker.set_tags({names.STOP_REASON_TAG: "early_stopping" if stopped_early else "epochs"})
        metrics = {**trial.last_train, **trial.last_epoch, **trial.val, **summary}
        frames = (trial.latent_frames, self.frame_labels) if trial.latent_frames else None
        metrics = finalize_run(model, self.data, trial.config, self.device, trial.tracker, metrics, frames)
        return RunResult(metrics=metrics, run_id=trial.tracker.run_id, model=model)


def finalize_run(model: Autoencoder, data: ImageData, config: Config, device: torch.device,
                 tracker, metrics: dict[str, float], latent_frames=None) -> dict[str, float]:
    """After training: evaluation metrics, artifacts, the model, and the run ended FINISHED.
    `latent_frames` ((step, means) list, labels) become latents/evolution.gif.
    Returns the metrics with the `eval/` ones added."""
    from .artifacts import write_run_artifacts
    from .evaluation import evaluate_model

    metrics = dict(metrics)
    evaluation = evaluate_model(model, data, config, device) if config.eval.enabled else None
    if evaluation is not None:
        metrics.update(evaluation.metrics)
        tracker.log_metrics(evaluation.metrics, step=0)
        tracker.set_tags(evaluation.tags)
    if config.tracking.enabled:
        with tempfile.TemporaryDirectory() as folder:
            write_run_artifacts(model, data, config, Path(folder), evaluation, images=config.tracking.log_images)
            if latent_frames is not None:
                latent_evolution.save_evolution(*latent_frames, Path(folder) / "latents" / "evolution.gif")
            tracker.log_artifacts(Path(folder))
        if config.tracking.log_model:
            tracker.finish_with_model(model)
    tracker.end("FINISHED")
    return metrics


# ----------------------------------------------------------------------------- entry point

def _per_trial(values, count: int, name: str) -> list:
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} must hold one entry per config ({count}), got {len(values)}")
    return values


def train_group(configs: list[Config], *, data: ImageData, device: torch.device,
                parent_run_id: str | None = None, run_names: list[str | None] | None = None,
                tags: list[dict[str, str] | None] | None = None,
                on_epoch_end: list[EpochCallback | None] | None = None,
                resume: list[Resume | None] | None = None,
                on_trial_end: TrialEndCallback | None = None,
                stacked: bool | None = None) -> list[RunResult | BaseException]:
    """Train `configs` (equal `vae_lab.batched.batch_key`s) in one pass; one MLflow run each.

    Returns, in the order of `configs`, a `RunResult` for each trial that finished, or the
    exception that stopped it; `on_trial_end(index, outcome)` is called as each one ends.
    `resume[i]` continues run `resume[i].run_id` from its checkpoint instead of starting a
    run (all resumed from the same epoch). `stacked` picks the step: by default a plain step
    for one config and a vmapped one for several (`stacked=True` with one config is the batch
    of one the tests compare with the plain step). KeyboardInterrupt ends every open run
    KILLED and is re-raised.
    """
    from .tracking import NullTracker, RunTracker

    configs = list(configs)
    if not configs:
        return []
    count = len(configs)
    run_names = _per_trial(run_names, count, "run_names")
    tags = _per_trial(tags, count, "tags")
    callbacks = _per_trial(on_epoch_end, count, "on_epoch_end")
    resumes = _per_trial(resume, count, "resume")
    if len({entry.epoch if entry else 0 for entry in resumes}) > 1:
        raise ValueError("trials trained together must resume from the same epoch")
    checkpoints = [entry.checkpoint if entry else None for entry in resumes]
    if data.train_images.shape[0] < configs[0].train.batch_size:
        raise ConfigError(f"train.batch_size={configs[0].train.batch_size} is larger than the "
                          f"{data.train_images.shape[0]} training images")
    if any(config.train.early_stopping_patience for config in configs) and not data.has_val:
        raise ConfigError("train.early_stopping_patience needs a validation split; set data.val_size")

    models = []
    for config, checkpoint in zip(configs, checkpoints):
        seed_everything(config.train.seed)
        models.append(build_model(config.model, data.image_shape).to(device))
        if checkpoint is not None:
            models[-1].load_state_dict(checkpoint.model_state)
    trials = [Trial(index, config, on_epoch_end=callback)
              for index, (config, callback) in enumerate(zip(configs, callbacks))]
    for trial, checkpoint in zip(trials, checkpoints):
        if checkpoint is not None:
            trial.restore(checkpoint, device)
    amp = effective_amp(configs[0].train.amp, device)
    try:
        try:
            for trial in trials:
                run_tags = {names.PRECISION_TAG: "bf16 autocast" if amp else "fp32", **(tags[trial.index] or {})}
                if count > 1:
                    run_tags[names.BATCHED_TRIALS_TAG] = str(count)
                entry = resumes[trial.index]
                if not trial.config.tracking.enabled:
                    trial.tracker = NullTracker()
                elif entry is not None:
                    trial.tracker = RunTracker.resume(trial.config, entry.run_id, run_tags,
                                                      checkpoints[trial.index])
                else:
                    trial.tracker = RunTracker.start(trial.config, device, parent_run_id, run_names[trial.index],
                                                     run_tags)
                    trial.tracker.log_datasets(data)
            by_lr = sorted(range(count), key=lambda index: configs[index].train.lr)  # see StackedStep
            engine = Engine([trials[index] for index in by_lr], [models[index] for index in by_lr], data, device,
                            stacked=count > 1 if stacked is None else stacked, amp=amp,
                            checkpoints=[checkpoints[index] for index in by_lr], on_trial_end=on_trial_end)
            del models
            engine.run()
        except Exception as error:  # the shared pass (or its setup) failed: every trial still open fails
            for trial in trials:
                if trial.outcome is None:
                    if trial.tracker is not None:
                        trial.tracker.end("FAILED", reason=f"{type(error).__name__}: {error}")
                    trial.outcome = error
                    if on_trial_end is not None:
                        on_trial_end(trial.index, error)
    except KeyboardInterrupt as error:
        for trial in trials:
            if trial.tracker is not None:
                trial.tracker.end("KILLED", reason=f"{type(error).__name__}: {error}", resumable=True)
        # the trials that ended before the interrupt keep their outcome (FINISHED runs, pruned)
        error.outcomes = [trial.outcome for trial in trials]
        raise
    return [trial.outcome for trial in trials]
