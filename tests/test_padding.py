"""Trials of different sizes in one padded pass (vae_lab.training.padding, steps.PaddedStep):
each trial computes what it computes alone, hands out its own shapes, and sizes are grouped
only where the step-cost model says padding saves time."""

import itertools

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import TINY_RUN
from vae_lab import names
from vae_lab.config import build_config
from vae_lab.data.datasets import load_data
from vae_lab.models.autoencoders import MLPAutoencoder
from vae_lab.models.components import build_model
from vae_lab.train import train
from vae_lab.training import padding
from vae_lab.training.batching import batch_key, pads, plan_batches
from vae_lab.training.device import resolve_device
from vae_lab.training.run import run_trials
from vae_lab.training.steps import PaddedStep, PlainStep, loss_weights
from vae_lab.training.trial import TrialSpec

SOLO_MATCH = 1e-3
COMMON = [*TINY_RUN, "train.epochs=2", "data.binarize=dynamic"]
# sizes, seeds, KL weights, learning rates, clipping and a warm-up differ in one padded batch
SIZED_TRIALS = [
    ["model.hidden_dims=[64]", "model.latent_dim=4", "train.seed=0", "tracking.log_every_steps=3"],
    ["model.hidden_dims=[32]", "model.latent_dim=2", "train.seed=0", "loss.kl_weight=0.5", "train.lr=3e-3"],
    ["model.hidden_dims=[48]", "model.latent_dim=6", "train.seed=7", "train.grad_clip=5.0",
     "loss.kl_warmup_steps=10"],
    ["model.hidden_dims=[64]", "model.latent_dim=8", "train.seed=0"],
]


@pytest.fixture(scope="module")
def tiny_data():
    config = build_config(None, COMMON)
    return load_data(config.data, resolve_device(config.device), config.train.batch_size)  # where runs train


def test_trials_of_different_sizes_in_one_pass_match_alone(tracking_uri, tiny_data):
    configs = [build_config(None, [*COMMON, f"tracking.uri={tracking_uri}", *overrides]) for overrides in SIZED_TRIALS]
    assert len({batch_key(config) for config in configs}) == 1
    alone = [train(config, data=tiny_data) for config in configs]
    together = run_trials([TrialSpec(config) for config in configs], data=tiny_data)

    client = MlflowClient(tracking_uri)
    for config, single, batched in zip(configs, alone, together):
        assert not isinstance(batched, BaseException), batched
        assert set(batched.metrics) == set(single.metrics)
        for key in ("train/loss", "val/loss", "val/kl", "test/loss", "test/recon", "test/kl",
                    names.EVAL_ACTIVE_FRACTION):
            assert batched.metrics[key] == pytest.approx(single.metrics[key], rel=SOLO_MATCH), key
        own = single.model.state_dict()
        assert {name: value.shape for name, value in batched.model.state_dict().items()} == \
            {name: value.shape for name, value in own.items()}
        for name, value in batched.model.state_dict().items():
            torch.testing.assert_close(value, own[name], rtol=SOLO_MATCH, atol=1e-4)
        tags = client.get_run(batched.run_id).data.tags
        assert tags[names.BATCHED_TRIALS_TAG] == "4"
        assert tags[names.PADDED_TO_TAG] == "latent_dim=8, hidden_dims=[64]"
        assert names.PADDED_TO_TAG not in client.get_run(single.run_id).data.tags
        latents = {item.path for item in client.list_artifacts(batched.run_id, "latents")}
        assert latents == {item.path for item in client.list_artifacts(single.run_id, "latents")}
    # the trials differ (else matching alone would prove nothing)
    assert len({round(result.metrics["test/loss"], 3) for result in together}) == 4


@pytest.mark.parametrize("family", [["model.name=ae"], ["loss.objective=iwae", "loss.iwae_samples=3"],
                                    ["model.activation=gated", "model.hidden_dims=[16,24]"]])
def test_autoencoders_iwae_and_gated_layers_pad_exactly(tiny_data, family):
    common = [*COMMON, "tracking.enabled=false", "eval.enabled=false", *family]
    configs = [build_config(None, common),
               build_config(None, [*common, "model.latent_dim=2", "train.seed=3",
                                   "model.hidden_dims=" + ("[8,24]" if "gated" in family[0] else "[32]")])]
    assert pads(configs[0]) and padding.sizes_differ(configs)
    alone = [train(config, data=tiny_data).metrics for config in configs]
    together = [outcome.metrics for outcome in run_trials(map(TrialSpec, configs), data=tiny_data)]
    for single, batched in zip(alone, together):
        for key in ("train/loss", "val/loss", "test/loss"):
            assert batched[key] == pytest.approx(single[key], rel=SOLO_MATCH), key


class _LayerNormVAE(MLPAutoencoder):
    """A user's family whose hidden layer is normalized over its units: padded units would
    change the mean and variance, so it must not pad."""

    def __init__(self, image_shape, latent_dim, hidden_dims=(400,)):
        super().__init__(image_shape, latent_dim, hidden_dims)
        self.encoder.insert(1, nn.LayerNorm(hidden_dims[0]))


