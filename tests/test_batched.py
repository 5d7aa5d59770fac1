"""Batched trials (vae_lab.training.batching, .run, .loop): same results as alone, one run per trial,
failures and early stops stay alone, and a batch of one steps exactly like the plain step."""

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import OVERFITS, TINY_RUN
from vae_lab.training.batching import DEFAULT_CAP, PER_TRIAL_KEYS, batch_key, plan_batches
from vae_lab.config import build_config
from vae_lab.data.datasets import load_data
from vae_lab.training.trial import TrainingDiverged
from vae_lab.training.scoring import evaluate_split
from vae_lab.training.steps import plain_forward
from vae_lab.training.device import resolve_device
from vae_lab.training.run import run_trials
from vae_lab.training.trial import TrialSpec
from vae_lab.tracking.logged import load_logged_model
from vae_lab.train import train

SOLO_MATCH = 1e-3  # a trial in a batch against its solo run: final losses, relative

TWO_EPOCHS = [*TINY_RUN, "train.epochs=2", "data.binarize=dynamic"]
# what differs between the trials of one batch: KL weight, lr, seed, clipping, KL schedule, free bits
TRIALS = [
    ["train.seed=0", "loss.kl_weight=1.0", "tracking.log_every_steps=3"],
    ["train.seed=0", "loss.kl_weight=0.5", "train.lr=3e-3"],
    ["train.seed=7", "loss.kl_weight=2.0", "train.grad_clip=5.0", "loss.kl_warmup_steps=10"],
    ["train.seed=0", "loss.kl_schedule=cyclical", "loss.kl_cycles=2", "loss.free_bits=0.5",
     "tracking.log_every_steps=2"],
    ["train.seed=7", "loss.tc_weight=6.0"],  # β-TCVAE
]


def make_configs(tracking_uri, trial_overrides, common=()):
    return [build_config(None, [*TWO_EPOCHS, f"tracking.uri={tracking_uri}", *common, *overrides])
            for overrides in trial_overrides]


@pytest.fixture(scope="module")
def tiny_data():
    config = build_config(None, TWO_EPOCHS)
    return load_data(config.data, resolve_device(config.device), config.train.batch_size)


def assert_batched_as_alone(configs, keys, rel=SOLO_MATCH) -> list:
    """Train `configs` one by one and then together in one batch; each batched trial ends with
    the `keys` metrics it ends with alone. Returns the solo results."""
    data = load_data(configs[0].data, resolve_device(configs[0].device), configs[0].train.batch_size)
    alone = [train(config, data=data) for config in configs]
    batched = run_trials([TrialSpec(config) for config in configs], data=data)
    for single, together in zip(alone, batched):
        for key in keys:
            assert together.metrics[key] == pytest.approx(single.metrics[key], rel=rel), key
    return alone


def history_steps(client, run_id, key):
    return [metric.step for metric in client.get_metric_history(run_id, key)]


