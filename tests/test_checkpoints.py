"""Checkpoints in the one loop: a run stopped after some epochs and continued from its checkpoint
ends with the numbers and metric histories of a run that was never stopped."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_RUN
from vae_lab import names
from servers import free_port
from vae_lab.training.checkpoints import CHECKPOINT_DIR, SLOTS, Resume, load_checkpoint, read_checkpoint
from vae_lab.config import build_config
from vae_lab.data.datasets import load_data
from vae_lab.training.run import run_trials
from vae_lab.training.trial import TrialSpec

FAST = ["tracking.log_model=false", "tracking.log_images=false", "eval.enabled=false"]
EPOCHS = 4


def configs_for(tracking_uri, *per_trial, epochs=EPOCHS, extra=()):
    return [build_config(overrides=[*TINY_RUN, *FAST, f"tracking.uri={tracking_uri}", f"train.epochs={epochs}",
                                    "train.checkpoint_every=1", "data.train_limit=256", "tracking.log_every_steps=2",
                                    *extra, *overrides]) for overrides in per_trial]


def stop_at(epoch):
    def callback(at, metrics):
        if at == epoch:
            raise KeyboardInterrupt("stopped for the test")
    return callback


def histories(client, run_id):
    run = client.get_run(run_id)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}


def assert_same_run(client, resumed_id, reference_id):
    resumed, reference = histories(client, resumed_id), histories(client, reference_id)
    timing = {names.IMAGES_PER_SEC, names.EPOCH_SECONDS}
    assert set(resumed) == set(reference)
    for key in reference:
        steps = [step for step, _ in resumed[key]]
        assert steps == [step for step, _ in reference[key]], key  # no gap, no duplicate
        if key not in timing:
            assert [value for _, value in resumed[key]] == pytest.approx(
                [value for _, value in reference[key]], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("per_trial", [
    [["model.name=linear_vae"]],
    [["loss.kl_weight=0.5", "train.seed=1"], ["loss.kl_weight=1.0", "train.seed=2"],
     ["loss.kl_weight=2.0", "train.seed=1", "train.lr=3e-3"]],
], ids=["one run", "a batch of three"])
def test_a_stopped_run_continues_from_its_checkpoint_as_if_never_stopped(tracking_uri, per_trial):
    configs = configs_for(tracking_uri, *per_trial)
    data = load_data(configs[0].data, torch.device("cpu"), configs[0].train.batch_size)
    reference = run_trials([TrialSpec(config) for config in configs], data=data)

    with pytest.raises(KeyboardInterrupt):  # during epoch 3, before its checkpoint
        run_trials([TrialSpec(config, on_epoch_end=stop_at(3)) for config in configs], data=data)
    client = MlflowClient(tracking_uri)
    stopped = [run for run in client.search_runs([client.get_experiment_by_name("vae_lab").experiment_id])
               if run.info.status == "KILLED"]
    by_seed_and_weight = {(run.data.params["train.seed"], run.data.params["loss.kl_weight"]): run.info.run_id
                          for run in stopped}
    run_ids = [by_seed_and_weight[(str(c.train.seed), str(c.loss.kl_weight))] for c in configs]
    checkpoints = [load_checkpoint(client, run_id) for run_id in run_ids]
    assert [checkpoint.epoch for checkpoint in checkpoints] == [2] * len(configs)

    ended = []
    resumed = run_trials([TrialSpec(config, resume=Resume(run_id, checkpoint))
                          for config, run_id, checkpoint in zip(configs, run_ids, checkpoints)], data=data,
                         on_trial_end=lambda index, outcome: ended.append(index))
    assert sorted(ended) == list(range(len(configs)))
    for result, expected, run_id in zip(resumed, reference, run_ids):
        assert result.run_id == run_id  # the same run, continued
        for key, value in expected.metrics.items():
            if key not in (names.IMAGES_PER_SEC, names.EPOCH_SECONDS):
                assert result.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags[names.RESUMED_FROM_TAG] == "2"
        assert_same_run(client, run_id, expected.run_id)
        assert not client.list_artifacts(run_id, CHECKPOINT_DIR)  # removed once the run finished


def test_train_resume_continues_a_killed_plain_run(tmp_path, tracking_uri):
    overrides = [*TINY_RUN, *FAST, f"tracking.uri={tracking_uri}", "train.epochs=3", "train.checkpoint_every=1",
                 "data.name=digits", "train.batch_size=16"]
    config = build_config(overrides=overrides)
    data = load_data(config.data, torch.device("cpu"), config.train.batch_size)
    with pytest.raises(KeyboardInterrupt):
        run_trials([TrialSpec(config, on_epoch_end=stop_at(2))], data=data)
    client = MlflowClient(tracking_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("vae_lab").experiment_id])
    command = [sys.executable, "-m", "vae_lab.train", "--resume", killed.info.run_id, f"tracking.uri={tracking_uri}"]
    refused = subprocess.run([*command, "train.epochs=5"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "train.epochs cannot change" in refused.stderr
    assert refused.stderr.count("\n") == 1
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics[names.EPOCH] == 3
    assert [m.value for m in client.get_metric_history(run.info.run_id, names.EPOCH)] == [1, 2, 3]
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already FINISHED" in again.stderr


def slot_path(client, run_id, slot):
    from urllib.parse import urlparse

    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / CHECKPOINT_DIR / slot


def overwrite_middle(path: Path, seed: int = 0) -> None:
    """Random bytes over the middle of the file (the weights), its size unchanged."""
    data = bytearray(path.read_bytes())
    noise = random.Random(seed).randbytes(256)
    middle = len(data) // 2
    data[middle:middle + len(noise)] = noise
    path.write_bytes(bytes(data))


def test_a_slot_that_fails_its_checksum_is_skipped_and_when_both_fail_each_is_named(tracking_uri):
    (config,) = configs_for(tracking_uri, ["model.name=linear_vae"])
    data = load_data(config.data, torch.device("cpu"), config.train.batch_size)
    with pytest.raises(KeyboardInterrupt):  # checkpoints of epochs 1 (a.pt) and 2 (b.pt)
        run_trials([TrialSpec(config, on_epoch_end=stop_at(3))], data=data)
    client = MlflowClient(tracking_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("vae_lab").experiment_id])
    run_id = killed.info.run_id
    found = read_checkpoint(client, run_id, config)
    assert found.checkpoint.epoch == 2 and found.problems == []

    overwrite_middle(slot_path(client, run_id, "b.pt"))
    found = read_checkpoint(client, run_id, config)
    assert found.checkpoint.epoch == 1  # the older slot, whole
    assert found.problems == ["slot b.pt: its checksum does not match its contents (corrupt or cut short)"]

    other = build_config(overrides=[*TINY_RUN, *FAST, f"tracking.uri={tracking_uri}", "train.lr=0.5"])
    assert read_checkpoint(client, run_id, other).problems[0] == "slot a.pt: it belongs to another config"

    a_slot = slot_path(client, run_id, "a.pt")
    a_slot.write_bytes(a_slot.read_bytes()[:1000])  # cut short
    found = read_checkpoint(client, run_id, config)
    assert found.checkpoint is None and len(found.problems) == 2

    command = [sys.executable, "-m", "vae_lab.train", "--resume", run_id, f"tracking.uri={tracking_uri}"]
    corrupt = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert corrupt.returncode == 2 and corrupt.stderr.count("\n") == 1, corrupt.stderr
    assert f"run {run_id} cannot continue: its checkpoints are corrupt (slot a.pt:" in corrupt.stderr

    down = f"http://127.0.0.1:{free_port()}"
    unreachable = subprocess.run([*command[:-1], f"tracking.uri={down}"], capture_output=True, text=True,
                                 timeout=120)
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert unreachable.stderr.startswith(f"error: cannot reach the MLflow tracking server {down}")

    for slot in SLOTS:
        slot_path(client, run_id, slot).unlink()
    none = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "has no checkpoint to continue from" in none.stderr


def test_a_checkpoint_holds_each_tensor_alone_not_the_storage_it_is_a_view_of():
    """A padded trial's weights are slices of its widest tensors: the checkpoint keeps the slice's
    entries only, and gives back the same values; the fields are written as they are."""
    from vae_lab.training.checkpoints import Checkpoint, decode, encode

    config = build_config(None, TINY_RUN)
    widest = torch.arange(400 * 1000, dtype=torch.float32).view(400, 1000)

    def checkpoint(weights: torch.Tensor) -> Checkpoint:
        return Checkpoint(epoch=1, step=3, sequence=0, finished_training=False, model_state={"w": weights},
                          optimizer_state={"step": 3.0, "exp_avg": {"w": weights}, "exp_avg_sq": {"w": weights}},
                          order_generator=torch.Generator().get_state(), noise_generator=torch.Generator().get_state(),
                          best_val_loss=1.0, best_epoch=1, best_state=None, val={"val/loss": 1.0}, last_train={},
                          last_epoch={}, pending_metrics=[["train/loss", 1.0, 0, 3]])

    view, alone = widest[:2, :5], widest[:2, :5].clone()
    encoded = encode(checkpoint(view), config)
    assert len(encoded) < len(encode(checkpoint(alone), config)) + 2000  # not the 1.6 MB storage
    restored = decode(encoded, config)
    assert torch.equal(restored.model_state["w"], alone) and restored.pending_metrics == [["train/loss", 1.0, 0, 3]]
    assert torch.equal(restored.optimizer_state["exp_avg_sq"]["w"], alone)