def test_what_pads_and_what_trains_by_shape():
    base = build_config(None, TINY_RUN)
    wider = build_config(None, [*TINY_RUN, "model.hidden_dims=[32]", "model.latent_dim=3"])
    assert pads(base) and batch_key(wider) == batch_key(base)
    assert batch_key(build_config(None, [*TINY_RUN, "model.hidden_dims=[32,32]"])) != batch_key(base)  # depth
    for refused in (["prior.name=mog"], ["model.name=conv_vae"], [f"model.name={__file__}:_LayerNormVAE"]):
        config = build_config(None, [*TINY_RUN, *refused])
        assert not pads(config), refused
        assert batch_key(build_config(None, [*TINY_RUN, *refused, "model.latent_dim=3"])) != batch_key(config)
    # free bits and the total correlation act on every latent dimension: such trials share the
    # batch key (it is per trial) but train at their own sizes
    for loss in ("loss.free_bits=0.5", "loss.tc_weight=6"):
        configs = [base, wider, build_config(None, [*TINY_RUN, loss]), build_config(None, [*TINY_RUN, loss])]
        assert len({batch_key(config) for config in configs}) == 1
        assert plan_batches(configs, "auto") == [[0, 2, 3], [1]]
        with pytest.raises(ValueError, match="free_bits"):
            run_trials([TrialSpec(config) for config in configs[1:3]], data=None)


def _one_step(step, configs, images, noise_rows, width=None):
    """One train step of `step` on shared images; noise_rows[k]: trial k's own noise, zero-padded
    to `width` for a padded step."""
    if width is None:  # a plain step
        step.train_step(images, None, noise_rows[0], None, loss_weights(configs, "cpu"))
        return
    noise = torch.stack([nn.functional.pad(row, (0, width - row.shape[1])) for row in noise_rows])
    step.train_step(images, None, noise, 0, loss_weights(configs, "cpu"))


