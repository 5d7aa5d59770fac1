"""The one training loop: K >= 1 trials of one shape through one data pass per epoch.

Per epoch: one pass over the training data (`steps`: a plain autograd step for one model, a
vmapped one for K), train/* every `tracking.log_every_steps`, then val/* on the validation
split, the divergence check, early stopping and the trial's `on_epoch_end` (Optuna's
pruning). When a trial is done (its epochs, or early stopping) its best weights are restored
when early stopping is on, test/* is scored once at its last training step, and
`finalize.finalize_run` adds eval/*, images, latents and the model and ends the run FINISHED.

How a trial in a batch stays the trial it would be alone:
- its model is built right after `seed_everything(seed)`, so it starts from the same weights;
- its batches come from a CPU order generator seeded with `train.seed` and a device noise
  generator seeded with `train.seed + 1` that draws dynamic binarization (batch t) and then
  the reparameterization noise (step t); trials with equal seeds share one stream;
- Adam and gradient clipping are per trial (`steps`).
A trial that diverges (NaN/inf: FAILED), is pruned (KILLED), whose callback fails (FAILED)
or that stops early (FINISHED) leaves the batch: its run ends with its own status and the
others go on; `on_trial_end(index, outcome)` hears of it at once.

Checkpoints (`train.checkpoint_every`, `checkpoints`): at its checkpoint epochs and at its
last epoch a trial's whole state is saved to its run, and only then are the metrics buffered
since the previous checkpoint sent to the store.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from vae_lab import names
from vae_lab.config import Config
from vae_lab.data.datasets import ImageData
from vae_lab.evaluation import latent_evolution
from vae_lab.models.autoencoders import Autoencoder
from vae_lab.models.losses import kl_ramp, kl_weight_at, schedule_columns
from vae_lab.training.checkpoints import Checkpoint, save_checkpoint
from vae_lab.training.device import rebalance_threads
from vae_lab.training.finalize import end_of_run_stage, finalize_run
from vae_lab.interrupts import raise_if_lost
from vae_lab.training.scoring import (
    NOISE_SEED_OFFSET,
    ORDER_SEED_OFFSET,
    draw_noise,
    evaluate_split,
    gather,
    stream_slots,
)
from vae_lab.training.padding import sizes_differ
from vae_lab.training.steps import PaddedStep, PlainStep, StackedStep, loss_weights, plain_forward
from vae_lab.tracking.errors import StoreUnavailable
from vae_lab.training.trial import (
    ClaimLost,
    RunResult,
    Trial,
    TrialEndCallback,
    TrainingDiverged,
    check_finite,
    run_status_for,
)


class Engine:
    """K trials of one shape through one data pass per epoch."""

    def __init__(self, trials: list[Trial], data: ImageData, device: torch.device, stacked: bool, amp: bool,
                 on_trial_end: TrialEndCallback | None = None):
        self.trials = trials
        self.on_trial_end = on_trial_end
        self.data = data
        self.device = device
        self.config = trials[0].config  # the shared part (batching.batch_key) is the same in each
        self.amp = amp
        models = [trial.model for trial in trials]
        for trial in trials:
            trial.model = None  # the step holds the weights from here on
        self.variational = models[0].variational
        self.latent_dims = [model.latent_dim for model in models]  # per trial: they differ in a padded batch
        self.noise_dtype = torch.bfloat16 if self.amp else torch.float32
        configs = [trial.config for trial in trials]
        train_size = data.train_images.shape[0]
        if not stacked:
            self.step_impl = PlainStep(models[0], configs[0], device, self.amp, train_size)
        else:
            stacking = PaddedStep if sizes_differ(configs) else StackedStep
            self.step_impl = stacking(models, configs, device, self.amp, train_size)
        self.weights = loss_weights(configs, device)  # per trial: kl_weight (β once ramped up), free_bits, tc_weight
        self.total_steps = self.config.train.epochs * data.num_batches("train", self.config.train.batch_size)
        self.schedule = schedule_columns([config.loss for config in configs], self.total_steps, device)
        self.scheduled = any(config.loss.kl_schedule != "constant" for config in configs)
        self.progress = any(config.train.progress for config in configs)
        self.watching_claims = any(trial.spec.claim_lost is not None for trial in trials)
        self.step = 0
        checkpoints = [trial.checkpoint for trial in trials]
        if any(checkpoint is not None for checkpoint in checkpoints):
            self.step = checkpoints[0].step
            self.step_impl.load_optimizer_states([checkpoint.optimizer_state for checkpoint in checkpoints])

    @property
    def configs(self) -> list[Config]:
        return [trial.config for trial in self.trials]

    def kl_weights(self) -> torch.Tensor:
        """Each trial's β at this step (`losses.kl_ramp`, on the device without a host sync)."""
        if not self.scheduled:
            return self.weights["kl_weight"]
        return self.weights["kl_weight"] * kl_ramp(self.step, **self.schedule)

    # -- the epochs
    def run(self) -> None:
        config = self.config
        batch_size, epochs = config.train.batch_size, config.train.epochs
        # one data order and one noise stream per (seed, latent size), shared by the trials that
        # have both; a stream stops being drawn once its last trial has left (the others are unchanged)
        self.streams, self.slot = stream_slots(self.configs, self.latent_dims, self.device)
        order_generators = {key: torch.Generator().manual_seed(key[0] + ORDER_SEED_OFFSET) for key in self.streams}
        noise_generators = {key: torch.Generator(device=self.device).manual_seed(key[0] + NOISE_SEED_OFFSET)
                            for key in self.streams}
        self.order_generators, self.noise_generators = order_generators, noise_generators
        for row, trial in enumerate(self.trials):  # a resumed trial's streams go on
            checkpoint = trial.checkpoint
            if checkpoint is not None:
                order_generators[self._stream(row)].set_state(checkpoint.order_generator)
                noise_generators[self._stream(row)].set_state(checkpoint.noise_generator)
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
            streams = {key: self.data.batches("train", batch_size, shuffle=True, generator=order_generators[key],
                                              noise_generator=noise_generators[key]) for key in self.streams}
            bar = tqdm(range(steps_per_epoch), leave=False, dynamic_ncols=True,
                       desc=self._describe(f"epoch {epoch}/{epochs}"), disable=not self.progress)
            for _ in bar:
                raise_if_lost()
                if self.watching_claims:
                    running = self._drop(running, self._end_failed(self._lost_claims()))
                    if not self.trials:
                        bar.close()
                        return
                rebalance_threads()  # the CPUs of this machine's workers that ran out of trials
                images, images_dim = gather([next(streams[key])[0] for key in self.streams], self.slot)
                noise, noise_dim = draw_noise([noise_generators[key] for key in self.streams], self.streams, self.slot,
                                              images.shape[-4] * self.step_impl.objective.draws_per_image,
                                              self.variational, self.device, self.noise_dtype)
                running += self.step_impl.train_step(images, images_dim, noise, noise_dim,
                                                     {**self.weights, "kl_weight": self.kl_weights()})
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

    def _stream(self, row: int) -> tuple[int, int]:
        """The (seed, latent size) whose random streams the trial in `row` draws from."""
        return self.trials[row].config.train.seed, self.latent_dims[row]

    def _capture_frames(self) -> None:
        """The frame images' posterior means for each trial whose frame step this is."""
        rows = [row for row, trial in enumerate(self.trials) if latent_evolution.due(self.step, trial.config)]
        if not rows:
            return
        means = latent_evolution.capture(self.step_impl.encode_means, self.frame_images)
        for row in rows:  # a padded batch's trials: their own latent dimensions
            self.trials[row].latent_frames.append((self.step, means[row][:, :self.latent_dims[row]]))

    def _describe(self, what: str) -> str:
        """`what` (an epoch) said of the trials training it: by their runs' names (a study's
        trials are named by their swept values), or by their count when there are more than 3."""
        named = [trial.spec.run_name for trial in self.trials if trial.spec.run_name]
        if len(named) == len(self.trials) <= 3:
            return f"{', '.join(named)}: {what}"
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
                    step - 1, loss_cfg, self.total_steps)})
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
                                     self.latent_dims, self.device, self.noise_dtype)
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
        # sent no trial's metrics past its previous checkpoint (see vae_lab.study.trials.align_resumes)
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
        stream = self._stream(row)
        checkpoint = Checkpoint(
            epoch=trial.epochs_trained, step=self.step, sequence=trial.checkpoints_written,
            finished_training=trial.finished_training, model_state=self.step_impl.state(row),
            optimizer_state=self.step_impl.optimizer_state(row),
            order_generator=self.order_generators[stream].get_state(),
            noise_generator=self.noise_generators[stream].get_state(),
            best_val_loss=trial.best_val_loss, best_epoch=trial.best_epoch, best_state=trial.best_state,
            val=trial.val, last_train=trial.last_train, last_epoch=trial.last_epoch,
            pending_metrics=trial.tracker.pending())
        if trial.tracker.attempt(lambda: save_checkpoint(trial.tracker, checkpoint, trial.config), "a checkpoint"):
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

    def _lost_claims(self) -> dict[int, ClaimLost]:
        """The trials whose `claim_lost` gives a reason to stop now (keyed by id(trial))."""
        lost = {}
        for trial in self.trials:
            reason = trial.spec.claim_lost() if trial.spec.claim_lost is not None else None
            if reason:
                lost[id(trial)] = ClaimLost(f"{reason}; stopped at step {self.step}")
        return lost

    def _end_failed(self, failed: dict[int, BaseException]) -> set[int]:
        """End the runs of trials stopped by an error (keyed by id(trial)); returns those keys.
        A trial cut off from a store ends resumable: its retry continues from its checkpoint."""
        for trial in self.trials:
            error = failed.get(id(trial))
            if error is not None:
                trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}",
                                  resumable=isinstance(error, StoreUnavailable))
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
            self.weights = {name: column.index_select(0, index) for name, column in self.weights.items()}
            self.schedule = {name: column.index_select(0, index) for name, column in self.schedule.items()}
            self.latent_dims = [self.latent_dims[row] for row in rows]
            self.streams, self.slot = stream_slots(self.configs, self.latent_dims, self.device)
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
        with end_of_run_stage("test/*"):
            all_test = self._score_test(done, models)
        for trial, model, test in zip(done, models, all_test):
            try:
                outcome = self._finalize_trial(trial, model, test)
            except Exception as error:
                trial.tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
                outcome = error
            self._ended(trial, outcome)

    def _score_test(self, done: list[Trial], models: list[Autoencoder]) -> list[dict[str, float]]:
        """test/* of these trials: one shared pass when everyone left is done, else one each."""
        if len(done) == len(self.trials):
            return evaluate_split(self.step_impl.forward, self.data, "test", self.configs, self.variational,
                                  self.latent_dims, self.device, self.noise_dtype)
        return [evaluate_split(plain_forward(model, self.amp, self.device), self.data, "test", [trial.config],
                               self.variational, [model.latent_dim], self.device, self.noise_dtype)[0]
                for trial, model in zip(done, models)]

    def _finalize_trial(self, trial: Trial, model: Autoencoder, test: dict[str, float]) -> RunResult:
        check_finite(test, trial.last_step, trial.epochs_trained)
        summary = {**test, names.STOPPED_EPOCH: float(trial.epochs_trained)}
        if self.data.has_val:
            summary[names.BEST_EPOCH] = float(trial.best_epoch)
        if trial.patience and trial.best_epoch < trial.epochs_trained:
            summary.update(trial.val)  # the restored weights' val/* become the run's latest val values
        trial.tracker.log_metrics(summary, trial.last_step)
        stopped_early = trial.epochs_trained < trial.config.train.epochs
        trial.tracker.log_tags({names.STOP_REASON_TAG: "early_stopping" if stopped_early else "epochs"})
        metrics = {**trial.last_train, **trial.last_epoch, **trial.val, **summary}
        frames = (trial.latent_frames, self.frame_labels) if trial.latent_frames else None
        metrics = finalize_run(model, self.data, trial.config, self.device, trial.tracker, metrics, frames)
        return RunResult(metrics=metrics, run_id=trial.tracker.run_id, model=model)