def test_batched_trials_match_alone_and_each_has_its_own_run(tracking_uri, tiny_data):
    configs = make_configs(tracking_uri, TRIALS)
    alone = [train(config, data=tiny_data, run_name=f"alone-{index}")
             for index, config in enumerate(configs)]

    client = MlflowClient(tracking_uri)
    parent = client.create_run(client.get_experiment_by_name("vae_lab").experiment_id, run_name="study")
    results = run_trials([TrialSpec(config, run_name=f"trial-{index}", tags={"vae_lab.trial_number": str(index)})
                          for index, config in enumerate(configs)], data=tiny_data, parent_run_id=parent.info.run_id)

    for index, (single, batched) in enumerate(zip(alone, results)):
        assert not isinstance(batched, BaseException), batched
        for key in ("val/loss", "test/loss", "test/recon", "train/loss"):
            assert batched.metrics[key] == pytest.approx(single.metrics[key], rel=SOLO_MATCH), key
        assert set(batched.metrics) == set(single.metrics)

        run = client.get_run(batched.run_id)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"trial-{index}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["vae_lab.trial_number"] == str(index)
        assert run.data.params == client.get_run(single.run_id).data.params
        assert set(run.data.metrics) == set(client.get_run(single.run_id).data.metrics)
        for key in ("train/loss", "train/kl_weight", "test/loss", "epoch", "train/images_per_sec"):
            assert history_steps(client, batched.run_id, key) == history_steps(client, single.run_id, key), key
        artifacts = {item.path for item in client.list_artifacts(batched.run_id)}
        assert {"config.yaml", "images", "latents", "eval", "model_state"} <= artifacts
        assert artifacts == {item.path for item in client.list_artifacts(single.run_id)}
        images = {item.path for item in client.list_artifacts(batched.run_id, "images")}
        assert "images/reconstructions.png" in images and "images/latent_traversal.png" in images

    # per-trial logging cadence: trial 0 logs every 3 steps (8 steps per epoch), trial 1 at epoch ends
    assert history_steps(client, results[0].run_id, "train/loss") == [3, 6, 8, 9, 12, 15, 16]
    assert history_steps(client, results[1].run_id, "train/loss") == [8, 16]
    # the warm-up trial logs its own β schedule
    warmup = client.get_metric_history(results[2].run_id, "train/kl_weight")
    assert warmup[0].value == pytest.approx(2.0 * 7 / 10)
    # 16 steps in 2 cycles of 8, β rising over the first 4 of each (logged after steps 2, 4, ...)
    cyclical = [metric.value for metric in client.get_metric_history(results[3].run_id, "train/kl_weight")]
    assert cyclical == pytest.approx([0.25, 0.75, 1.0, 1.0, 0.25, 0.75, 1.0, 1.0])
    # the trials really differ, and the logged model is the batched trial's own
    assert results[0].metrics["test/loss"] != pytest.approx(results[1].metrics["test/loss"], rel=0.01)
    model, config = load_logged_model(results[1].run_id, tracking_uri)
    assert config.train.lr == pytest.approx(3e-3)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, results[1].model.state_dict()[name].cpu())


def test_trials_with_different_seeds_each_match_alone(tracking_uri, tiny_data):
    configs = make_configs(tracking_uri, [[f"train.seed={seed}"] for seed in (3, 4)],
                           common=["tracking.enabled=false", "eval.enabled=false", "model.name=ae"])
    alone = [train(config, data=tiny_data).metrics["test/loss"] for config in configs]
    batched = [result.metrics["test/loss"] for result in run_trials(map(TrialSpec, configs), data=tiny_data)]
    assert batched == pytest.approx(alone, rel=SOLO_MATCH)
    assert alone[0] != pytest.approx(alone[1], rel=1e-4)  # different seeds, different runs


def test_a_diverging_trial_fails_alone(tracking_uri, tiny_data):
    configs = make_configs(tracking_uri, [["train.lr=1e-3"], ["train.lr=1e12"], ["train.lr=2e-3"]],
                           common=["eval.enabled=false", "tracking.log_model=false"])
    results = run_trials(map(TrialSpec, configs), data=tiny_data)

    assert isinstance(results[1], TrainingDiverged)
    assert "diverged" in str(results[1])
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("vae_lab").experiment_id])
    by_lr = {float(run.data.params["train.lr"]): run for run in runs}
    assert len(runs) == 3
    assert by_lr[1e12].info.status == "FAILED"
    assert "diverged" in by_lr[1e12].data.tags["failure_reason"]
    for lr, index in ((1e-3, 0), (2e-3, 2)):
        assert by_lr[lr].info.status == "FINISHED"
        # the survivors lost a neighbour after epoch 1 (rows and Adam moments re-packed) and
        # still match their solo runs
        solo = build_config(None, [*TWO_EPOCHS, f"train.lr={lr}", "tracking.enabled=false", "eval.enabled=false"])
        assert results[index].metrics["test/loss"] == pytest.approx(
            train(solo, data=tiny_data).metrics["test/loss"], rel=SOLO_MATCH)
        assert [m.step for m in client.get_metric_history(by_lr[lr].info.run_id, "val/loss")] == [8, 16]
        assert [m.step for m in client.get_metric_history(by_lr[lr].info.run_id, "test/loss")] == [16]


