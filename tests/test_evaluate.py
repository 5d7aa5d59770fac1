"""`python -m vae_lab.evaluate`: eval/* again for finished runs, logged into the same runs, no retraining."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_RUN
from vae_lab.config import build_config
from vae_lab.evaluate import main
from vae_lab.train import train

QUIET = [*TINY_RUN, "data.binarize=dynamic", "tracking.log_images=false"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A study (parent + two trials with models) and a stand-alone run without a model."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('evaluate') / 'mlflow.db'}"
    trials = [build_config(overrides=[*QUIET, f"tracking.uri={uri}", f"train.seed={seed}"]) for seed in (0, 1)]
    client = MlflowClient(uri)
    first = train(trials[0])  # creates the experiment
    parent = client.create_run(client.get_run(first.run_id).info.experiment_id, run_name="study s",
                               tags={"vae_lab.role": "study", "vae_lab.study_name": "s"}).info.run_id
    client.set_tag(first.run_id, "mlflow.parentRunId", parent)
    second = train(trials[1], parent_run_id=parent)
    bare = train(build_config(overrides=[*QUIET, f"tracking.uri={uri}", "tracking.log_model=false"]))
    for _ in range(2):  # two parents that share a study name (--new-study makes such)
        client.create_run(client.get_run(first.run_id).info.experiment_id,
                          tags={"vae_lab.role": "study", "vae_lab.study_name": "twin"})
    return uri, parent, [first.run_id, second.run_id], bare.run_id


def test_one_run_is_evaluated_again_with_new_settings(store, capsys):
    uri, _, (run_id, _), _ = store
    client = MlflowClient(uri)
    before = client.get_run(run_id).data
    assert before.tags["nll_iwae"].startswith("4 samples")
    assert main(["--run", run_id, "eval.iwae_samples=9", "--tracking-uri", uri]) == 0
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags["nll_iwae"].startswith("9 samples")
    assert "eval.iwae_samples=9" in after.data.tags["vae_lab.eval_settings"]
    assert len(client.get_metric_history(run_id, "eval/nll_iwae")) == 2  # the training's, then this one
    assert after.data.metrics["eval/nll_iwae"] != before.metrics["eval/nll_iwae"]
    assert after.data.params == before.params  # no retraining, the run is the same run
    assert f"run {run_id}:" in capsys.readouterr().out


def test_a_study_by_name_evaluates_each_finished_trial(store):
    uri, parent, run_ids, bare = store
    assert main(["--study", "s", "eval.iwae_samples=6", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    for run_id in run_ids:
        assert client.get_run(run_id).data.tags["nll_iwae"].startswith("6 samples")
    assert "vae_lab.eval_settings" not in client.get_run(bare).data.tags  # not one of the study's trials
    assert main(["--study", parent, "eval.iwae_samples=5", "--tracking-uri", uri]) == 0  # by parent id
    assert client.get_run(run_ids[1]).data.tags["nll_iwae"].startswith("5 samples")


@pytest.mark.parametrize("arguments, words", [
    (["--run", "0123456789abcdef"], ["unknown run id", "0123456789abcdef"]),
    (["--study", "nope"], ["no study named 'nope'"]),
    (["--run", "{bare}"], ["has no model"]),
    (["--run", "{trial}", "train.epochs=3"], ["only eval.*", "train.epochs"]),
    (["--run", "{trial}", "eval.iwae_samples=0"], ["eval.iwae_samples", "positive"]),
    (["--run", "{trial}", "eval.enabled=false"], ["eval.enabled"]),
    (["--run", "{failed}"], ["FAILED", "only a FINISHED run"]),
    (["--study", "twin"], ["2 studies are named 'twin'", "parent run id"]),
])
def test_bad_input_exits_2_with_one_line(store, capsys, arguments, words):
    uri, _, (trial, _), bare = store
    client = MlflowClient(uri)
    experiment_id = client.get_run(trial).info.experiment_id
    failed = client.create_run(experiment_id).info.run_id
    client.set_terminated(failed, "FAILED")
    arguments = [argument.format(bare=bare, trial=trial, failed=failed) for argument in arguments]
    before = MlflowClient(uri).get_run(trial).data
    assert main([*arguments, "--tracking-uri", uri]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:")
    for word in words:
        assert word in error
    assert MlflowClient(uri).get_run(trial).data.tags == before.tags  # nothing written


def test_device_may_be_chosen_for_the_evaluation(store):
    uri, _, (run_id, _), _ = store
    assert main(["--run", run_id, "device=cpu", "eval.iwae_samples=2", "--tracking-uri", uri]) == 0
    assert "eval.iwae_samples=2" in MlflowClient(uri).get_run(run_id).data.tags["vae_lab.eval_settings"]


def test_command_line(store):
    uri, _, (run_id, _), _ = store
    done = subprocess.run([sys.executable, "-m", "vae_lab.evaluate", "--run", run_id, "eval.iwae_samples=3",
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "eval/nll_iwae" in done.stdout and "logged into 1 run(s)" in done.stdout
