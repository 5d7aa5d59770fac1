"""The one place where training one model and K models differ: the optimizer step.

Both steps hold K >= 1 trials' weights and optimizer state, and answer the same calls:

    sums = step.train_step(images, images_dim, noise, noise_dim, weights)   # [K, 3] sums of loss·B, recon, kl
    # weights: {"kl_weight", "free_bits", "tc_weight"}, a tensor of one value per trial each
    logits, mean, logvar = step.forward(images, noise, noise_dim)             # [K, B, ...], no grad
    means = step.encode_means(images)    # [K, B, D] posterior means, the encoders alone, no grad
    step.keep(rows)                      # drop trials that left
    state = step.state(row); step.load_state(row, state)   # a trial's weights (early stopping)
    moments = step.optimizer_state(row); step.load_optimizer_states([moments, ...])  # checkpoints
    model = step.model(row)              # a trial as a plain model of its own

- `PlainStep`: one model, plain autograd, fused Adam (`adam.FusedAdam`: `torch.optim.Adam(fused=True)`'s
  kernel and arithmetic), `clip_grad_norm_`.
- `StackedStep`: K same-shaped models stacked along a new first dimension
  (`torch.func.stack_module_state`), one `vmap`ped forward/backward per step, and the same
  fused Adam with one param group per learning rate over those rows, so each
  trial has its own learning rate and moments. Gradient clipping uses `clip_grad_norm_`'s
  arithmetic per trial. Only floating-point summation order differs from K `PlainStep`s.

The reparameterization noise is an input of both (drawn by the engine, per seed, outside
vmap), so a trial sees the same draws whichever step trains it.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from vae_lab.config import Config, LossConfig
from vae_lab.models.losses import loss_terms, total_correlation_mws
from vae_lab.models.priors import StandardNormal, gaussian_log_density, standard_normal_log_density
from vae_lab.models.autoencoders import Autoencoder
from vae_lab.models.components import build_model, build_objective
from vae_lab.models.objectives import Draws, Objective
from vae_lab.training.adam import FusedAdam
from vae_lab.training.padding import Embedding, widest

CLIP_EPS = 1e-6  # clip_grad_norm_'s
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _adam_state(state: dict, name: str, like: torch.Tensor) -> dict | None:
    """One tensor's fused-Adam state from a checkpoint's per-name moments; None for a tensor
    that had taken no step (a parameter the loss has not used: Adam keeps no state for it)."""
    if name not in state[ADAM_MOMENTS[0]]:
        return None
    step = state.get("steps", {}).get(name, state["step"])
    # each moment in its tensor's memory layout: the fused kernel pairs their entries in memory
    # order, and a stacked trial's moments may be stored transposed (`StackedStep._follow_gradient_layouts`)
    return {"step": torch.tensor(step, dtype=torch.float32, device=like.device),
            **{key: torch.empty_like(like, memory_format=torch.preserve_format).copy_(state[key][name])
               for key in ADAM_MOMENTS}}


def _named_adam_state(named_states: list[tuple[str, dict]], row=slice(None)) -> dict | None:
    """A checkpoint's optimizer state from (name, fused-Adam state) pairs of the tensors that
    have one: {"step": float, "exp_avg": {name: tensor}, "exp_avg_sq": {...}}, plus "steps":
    {name: float} for the tensors whose step differs from "step" (a parameter the loss uses only
    on some steps). A parameter the loss has not used has no entry, as in torch's Adam."""
    if not named_states:
        return None
    steps = {name: float(state["step"]) for name, state in named_states}
    step = max(steps.values())
    checkpoint = {"step": step, **{key: {name: state[key][row].detach().clone() for name, state in named_states}
                                   for key in ADAM_MOMENTS}}
    differing = {name: value for name, value in steps.items() if value != step}
    if differing:
        checkpoint["steps"] = differing
    return checkpoint


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast for the model's forward (`train.amp`); the losses stay in fp32."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class NoiseInput(nn.Module):
    """A model whose reparameterization noise is an input. Returns (logits, mean[, logvar,
    kl_terms, z]): tensors only, as vmap's outputs must be. `kl_terms` is the KL to the model's
    prior (`Autoencoder.kl_terms`): [B, D] analytic, or a [B, 1] estimate at the decoded z."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, noise):
        posterior = self.model.encode(images)
        if posterior.logvar is None:
            return self.model.decode(posterior.mean), posterior.mean
        z = posterior.sample(noise)
        return self.model.decode(z), posterior.mean, posterior.logvar, self.model.kl_terms(posterior, z), z


class PosteriorMean(nn.Module):
    """A model's posterior means, its encoder alone (its parameters named as in NoiseInput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode(images).mean