def test_pruning_one_trial_kills_it_alone_and_ctrl_c_kills_all(tracking_uri, tiny_data):
    quiet = ["eval.enabled=false", "tracking.log_model=false", "tracking.log_images=false"]
    configs = make_configs(tracking_uri, [["train.lr=1e-3"], ["train.lr=2e-3"], ["train.lr=3e-3"]], common=quiet)
    seen = []

    def prune(epoch, metrics):
        raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    callbacks = [None, prune, lambda epoch, metrics: seen.append(epoch)]
    results = run_trials([TrialSpec(config, on_epoch_end=callback) for config, callback in zip(configs, callbacks)],
                         data=tiny_data)
    assert isinstance(results[1], optuna.TrialPruned)
    assert seen == [1, 2]
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("vae_lab").experiment_id
    statuses = sorted(run.info.status for run in client.search_runs([experiment_id]))
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]
    # the middle row left after epoch 1; its neighbours still train exactly as alone
    for index in (0, 2):
        solo = build_config(None, [*TWO_EPOCHS, f"train.lr={configs[index].train.lr}",
                                   "tracking.enabled=false", "eval.enabled=false"])
        assert results[index].metrics["test/loss"] == pytest.approx(
            train(solo, data=tiny_data).metrics["test/loss"], rel=SOLO_MATCH)

    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    def interrupt_in_epoch_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        run_trials([TrialSpec(config, on_epoch_end=callback)
                    for config, callback in zip(configs, [prune, None, interrupt_in_epoch_2])], data=tiny_data)
    statuses = sorted(run.info.status for run in client.search_runs([experiment_id]))
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED", "KILLED", "KILLED"]
    # what ended before the interrupt is kept for the caller (a sweep records it, not "interrupted")
    assert isinstance(caught.value.outcomes[0], optuna.TrialPruned) and caught.value.outcomes[1:] == [None, None]


def test_batch_key_groups_what_can_train_together():
    base = build_config(None, TINY_RUN)
    for key, value in (("loss.kl_weight", 0.3), ("loss.kl_warmup_steps", 5), ("train.lr", 1e-2),
                       ("train.seed", 9), ("train.grad_clip", 1.0), ("tracking.run_name", "x"),
                       ("eval.iwae_samples", 7), ("train.progress", True),
                       ("model.latent_dim", 3), ("model.hidden_dims", "[32]")):  # padded (test_padding.py)
        assert batch_key(build_config(None, [*TINY_RUN, f"{key}={value}"])) == batch_key(base), key
    for override in ("model.hidden_dims=[32,32]", "model.name=ae", "train.epochs=2",
                     "train.batch_size=32", "train.amp=true", "data.binarize=dynamic",
                     "loss.likelihood=gaussian", "data.resize=32"):
        assert batch_key(build_config(None, [*TINY_RUN, override])) != batch_key(base), override
    assert set(PER_TRIAL_KEYS) <= set(base.flat())