def test_a_padded_step_hands_out_and_takes_each_trials_own_state():
    configs = [build_config(None, [*TINY_RUN, "model.hidden_dims=[16]", "model.latent_dim=3", "train.grad_clip=1"]),
               build_config(None, [*TINY_RUN, "model.hidden_dims=[24]", "model.latent_dim=5", "train.seed=1"])]
    torch.manual_seed(0)
    models = [build_model(config.model, (1, 28, 28), config.prior) for config in configs]
    images = torch.rand(8, 1, 28, 28).bernoulli()
    noises = [[torch.randn(8, config.model.latent_dim) for config in configs] for _ in range(3)]
    padded = PaddedStep(models, configs, torch.device("cpu"))
    _one_step(padded, configs, images, noises[0], 5)
    states = [padded.state(row) for row in range(2)]
    moments = [padded.optimizer_state(row) for row in range(2)]
    for model, state, moment in zip(models, states, moments):
        shapes = {name: value.shape for name, value in model.state_dict().items()}
        assert {name: value.shape for name, value in state.items()} == shapes
        assert {name: value.shape for name, value in moment["exp_avg"].items()} == shapes
    # a plain step resumed from each trial's state takes the same next step as the padded one
    plains = []
    for row, config in enumerate(configs):
        model = build_model(config.model, (1, 28, 28), config.prior)
        model.load_state_dict(states[row])
        plain = PlainStep(model, config, torch.device("cpu"))
        plain.load_optimizer_states([moments[row]])
        _one_step(plain, [config], images, [noises[1][row]])
        plains.append(plain)
    resumed = PaddedStep([plain.model(0) for plain in plains], configs, torch.device("cpu"))  # any weights...
    for row in range(2):
        resumed.load_state(row, states[row])  # ... replaced by the checkpoint's
    resumed.load_optimizer_states(moments)
    for step in (padded, resumed):
        _one_step(step, configs, images, noises[1], 5)
    for row, plain in enumerate(plains):
        for name, value in plain.state(0).items():
            torch.testing.assert_close(padded.state(row)[name], value, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(resumed.state(row)[name], value, rtol=1e-4, atol=1e-6)
    # padding stays zero: the widest tensors hold nothing outside each trial's positions
    for name, value in padded.params.items():
        assert bool((value * (1 - padded.masks[name]) == 0).all()), name


def _modelled(batches, flops, device_type="cpu"):
    return sum(padding.step_seconds(len(batch), max(flops[index] for index in batch), device_type,
                                    padded=len({flops[index] for index in batch}) > 1) for batch in batches)


def test_sizes_are_grouped_where_padding_saves_time():
    flops = [4e8, 2.5e7, 5e7, 4e8, 1e8, 2e8, 2.5e7]
    batches = padding.partition(flops, "cpu")
    assert sorted(index for batch in batches for index in batch) == list(range(len(flops)))
    for same in ((0, 3), (1, 6)):  # equal sizes share a batch
        assert any(set(same) <= set(batch) for batch in batches)
    # the cheapest of every split of the sizes (widest first) into runs, by the same model
    distinct = sorted(set(flops), reverse=True)
    best = min(_modelled([[index for index, value in enumerate(flops) if value in run] for run in runs], flops)
               for runs in _runs(distinct))
    assert _modelled(batches, flops) == pytest.approx(best)
    assert padding.partition(flops, "cuda") == [list(range(len(flops)))]  # launches dominate: one pass


def _runs(values):
    for cuts in itertools.product((False, True), repeat=len(values) - 1):
        runs, current = [], [values[0]]
        for value, cut in zip(values[1:], cuts):
            if cut:
                runs.append(current)
                current = []
            current.append(value)
        yield [*runs, current]


def test_a_latent_size_grid_plans_one_pass_and_off_plans_none():
    grid = [build_config(None, [*TINY_RUN, "model.hidden_dims=[256]", f"model.latent_dim={latent}"])
            for latent in (2, 4, 8, 16, 32)]
    assert plan_batches(grid, "auto") == [[0, 1, 2, 3, 4]]
    assert plan_batches(grid, "off") == [[index] for index in range(5)]
    assert sorted(len(batch) for batch in plan_batches(grid, 2)) == [1, 2, 2]


def test_seed_000s_study_trains_in_one_pass_under_a_cap(tmp_path, tracking_uri):
    """Seed 000's five (hidden, latent) pairs: one by one under auto on a CPU (padding them to
    the widest costs more than it saves there, benchmarks/RESULTS.md §0l); one padded pass when
    the study sets a cap, each trial its own run at its own size."""
    from test_sweep import runs_of
    from vae_lab import sweep
    from vae_lab.study.spec import load_study_spec

    spec = load_study_spec("experiments/seed000_nas.yaml")
    configs = [spec.trial_config(point, extra=["device=cpu"]) for point in spec.iter_grid_points()]  # CPU costs
    assert len({batch_key(config) for config in configs}) == 1
    assert plan_batches(configs, "auto") == [[index] for index in range(5)]
    assert plan_batches(configs, 5) == [[0, 1, 2, 3, 4]]
    assert sweep.main(["experiments/seed000_nas.yaml", "--tracking-uri", tracking_uri, "--storage",
                       f"sqlite:///{tmp_path / 'optuna.db'}", "study.batch_trials=5", "base.train.epochs=1",
                       "base.data.train_limit=256", "base.data.test_limit=128", "base.eval.enabled=false",
                       "base.tracking.log_images=false", "base.tracking.log_model=false"]) == 0
    kids = runs_of(tracking_uri)
    kids = kids[kids["vae_lab.role"] == "trial"]
    assert len(kids) == 5 and set(kids["status"]) == {"FINISHED"}
    assert set(kids[names.BATCHED_TRIALS_TAG]) == {"5"}
    assert set(kids[names.PADDED_TO_TAG]) == {"latent_dim=64, hidden_dims=[512]"}
    assert sorted(kids["param:model.latent_dim"].astype(int)) == [4, 8, 16, 32, 64]


@pytest.mark.parametrize("family", ["linear_vae", "conv_ae"])
def test_every_step_gives_each_trials_posterior_means_from_its_encoder_alone(family):
    """`encode_means` (the latent GIF's frames) is each model's own `encode(images).mean`, as the
    full forward gives it, for a plain, a stacked and a padded step."""
    from vae_lab.training.steps import StackedStep

    configs = [build_config(None, [*TINY_RUN, f"model.name={family}", "model.hidden_dims=[16]",
                                   "model.conv_channels=[4, 8]", f"model.latent_dim={dims}", f"train.seed={seed}"])
               for seed, dims in ((0, 3), (1, 5))]
    torch.manual_seed(0)
    models = [build_model(config.model, (1, 28, 28), config.prior).eval() for config in configs]
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        alone = [model.encode(images).mean for model in models]
    padded = PaddedStep(models, configs, torch.device("cpu")).encode_means(images)
    same_size = [build_model(configs[0].model, (1, 28, 28), configs[0].prior).eval() for _ in range(2)]
    stacked = StackedStep(same_size, [configs[0]] * 2, torch.device("cpu")).encode_means(images)
    plain = PlainStep(models[1], configs[1], torch.device("cpu"))
    noise = torch.zeros(6, 5) if models[1].variational else None
    for row, means in enumerate(alone):
        torch.testing.assert_close(padded[row][:, :means.shape[1]], means, rtol=1e-5, atol=1e-6)
        assert bool((padded[row][:, means.shape[1]:] == 0).all())  # the padding of the smaller trial
    for row, model in enumerate(same_size):
        with torch.no_grad():
            torch.testing.assert_close(stacked[row], model.encode(images).mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.encode_means(images)[0], alone[1])
    torch.testing.assert_close(plain.encode_means(images), plain.forward(images, noise, None)[1])