def plain_forward(model: Autoencoder, amp: bool, device: torch.device):
    """`forward(images, noise, noise_dim)` of one plain model in eval mode, with a leading K = 1
    dimension: what `PlainStep.forward` and `vae_lab.training.scoring.evaluate_split` expect."""
    network = NoiseInput(model).eval()

    def forward(images, noise, noise_dim):
        with autocast(device, amp):
            return tuple(output.unsqueeze(0) for output in network(images, noise))
    return forward


LOSS_WEIGHTS = ("kl_weight", "free_bits", "tc_weight")  # per trial, a tensor each


def loss_weights(configs: list[Config], device) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([getattr(config.loss, name) for config in configs], dtype=torch.float32, device=device)
            for name in LOSS_WEIGHTS}


def _loss_and_sums(outputs, images, loss: LossConfig, weights: dict, tc_of: int | None,
                   analytic_kl: bool, objective: Objective):
    """The loss of one trial (`objective`'s) and its [loss·B, recon, kl] sums (recon and kl summed
    over every draw and divided by the draws per image: with the iwae objective, the ELBO's parts
    beside its bound). `tc_of`: the training set's size when some trial of the step weighs the
    total correlation (else None: no TC term). `analytic_kl`: the prior is N(0, I) and the model's
    `kl_terms` its closed form (a draw's log q(z|x) - log p(z) is then computed here); otherwise
    they are that one-sample estimate already (`vae_lab.models.components.check` keeps other
    closed-form priors away from objectives that weigh single draws)."""
    logits, *stats = outputs
    kl_terms = stats[2] if len(stats) > 2 else None
    tc = None
    if tc_of is not None and len(stats) > 2:
        tc = total_correlation_mws(stats[3].float(), stats[0].float(), stats[1].float(), tc_of)
    terms = loss_terms(logits, images, kl_terms, loss.likelihood, weights["kl_weight"], loss.gaussian_std,
                       weights["free_bits"], tc, weights["tc_weight"])

    def log_ratio():
        if kl_terms is None:
            raise ValueError("an autoencoder has no log q(z|x) - log p(z)")
        if analytic_kl:
            z, mean, logvar = stats[3].float(), stats[0].float(), stats[1].float()
            return gaussian_log_density(z, mean, logvar) - standard_normal_log_density(z)
        return kl_terms.float().sum(-1)

    draws = objective.draws_per_image
    value = objective(Draws(terms.recon, terms.kl, terms.loss, draws, log_ratio), weights["kl_weight"])
    sums = torch.stack([value.detach() * (images.shape[0] // draws), terms.recon.detach().sum() / draws,
                        terms.kl.detach().sum() / draws])
    return value, sums


class PlainStep:
    """One model trained with autograd and fused Adam."""

    def __init__(self, model: Autoencoder, config: Config, device: torch.device, amp: bool = False,
                 train_size: int = 0):
        self.network = NoiseInput(model)
        self.config = config
        self.tc_of = train_size if config.loss.tc_weight != 1 else None
        self.analytic_kl = isinstance(model.prior, StandardNormal)
        self.objective = build_objective(config.loss)
        self.device = device
        self.amp = amp
        self.optimizer = FusedAdam([{"params": model.parameters(), "lr": config.train.lr}])

    @property
    def _model(self) -> Autoencoder:
        return self.network.model

    def train_step(self, images, images_dim, noise, noise_dim, weights: dict) -> torch.Tensor:
        self.network.train()
        images = self.objective.repeat(images)
        with autocast(self.device, self.amp):
            outputs = self.network(images, noise)
        loss, sums = _loss_and_sums(outputs, images, self.config.loss, {name: value[0] for name, value in weights.items()},
                                    self.tc_of, self.analytic_kl, self.objective)
        self.optimizer.zero_grad()
        loss.backward()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        return sums.unsqueeze(0)

    @torch.no_grad()
    def forward(self, images, noise, noise_dim):
        return plain_forward(self._model, self.amp, self.device)(images, noise, noise_dim)

    @torch.no_grad()
    def encode_means(self, images):
        self.network.eval()
        with autocast(self.device, self.amp):
            return self._model.encode(images).mean.unsqueeze(0)

    def keep(self, rows: list[int]) -> None:
        if rows != [0]:
            raise ValueError("a PlainStep holds one trial")

    def state(self, row: int) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self._model.state_dict().items()}

    def load_state(self, row: int, state: dict[str, torch.Tensor]) -> None:
        self._model.load_state_dict(state)

    def optimizer_state(self, row: int) -> dict | None:
        """The trial's Adam state by parameter name (None before its first step)."""
        return _named_adam_state([(name, self.optimizer.state[param]) for name, param in self._model.named_parameters()
                                  if param in self.optimizer.state])

    def load_optimizer_states(self, states: list[dict | None]) -> None:
        (state,) = states
        if state is None:
            return
        for name, param in self._model.named_parameters():
            adam = _adam_state(state, name, param)
            if adam is not None:
                self.optimizer.state[param] = adam

    def model(self, row: int) -> Autoencoder:
        return self._model