def test_plan_batches_caps_and_splits_evenly():
    small = [build_config(None, [*TINY_RUN, f"loss.kl_weight={0.1 * index}"]) for index in range(5)]
    other = build_config(None, [*TINY_RUN, "model.name=ae"])
    configs = [small[0], other, *small[1:]]
    assert plan_batches(configs, 2) == [[0, 2], [3, 4], [5], [1]]
    assert plan_batches(configs, "auto") == [[0, 2, 3, 4, 5], [1]]
    assert plan_batches(configs, "off") == [[index] for index in (0, 2, 3, 4, 5, 1)]
    cap = DEFAULT_CAP[resolve_device(small[0].device).type]
    sizes = [len(batch) for batch in plan_batches(configs * 4 * (cap // 16), "auto")]
    assert max(sizes) <= cap and sum(sizes) == 24 * (cap // 16) and max(sizes) - min(sizes[:-1]) <= 1
    # a big model: the memory estimate (of a CPU's memory) caps the batch below the default of 16
    big = [build_config(None, [*TINY_RUN, "model.hidden_dims=[4096,4096]", "train.batch_size=1024",
                               f"train.seed={seed}", "device=cpu"]) for seed in range(4)]
    assert all(len(batch) < 4 for batch in plan_batches(big, "auto"))
    assert sorted(index for batch in plan_batches(big, "auto") for index in batch) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_batch"):
        plan_batches(configs, 0)


def test_trials_of_different_shapes_are_refused_together(tiny_data):
    configs = [build_config(None, TINY_RUN), build_config(None, [*TINY_RUN, "model.hidden_dims=[32,32]"])]
    with pytest.raises(ValueError, match="model.hidden_dims"):
        run_trials(map(TrialSpec, configs), data=tiny_data)


def test_a_batch_of_one_steps_exactly_like_the_plain_step():
    """20 steps of one trial through the vmapped step and through plain autograd: same weights.
    On the CPU, where the arithmetic is the claim (a GPU may pick other conv algorithms)."""
    configs = [build_config(None, [*TWO_EPOCHS, "train.epochs=1", "train.batch_size=23", "tracking.enabled=false",
                                   "eval.enabled=false", "loss.kl_warmup_steps=7", "train.grad_clip=20",
                                   "loss.free_bits=0.05",
                                   "device=cpu", f"model.name={name}"]) for name in ("linear_vae", "conv_vae")]
    cpu = torch.device("cpu")
    data = load_data(configs[0].data, cpu, configs[0].train.batch_size)
    for config in configs:
        assert data.num_batches("train", config.train.batch_size) == 21
        (plain,) = run_trials([TrialSpec(config)], data=data, stacked=False)
        (stacked,) = run_trials([TrialSpec(config)], data=data, stacked=True)
        for name, value in plain.model.state_dict().items():
            # 1e-6 held for the kernel-3 decoder; vmap's kernel-4 transposed convolution sums in another
            # order, which after 20 Adam steps moves a weight by up to about 1e-5
            torch.testing.assert_close(stacked.model.state_dict()[name], value, rtol=0, atol=2e-5)
        assert stacked.metrics["val/loss"] == pytest.approx(plain.metrics["val/loss"], rel=1e-6)


def test_early_stopping_in_a_batch_finishes_that_trial_alone(tracking_uri):
    """An overfitting trial with patience stops early, keeps its best epoch's weights and finishes
    its run; its neighbour (no patience) trains all its epochs and matches its solo run."""
    common = [*TINY_RUN, *OVERFITS, f"tracking.uri={tracking_uri}", "eval.enabled=false", "tracking.log_images=false"]
    configs = [build_config(None, [*common, "train.lr=1e-3"]),
               build_config(None, [*common, "train.early_stopping_patience=2"])]
    device = resolve_device(configs[0].device)
    data = load_data(configs[0].data, device, configs[0].train.batch_size)
    steady, erratic = run_trials(map(TrialSpec, configs), data=data)
    assert not isinstance(erratic, BaseException), erratic
    client = MlflowClient(tracking_uri)
    run = client.get_run(erratic.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vae_lab.stop_reason"] == "early_stopping"
    assert run.data.tags["vae_lab.batched_trials"] == "2"
    stopped, best = erratic.metrics["train/stopped_epoch"], erratic.metrics["train/best_epoch"]
    assert stopped < 40 and stopped - best == 2
    history = client.get_metric_history(erratic.run_id, "val/loss")
    per_epoch = [metric.value for metric in history[:int(stopped)]]
    assert erratic.metrics["val/loss"] == pytest.approx(min(per_epoch))  # the kept weights' score
    assert run.data.metrics["val/loss"] == pytest.approx(min(per_epoch))  # ... and the run's latest value
    # the logged model is the best epoch's: scoring it again gives that epoch's val/loss
    model, config = load_logged_model(erratic.run_id, tracking_uri, map_location=device)
    again = evaluate_split(plain_forward(model.to(device), False, device), data, "val", [config],
                           False, [model.latent_dim], device)[0]
    assert again["val/loss"] == pytest.approx(min(per_epoch), rel=1e-5)
    # the steady trial went on alone, all 40 epochs, as it would have alone
    assert steady.metrics["train/stopped_epoch"] == 40
    solo = build_config(None, [*common, "train.lr=1e-3", "tracking.enabled=false"])
    assert steady.metrics["test/loss"] == pytest.approx(train(solo, data=data).metrics["test/loss"],
                                                        rel=SOLO_MATCH)


def test_stacked_weights_take_their_gradients_layout_and_a_trial_leaving_changes_no_other():
    """A vmapped linear layer's weight gradient comes transposed: the stacked weight and its Adam
    moments move into that layout once (no step copies a gradient), and a trial that leaves the
    stack (`keep`) leaves the others on the steps they would take without it."""
    from vae_lab.models.components import build_model
    from vae_lab.training.steps import StackedStep, loss_weights

    configs = [build_config(None, [*TWO_EPOCHS, "tracking.enabled=false", "model.name=linear_vae",
                                   f"train.seed={seed}", "train.grad_clip=5"]) for seed in (0, 1)]
    cpu = torch.device("cpu")

    def model(config):
        torch.manual_seed(config.train.seed)
        return build_model(config.model, (1, 28, 28), config.prior)

    pair = StackedStep([model(config) for config in configs], configs, cpu)
    alone = StackedStep([model(configs[1])], configs[1:], cpu)
    generator = torch.Generator().manual_seed(3)
    latent = configs[0].model.latent_dim
    draws = [(torch.rand(2, 16, 1, 28, 28, generator=generator), torch.randn(2, 16, latent, generator=generator))
             for _ in range(5)]

    def both_step(index):
        images, noise = draws[index]
        rows = len(pair.configs)  # 2, then 1 once the first trial has left
        pair.train_step(images[-rows:], 0, noise[-rows:], 0, loss_weights(pair.configs, cpu))
        alone.train_step(images[-1:], 0, noise[-1:], 0, loss_weights(alone.configs, cpu))

    both_step(0)
    weight = pair.params["model.encoder.0.weight"]  # [K, hidden, pixels]
    assert not weight.is_contiguous() and weight.transpose(1, 2).is_contiguous()
    storage = weight.data_ptr()
    both_step(1)
    assert pair.params["model.encoder.0.weight"].data_ptr() == storage  # stepped in place, not moved again
    pair.keep([1])
    for index in (2, 3, 4):
        both_step(index)
    for name, value in alone.state(0).items():
        torch.testing.assert_close(pair.state(0)[name], value, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        for name, value in alone.optimizer_state(0)[key].items():
            torch.testing.assert_close(pair.optimizer_state(0)[key][name], value, rtol=0, atol=1e-6)


def test_a_stacked_trials_checkpoint_resumes_in_a_plain_step_as_the_trial_goes_on_in_the_stack():
    """A stacked linear layer's Adam moments are stored transposed (as its weight is): a trial
    resumed alone, in a plain step, takes them in its own weight's layout. Handed over as they
    were, the fused kernel paired each weight with another entry's moments."""
    import io

    from vae_lab.models.components import build_model
    from vae_lab.training.steps import PlainStep, StackedStep, loss_weights

    configs = [build_config(None, [*TWO_EPOCHS, "tracking.enabled=false", "model.name=linear_vae",
                                   f"train.seed={seed}"]) for seed in (0, 1)]
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    pair = StackedStep([build_model(config.model, (1, 28, 28), config.prior) for config in configs], configs, cpu)
    generator = torch.Generator().manual_seed(3)
    latent = configs[0].model.latent_dim
    draws = [(torch.rand(2, 16, 1, 28, 28, generator=generator), torch.randn(2, 16, latent, generator=generator))
             for _ in range(3)]
    pair.train_step(draws[0][0], 0, draws[0][1], 0, loss_weights(configs, cpu))
    buffer = io.BytesIO()  # as a checkpoint keeps them
    torch.save({"model": pair.state(1), "optimizer": pair.optimizer_state(1)}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert not saved["optimizer"]["exp_avg"]["encoder.0.weight"].is_contiguous()
    plain = PlainStep(build_model(configs[1].model, (1, 28, 28), configs[1].prior), configs[1], cpu)
    plain.load_state(0, saved["model"])
    plain.load_optimizer_states([saved["optimizer"]])
    pair.keep([1])
    for images, noise in draws[1:]:
        pair.train_step(images[1:], 0, noise[1:], 0, loss_weights(pair.configs, cpu))
        plain.train_step(images[1], None, noise[1], None, loss_weights(configs[1:], cpu))
    for name, value in plain.state(0).items():
        torch.testing.assert_close(pair.state(0)[name], value, rtol=0, atol=1e-6)
