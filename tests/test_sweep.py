"""Studies end to end: real Optuna and MLflow stores in tmp_path, tiny models and data."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

import servers
from conftest import TINY_RUN
from vae_lab import names, sweep
from vae_lab.config import parse_override
from vae_lab.data.cache import DataCache
from vae_lab.study.storage import POINT_ATTR, RUN_ID_ATTR, open_storage

PYTHON = sys.executable
DATA = DataCache()  # one mnist5k slice for every in-process study in this module
FAST = {"tracking.log_model": False, "tracking.log_images": False, "eval.enabled": False}


def tiny_base(**extra) -> dict:
    base = dict(parse_override(text) for text in TINY_RUN)
    base.update(FAST)
    base.update(extra)
    return base


def write_study(path: Path, name: str, search_space: dict, study: dict | None = None, **base) -> Path:
    document = {"study": {"name": name, "sampler": "grid", **(study or {})},
                "base": tiny_base(**base), "search_space": search_space}
    path.write_text(yaml.safe_dump(document))
    return path


def run(path: Path, tracking_uri: str, *args: str) -> int:
    return sweep.main([str(path), "--tracking-uri", tracking_uri, *args], data_cache=DATA)


def runs_of(tracking_uri: str) -> pd.DataFrame:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vae_lab")
    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status, **r.data.tags,
                          **{f"param:{k}": v for k, v in r.data.params.items()}}
                         for r in client.search_runs([experiment.experiment_id], max_results=1000)])


def optuna_trials(tracking_uri: str, name: str, storage_url: str | None = None) -> list:
    folder = Path(tracking_uri[len("sqlite:///"):]).parent
    storage = open_storage(storage_url or f"journal:///{folder / 'optuna.journal'}")
    return [t for t in optuna.load_study(study_name=name, storage=storage).get_trials()
            if not t.user_attrs.get("vae_lab.skipped")]


def children(runs: pd.DataFrame, parent: str) -> pd.DataFrame:
    return runs[runs.get("mlflow.parentRunId") == parent]


def test_grid_runs_each_point_once_as_children_of_one_parent_and_resumes(tmp_path, tracking_uri, capsys):
    path = write_study(tmp_path / "grid.yaml", "grid", {"model.name": ["ae", "linear_vae"], "seeds": [0, 1]})
    assert run(path, tracking_uri) == 0
    out = capsys.readouterr().out
    runs = runs_of(tracking_uri)
    parent = runs[runs["vae_lab.role"] == "study"]
    assert len(parent) == 1
    parent_id = parent.iloc[0]["run_id"]
    assert parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["vae_lab.swept_params"] == "model.name,train.seed"
    assert parent.iloc[0]["vae_lab.objectives"] == "val/loss:minimize"
    kids = children(runs, parent_id)
    assert len(kids) == 4 and set(kids["status"]) == {"FINISHED"} and set(kids["vae_lab.role"]) == {"trial"}
    assert sorted(zip(kids["param:model.name"], kids["param:train.seed"])) == \
        [("ae", "0"), ("ae", "1"), ("linear_vae", "0"), ("linear_vae", "1")]
    assert sorted(kids["vae_lab.trial_number"].astype(int)) == [0, 1, 2, 3]

    trials = optuna_trials(tracking_uri, "grid")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert {t.user_attrs[RUN_ID_ATTR] for t in trials} == set(kids["run_id"])
    client = MlflowClient(tracking_uri)
    summary = json.loads(Path(client.download_artifacts(parent_id, "study/summary.json", str(tmp_path))).read_text())
    assert summary["counts"]["complete"] == 4 and summary["best_trial"]["run_id"] in set(kids["run_id"])
    table = pd.read_csv(client.download_artifacts(parent_id, "study/trials.csv", str(tmp_path)))
    assert len(table) == 4 and {"number", "state", "val/loss", "model.name", "train.seed", "run_id",
                                "seconds"} <= set(table.columns)
    # the best configuration is the best mean over its seeds, chosen on val/loss; its test/loss is reported
    chosen = summary["best_configuration"]
    by_model = {name: table[table["model.name"] == name]["val/loss"].mean() for name in ("ae", "linear_vae")}
    assert chosen["params"] == {"model.name": min(by_model, key=by_model.get)}
    assert chosen["seeds"] == 2 and chosen["mean"] == pytest.approx(min(by_model.values()))
    chosen_runs = kids[kids["param:model.name"] == chosen["params"]["model.name"]]["run_id"]
    test_losses = [client.get_run(run_id).data.metrics["test/loss"] for run_id in chosen_runs]
    assert chosen["test"]["test/loss"]["mean"] == pytest.approx(sum(test_losses) / 2)
    assert f"model.name={chosen['params']['model.name']} (val/loss=" in out
    assert "its test score (reported, not used to choose): test/loss=" in out
    listed = {a.path for a in client.list_artifacts(parent_id, "study")}
    assert {"study/study.yaml", "study/optimization_history.png", "study/importances.json"} <= listed
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in out
    experiment_id = client.get_run(parent_id).info.experiment_id
    assert (f"  parent:  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent_id}"
            "?workflowType=machine_learning") in out
    assert f"  runs:    http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning" in out
    assert f"python -m analysis.report --run {parent_id}" in out

    # the same command again: nothing is rerun, and no recorded time changes
    recorded = client.get_metric_history(parent_id, "study/total_seconds")
    assert len(recorded) == 1 and 0 < recorded[0].value <= float(table["seconds"].sum()) + 1
    assert run(path, tracking_uri) == 0
    assert len(children(runs_of(tracking_uri), parent_id)) == 4
    assert client.get_metric_history(parent_id, "study/total_seconds") == recorded
    # a changed search space is refused (exit 2, nothing new) unless --new-study; --dry-run says so too
    capsys.readouterr()
    assert run(path, tracking_uri, "search_space.model.name=[ae]", "--dry-run") == 2
    dry_error = capsys.readouterr().err
    assert "was started with a different setup" in dry_error and dry_error.count("\n") == 1
    assert run(path, tracking_uri, "search_space.model.name=[ae]", "--new-study", "--dry-run") == 0
    assert run(path, tracking_uri, "search_space.model.name=[ae]") == 2
    assert capsys.readouterr().err == dry_error  # exactly what --dry-run said
    assert len(runs_of(tracking_uri)) == 5
    assert run(path, tracking_uri, "search_space.model.name=[ae]", "--new-study") == 0
    runs = runs_of(tracking_uri)
    assert len(runs[runs["vae_lab.role"] == "study"]) == 2 and len(runs) == 5 + 3


def test_the_printed_commands_work_in_a_plain_shell(tmp_path, tracking_uri, capsys, monkeypatch):
    # a shell where this interpreter's environment is not activated (as after `make sweep`)
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    plain_path = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                 if os.path.abspath(folder) != venv_bin)
    monkeypatch.setenv("PATH", plain_path)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    path = write_study(tmp_path / "plain.yaml", "plain", {"model.name": ["ae", "linear_vae"]})
    assert run(path, tracking_uri) == 0
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and ":" in line}
    report = subprocess.run(f"{lines['report']} --out {tmp_path / 'report'}", shell=True, capture_output=True,
                            text=True, env=subprocess_env(tracking_uri))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "index.html").is_file()
    mlflow_program = lines["browse"].split()[0]
    assert subprocess.run([mlflow_program, "--version"], capture_output=True, env=subprocess_env(tracking_uri)) \
        .returncode == 0


def test_runs_and_printed_lines_name_each_trial_by_its_values(tmp_path, tracking_uri, capsys):
    path = write_study(tmp_path / "named.yaml", "named", {"loss.kl_weight": [0.5, 1.0], "seeds": [0]},
                       study={"objectives": ["val/recon", "val/kl"]}, **{"train.progress": True})
    assert run(path, tracking_uri) == 0
    out = capsys.readouterr().out
    runs = runs_of(tracking_uri)
    parent = runs[runs["vae_lab.role"] == "study"].iloc[0]
    kids = children(runs, parent["run_id"])
    assert sorted(kids["mlflow.runName"]) == ["kl_weight 0.5 · seed 0", "kl_weight 1 · seed 0"]
    assert sorted(kids[names.CONFIGURATION_TAG]) == ["kl_weight 0.5", "kl_weight 1"]  # what the UI groups seeds by
    # the trials that train, said by name (one stacked pass of both, or one pass each); the Pareto
    # front's trials by their values
    assert re.search(r"kl_weight 0\.5 · seed 0(, kl_weight 1 · seed 0)?: epoch 1/1", out)
    assert re.search(r"pareto: trial \d, kl_weight (0\.5|1) · seed 0 \(val/recon=", out)
    # the parent describes the study and shows its settings and shared config as params
    client = MlflowClient(tracking_uri)
    parent_run = client.get_run(parent["run_id"])
    assert "Study **named** (grid sampler) over `loss.kl_weight`, `train.seed`" in parent_run.data.tags["mlflow.note.content"]
    params = parent_run.data.params
    assert params["study.sampler"] == "grid" and params["study.trials"] == "2"
    assert params["study.objectives"] == "val/recon:minimize,val/kl:minimize"
    assert params["model.latent_dim"] == kids.iloc[0]["param:model.latent_dim"] and "loss.kl_weight" not in params


def test_failing_trial_is_failed_and_the_study_completes(tmp_path, tracking_uri):
    path = write_study(tmp_path / "fail.yaml", "fail", {"train.lr": [1e-3, 1e12]})
    assert run(path, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    parent_id = runs[runs["vae_lab.role"] == "study"].iloc[0]["run_id"]
    kids = children(runs, parent_id).set_index("param:train.lr")
    assert kids.loc["0.001", "status"] == "FINISHED"
    assert kids.loc["1000000000000.0", "status"] == "FAILED"
    assert "diverged" in kids.loc["1000000000000.0", "failure_reason"]
    states = {t.params["train.lr"]: t.state.name for t in optuna_trials(tracking_uri, "fail")}
    assert states == {0.001: "COMPLETE", 1e12: "FAIL"}
    assert runs[runs["vae_lab.role"] == "study"].iloc[0]["status"] == "FINISHED"


def test_pruned_trial_is_killed_in_mlflow(tmp_path, tracking_uri):
    study = {"pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
             "objectives": ["val/recon"]}
    path = write_study(tmp_path / "prune.yaml", "prune", {"train.lr": [1e-2, 1e-7]}, study)
    assert run(path, tracking_uri) == 0
    kids = runs_of(tracking_uri).dropna(subset=["mlflow.parentRunId"]).set_index("param:train.lr")
    assert kids.loc["0.01", "status"] == "FINISHED" and kids.loc["1e-07", "status"] == "KILLED"
    states = {t.params["train.lr"]: t.state.name for t in optuna_trials(tracking_uri, "prune")}
    assert states == {0.01: "COMPLETE", 1e-07: "PRUNED"}


def subprocess_env(tracking_uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1"}


def wait_for_running_child(tracking_uri: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the sweep ended early with exit code {process.returncode}"
        try:
            runs = runs_of(tracking_uri)
            if "mlflow.parentRunId" in runs and ((runs["status"] == "RUNNING")
                                                 & runs["mlflow.parentRunId"].notna()).any():
                return
        except Exception:  # the store is still being created
            pass
        time.sleep(0.3)
    raise AssertionError("no trial started")


def test_interrupt_and_sigkill_mid_trial_then_resume_runs_each_point_once(tmp_path, tracking_uri):
    # digits (8x8) loads in no time; 20 epochs give a window to stop a trial in the middle. No
    # checkpoints: a stopped trial's retry starts a new run whenever the signal lands, and the
    # stopped run stays KILLED (continuing from a checkpoint is tests/test_crash_proof.py's)
    # (the three latent sizes train as one padded pass)
    path = write_study(tmp_path / "kill.yaml", "kill", {"model.latent_dim": [2, 3, 4]},
                       **{"data.name": "digits", "train.epochs": 20, "train.batch_size": 16,
                          "train.checkpoint_every": 0})
    command = [PYTHON, "-m", "vae_lab.sweep", str(path)]
    env = subprocess_env(tracking_uri)

    terminated = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_running_child(tracking_uri, terminated)
    terminated.send_signal(signal.SIGTERM)
    assert terminated.wait(timeout=60) == 130
    runs = runs_of(tracking_uri)
    assert "RUNNING" not in set(runs["status"])  # the trial ended KILLED, the parent too
    assert "KILLED" in set(children(runs, runs[runs["vae_lab.role"] == "study"].iloc[0]["run_id"])["status"])
    assert "FAIL" in {t.state.name for t in optuna_trials(tracking_uri, "kill")}

    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    wait_for_running_child(tracking_uri, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert "RUNNING" in set(runs_of(tracking_uri)["status"])  # what a power cut leaves behind

    assert run(path, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    assert "RUNNING" not in set(runs["status"])
    parent_id = runs[runs["vae_lab.role"] == "study"].iloc[0]["run_id"]
    kids = children(runs, parent_id)
    finished = kids[kids["status"] == "FINISHED"]
    assert sorted(finished["param:model.latent_dim"]) == ["2", "3", "4"]
    assert len(kids[kids["status"] == "KILLED"]) >= 1
    trials = optuna_trials(tracking_uri, "kill")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["model.latent_dim"] for t in complete) == [2, 3, 4]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def test_two_worker_processes_never_run_a_point_twice(tmp_path, tracking_uri):
    # `sweep FILE` and `sweep FILE --workers 2` started together on a fresh store join one
    # study (one parent run): the default Optuna storage does not depend on --workers. (Which
    # command trains how many points depends on how fast each starts: not asserted.)
    points = [2, 3, 4, 5, 6, 7, 8, 9]
    path = write_study(tmp_path / "workers.yaml", "workers", {"model.latent_dim": points},
                       **{"data.name": "digits", "train.epochs": 8, "train.batch_size": 16})
    command = [PYTHON, "-m", "vae_lab.sweep", str(path)]  # the default storage, whatever --workers says
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]
    workers = [subprocess.Popen(command + extra, env=subprocess_env(tracking_uri), stdout=log.open("w"),
                                stderr=subprocess.STDOUT) for extra, log in zip(([], ["--workers", "2"]), logs)]
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=240) == 0, log.read_text()
    trials = optuna_trials(tracking_uri, "workers")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == len(trials) == len(points)
    assert Counter(t.user_attrs[POINT_ATTR] for t in complete).most_common(1)[0][1] == 1
    parents = [re.search(r"parent run (\w+)", log.read_text()) for log in logs]
    assert all(parents) and parents[0].group(1) == parents[1].group(1)  # both commands worked on one study
    runs = runs_of(tracking_uri)
    assert len(runs[runs["vae_lab.role"] == "study"]) == 1
    kids = runs.dropna(subset=["mlflow.parentRunId"])
    assert sorted(kids["param:model.latent_dim"].astype(int)) == points
    assert set(runs["status"]) == {"FINISHED"}


@pytest.fixture
def mlflow_server(tmp_path):
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts") as url:
        yield url


def test_study_against_a_real_mlflow_server(tmp_path, mlflow_server, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_study(tmp_path / "server.yaml", "server", {"model.name": ["ae", "linear_vae"]})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sweep.main([str(path), "--tracking-uri", mlflow_server, "--storage", storage], data_cache=DATA) == 0
    out = capsys.readouterr().out
    assert f"  runs:    {mlflow_server}/#/experiments/" in out and "mlflow ui --backend-store-uri" not in out
    runs = runs_of(mlflow_server)
    parent = runs[runs["vae_lab.role"] == "study"].iloc[0]
    kids = children(runs, parent["run_id"])
    assert parent["status"] == "FINISHED" and len(kids) == 2 and set(kids["status"]) == {"FINISHED"}
    assert sorted(kids["param:model.name"]) == ["ae", "linear_vae"]
    client = MlflowClient(mlflow_server)
    table = pd.read_csv(client.download_artifacts(parent["run_id"], "study/trials.csv", str(tmp_path)))
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"]
    assert (tmp_path / "server-artifacts").is_dir()


def test_batched_trials_each_get_their_own_child_run_and_optuna_trial(tmp_path, tracking_uri):
    space = {"loss.kl_weight": [0.5, 1.0, 2.0], "model.name": ["ae", "linear_vae"]}
    path = write_study(tmp_path / "batched.yaml", "batched", space, study={"batch_trials": "auto"})
    assert run(path, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    parent_id = runs[runs["vae_lab.role"] == "study"].iloc[0]["run_id"]
    kids = children(runs, parent_id)
    assert len(kids) == 6 and set(kids["status"]) == {"FINISHED"}
    assert sorted(zip(kids["param:model.name"], kids["param:loss.kl_weight"])) == sorted(
        (name, str(weight)) for name in ["ae", "linear_vae"] for weight in [0.5, 1.0, 2.0])
    # the three KL weights of each model family trained as one batch
    assert list(kids["vae_lab.batched_trials"]) == ["3"] * 6
    trials = optuna_trials(tracking_uri, "batched")
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 6
    assert {t.user_attrs[RUN_ID_ATTR] for t in trials} == set(kids["run_id"])
    off = write_study(tmp_path / "off.yaml", "unbatched", space, study={"batch_trials": "off"})
    assert run(off, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    parent_off = runs[(runs["vae_lab.role"] == "study") & (runs["vae_lab.study_name"] == "unbatched")]
    alone = children(runs, parent_off.iloc[0]["run_id"])
    assert alone.get("vae_lab.batched_trials", pd.Series([None])).isna().all()


def test_dry_run_lists_the_grid_and_creates_nothing(tmp_path, tracking_uri, capsys):
    path = write_study(tmp_path / "dry.yaml", "dry", {"loss.kl_weight": [0.5, 2.0], "model.name": ["ae", "linear_vae"],
                                                      "seeds": [0, 1]})
    assert run(path, tracking_uri, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "8 grid points, 2 training passes" in out  # each model family's 4 trials share a pass
    assert out.count("pass ") == 8
    assert not Path(tracking_uri[len("sqlite:///"):]).parent.exists()