class StackedStep:
    """K same-shaped models trained together: stacked parameters, one vmapped step.

    Rows must be ordered by learning rate (the engine sorts them), so that a KL or seed
    sweep is one Adam param group of whole tensors.
    """

    def __init__(self, models: list[Autoencoder], configs: list[Config], device: torch.device, amp: bool = False,
                 train_size: int = 0):
        from torch.func import stack_module_state

        params, buffers = stack_module_state(models)
        # "model." because the template wraps the model in NoiseInput
        self.params = {f"model.{name}": value.detach() for name, value in params.items()}
        self.buffers = {f"model.{name}": value for name, value in buffers.items()}
        # what the model trains: a parameter its own code froze (requires_grad=False) stays as it is
        self.trainable = [f"model.{name}" for name, value in models[0].named_parameters() if value.requires_grad]
        self.aliases = aliases(models[0])
        self.template = NoiseInput(copy.deepcopy(models[0]).to("meta"))
        self.means_template = PosteriorMean(self.template.model)
        self.config = configs[0]  # the shared part (vae_lab.training.batching.batch_key) is the same in each
        self.configs = list(configs)
        self.device = device
        self.amp = amp
        self.lrs = [config.train.lr for config in configs]
        self.optimizer = self._adam(self.lrs, states=None)
        clips = [config.train.grad_clip for config in configs]
        self.clipping = any(clip > 0 for clip in clips)
        self.clip = torch.tensor([clip if clip > 0 else math.inf for clip in clips],
                                 dtype=torch.float32, device=device)
        self.tc_of = train_size if any(config.loss.tc_weight != 1 for config in configs) else None
        self.analytic_kl = isinstance(models[0].prior, StandardNormal)  # the prior is part of the batch key
        self.objective = build_objective(self.config.loss)  # so is the objective

    def _adam(self, lrs: list[float], states: list[dict] | None) -> FusedAdam:
        """One param group per run of equal learning rates: the rows [start:stop] of every
        stacked tensor."""
        groups, start = [], 0
        for lr in dict.fromkeys(lrs):
            stop = start + lrs.count(lr)
            groups.append({"params": [value[start:stop] for value in self.params.values()], "lr": lr})
            start = stop
        optimizer = FusedAdam(groups)
        if states is not None:  # carried over from the previous optimizer, already row-selected
            params = [param for group in optimizer.param_groups for param in group["params"]]
            for param, state in zip(params, states):
                if state is not None:  # None: a tensor that has taken no step
                    optimizer.state[param] = state
        return optimizer

    def _forward(self, params, buffers, images, noise):
        from torch.func import functional_call

        with autocast(self.device, self.amp):
            return functional_call(self.template, (params, buffers), (images, noise))

    def _trial_loss(self, params, buffers, images, noise, weights):
        """One trial's loss and its [loss·B, recon, kl] sums (`_loss_and_sums`), vmapped over trials."""
        images = self.objective.repeat(images)
        return _loss_and_sums(self._forward(params, buffers, images, noise), images, self.config.loss, weights,
                              self.tc_of, self.analytic_kl, self.objective)

    def train_step(self, images, images_dim, noise, noise_dim, weights: dict) -> torch.Tensor:
        """The K trials' losses in one vmapped forward, then one plain backward of their sum: the
        trials share no weight, so each stacked row's gradient is its own trial's. (torch.func's
        grad would do the same under vmap, and imports torch._dynamo on its first call: 1.6 s.)"""
        from torch.func import vmap

        # the same storage; a frozen parameter is no leaf to differentiate
        leaves = {name: value.detach() for name, value in self.params.items()}
        for name in self.trainable:
            leaves[name].requires_grad_()
        values, sums = vmap(self._trial_loss, in_dims=(0, 0, images_dim, noise_dim, 0))(
            leaves, self.buffers, images, noise, weights)
        # the gradients as backward lays them out (`.backward()` would copy each into its
        # parameter's layout first: `_follow_gradient_layouts`); None for a frozen parameter and
        # for one the loss does not use, which Adam then leaves alone, as it does alone (`.grad` None)
        grads = dict.fromkeys(leaves)
        grads.update(zip(self.trainable, torch.autograd.grad(
            values.sum(), [leaves[name] for name in self.trainable], allow_unused=True)))
        self._follow_gradient_layouts(grads)
        self._adam_step(grads)
        return sums

    def _follow_gradient_layouts(self, grads: dict[str, torch.Tensor]) -> None:
        """Move each stacked tensor whose gradient comes in another dense layout, with its Adam
        moments, into that layout. A vmapped linear layer's weight gradient comes transposed
        ([K, out, in] stored as [K, in, out]); once its weight is stored that way too, no step
        copies a gradient (a 784 x 256 weight's transposing copy was about 20% of a 3-trial MLP
        step). A gradient in a layout no tensor can share (overlapping, or with gaps) is left
        as it is: `FusedAdam` copies it into its tensor's layout."""
        moved = {}
        for name, grad in grads.items():
            if grad is None or grad.stride() == self.params[name].stride():
                continue
            like = torch.empty_like(grad, memory_format=torch.preserve_format)  # the grad's layout, if dense
            if like.stride() == grad.stride():
                moved[name] = like
        if moved:
            self._move_params(moved)

    @torch.no_grad()
    def _move_params(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy the named stacked tensors, and their Adam moments, into `targets`' layouts."""
        states = None
        if self.optimizer.state:  # a resumed or narrowed (`keep`) stack: its moments move too
            states, start = [], 0
            for group in self.optimizer.param_groups:
                stop = start + group["params"][0].shape[0]
                for name, param in zip(self.params, group["params"]):
                    if param not in self.optimizer.state:  # it has taken no step
                        states.append(None)
                        continue
                    state = dict(self.optimizer.state[param])
                    if name in targets:
                        for key in ADAM_MOMENTS:
                            state[key] = torch.empty_like(targets[name][start:stop],
                                                          memory_format=torch.preserve_format).copy_(state[key])
                    states.append(state)
                start = stop
        for name, target in targets.items():
            self.params[name] = target.copy_(self.params[name])
        self.optimizer = self._adam(self.lrs, states)

    def _adam_step(self, grads: dict[str, torch.Tensor]) -> None:
        """Per trial: clip_grad_norm_ (its total norm over all of the trial's tensors), then Adam."""
        stacked = [grads[name] for name in self.params]
        if self.clipping:
            norms = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(grad.flatten(1), dim=1) for grad in stacked if grad is not None]), dim=0)
            scale = (self.clip / (norms + CLIP_EPS)).clamp(max=1.0)
            stacked = [None if grad is None else grad * scale.view(-1, *[1] * (grad.dim() - 1)) for grad in stacked]
        start = 0
        for group in self.optimizer.param_groups:
            stop = start + group["params"][0].shape[0]
            for param, grad in zip(group["params"], stacked):
                param.grad = None if grad is None else grad[start:stop]
            start = stop
        self.optimizer.step()

    @torch.no_grad()
    def forward(self, images, noise, noise_dim):
        from torch.func import vmap

        images_dim = None if images.dim() == 4 else 0
        return vmap(self._forward, in_dims=(0, 0, images_dim, noise_dim))(
            self.params, self.buffers, images, noise)

    @torch.no_grad()
    def encode_means(self, images):
        from torch.func import functional_call, vmap

        def means(params, buffers, images):
            with autocast(self.device, self.amp):
                return functional_call(self.means_template, (params, buffers), (images,))
        return vmap(means, in_dims=(0, 0, None))(self.params, self.buffers, images)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (trials that left), Adam moments included."""
        index = torch.tensor(rows, device=self.clip.device)
        # per stacked tensor that has taken a step (every group's rows of it have: they share
        # their tensors' use): its step and full-height exp_avg / exp_avg_sq
        first_group = self.optimizer.param_groups[0]["params"]
        stepped = {name: position for position, name in enumerate(self.params)
                   if first_group[position] in self.optimizer.state}
        moments = {name: {"step": self.optimizer.state[first_group[position]]["step"],
                          **{key: torch.cat([self.optimizer.state[group["params"][position]][key]
                                             for group in self.optimizer.param_groups]) for key in ADAM_MOMENTS}}
                   for name, position in stepped.items()}
        self.params = {name: value.index_select(0, index) for name, value in self.params.items()}
        self.buffers = {name: value.index_select(0, index) for name, value in self.buffers.items()}
        self.lrs = [self.lrs[row] for row in rows]
        self.configs = [self.configs[row] for row in rows]
        states = None
        if moments:
            states, start = [], 0
            for lr in dict.fromkeys(self.lrs):
                stop = start + self.lrs.count(lr)
                for name in self.params:
                    kept = moments.get(name)
                    states.append(None if kept is None else {
                        "step": kept["step"].clone(),
                        **{key: kept[key].index_select(0, index)[start:stop].clone() for key in ADAM_MOMENTS}})
                start = stop
        self.optimizer = self._adam(self.lrs, states)
        self.clip = self.clip.index_select(0, index)

    def state(self, row: int) -> dict[str, torch.Tensor]:
        """The trial's state dict, as its model's `state_dict()` names it (a tensor registered under
        two names, by a module assigned twice, under both)."""
        state = self._row_state(row)
        return {**state, **{alias: state[name] for alias, name in self.aliases.items()}}

    def _row_state(self, row: int) -> dict[str, torch.Tensor]:
        """The trial's tensors, each once (by its first name)."""
        return {name.removeprefix("model."): value[row].detach().clone()
                for name, value in (*self.params.items(), *self.buffers.items())}

    def _group_of(self, row: int) -> tuple[dict, int]:
        """The Adam param group holding `row`, and the row's position in it."""
        start = 0
        for group in self.optimizer.param_groups:
            stop = start + group["params"][0].shape[0]
            if row < stop:
                return group, row - start
            start = stop
        raise IndexError(row)

    def optimizer_state(self, row: int) -> dict | None:
        """The trial's Adam state by parameter name, as `PlainStep.optimizer_state` gives it."""
        group, offset = self._group_of(row)
        return _named_adam_state([(name.removeprefix("model."), self.optimizer.state[param])
                                  for name, param in zip(self.params, group["params"])
                                  if param in self.optimizer.state], offset)

    def load_optimizer_states(self, states: list[dict | None]) -> None:
        """Every row's Adam state at once (rows in order), before the first step."""
        if all(state is None for state in states):
            return
        if any(state is None for state in states) or len({state["step"] for state in states}) > 1:
            raise ValueError("trials stacked together must resume from the same step")
        merged, start = [], 0
        for lr in dict.fromkeys(self.lrs):
            stop = start + self.lrs.count(lr)
            for name, value in self.params.items():
                plain = name.removeprefix("model.")
                rows = [_adam_state(state, plain, value[0]) for state in states[start:stop]]
                if any(row is None for row in rows):  # a tensor that has taken no step
                    if any(row is not None for row in rows):
                        raise ValueError("trials stacked together must resume from the same step")
                    merged.append(None)
                    continue
                if len({float(row["step"]) for row in rows}) > 1:
                    raise ValueError("trials stacked together must resume from the same step")
                merged.append({"step": rows[0]["step"],
                               **{key: torch.stack([row[key] for row in rows]) for key in ADAM_MOMENTS}})
            start = stop
        self.optimizer = self._adam(self.lrs, merged)

    @torch.no_grad()
    def load_state(self, row: int, state: dict[str, torch.Tensor]) -> None:
        for name, value in (*self.params.items(), *self.buffers.items()):
            value[row].copy_(state[name.removeprefix("model.")])

    def model(self, row: int) -> Autoencoder:
        config = self.configs[row]
        model = build_model(config.model, tuple(self.template.model.image_shape), config.prior).to(self.device)
        model.load_state_dict(self.state(row))
        return model


class PaddedStep(StackedStep):
    """K trials of one family and different sizes (`vae_lab.training.padding`): a StackedStep
    over copies of the widest model, each holding its trial at the trial's positions and zeros
    elsewhere, with every gradient masked to the trial's own entries. What it hands out (state,
    optimizer state, models) has each trial's own shapes, as a PlainStep's would."""

    def __init__(self, models: list[Autoencoder], configs: list[Config], device: torch.device, amp: bool = False,
                 train_size: int = 0):
        wide_config = widest(configs)
        with torch.device("meta"):
            template = build_model(wide_config.model, tuple(models[0].image_shape), wide_config.prior)
        self.embedding = Embedding(models, template)
        hosts = []
        for row, model in enumerate(models):
            host = copy.deepcopy(template).to_empty(device=device)  # no initialization: every entry is set
            self.embedding.fill(row, model, host)
            hosts.append(host)
        super().__init__(hosts, configs, device, amp, train_size)
        self.masks = {f"model.{name}": self.embedding.mask(name, device) for name, _ in template.named_parameters()}

    def _adam_step(self, grads: dict[str, torch.Tensor]) -> None:
        super()._adam_step({name: None if grad is None else grad.mul_(self.masks[name]) for name, grad in grads.items()})

    def keep(self, rows: list[int]) -> None:
        super().keep(rows)
        self.embedding.keep(rows)
        index = torch.tensor(rows, device=self.clip.device)
        self.masks = {name: mask.index_select(0, index) for name, mask in self.masks.items()}

    def _row_state(self, row: int) -> dict[str, torch.Tensor]:
        return {name: self.embedding.unpad(row, name, value) for name, value in super()._row_state(row).items()}

    @torch.no_grad()
    def load_state(self, row: int, state: dict[str, torch.Tensor]) -> None:
        super().load_state(row, {name: self.embedding.pad(row, name, value) for name, value in state.items()
                                 if name not in self.aliases})

    def optimizer_state(self, row: int) -> dict | None:
        return _moments_mapped(super().optimizer_state(row), lambda name, value: self.embedding.unpad(row, name, value))

    def load_optimizer_states(self, states: list[dict | None]) -> None:
        super().load_optimizer_states([
            _moments_mapped(state, lambda name, value, row=row: self.embedding.pad(row, name, value))
            for row, state in enumerate(states)])


def aliases(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of each tensor the model registers under more than one name (a
    module assigned to two attributes): `named_parameters()` gives it once, `state_dict()` under each."""
    first, seconds = {}, {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        first_name = first.setdefault(id(tensor), name)
        if first_name != name:
            seconds[name] = first_name
    return seconds


def _moments_mapped(state: dict | None, change) -> dict | None:
    """An optimizer state (`PlainStep.optimizer_state`'s form) with `change(name, moment)` applied
    to each moment tensor."""
    if state is None:
        return None
    return {**state, **{key: {name: change(name, value) for name, value in state[key].items()}
                        for key in ADAM_MOMENTS}}
