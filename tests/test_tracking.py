"""The MLflow store: a new SQLite store starts from an empty-store template, as MLflow would make it."""

import json
import sqlite3
import threading

import torch
from mlflow.tracking import MlflowClient

from vae_lab.tracking.stores import prepare_store


def _schema(database):
    with sqlite3.connect(database) as connection:
        tables = sorted(row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"))
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, revision


def test_a_new_store_from_the_template_matches_one_mlflow_makes(tmp_path):
    by_mlflow = tmp_path / "plain" / "mlflow.db"
    by_mlflow.parent.mkdir()
    MlflowClient(f"sqlite:///{by_mlflow}").search_experiments()
    ours = tmp_path / "ours" / "mlflow.db"
    prepare_store(f"sqlite:///{ours}")
    assert ours.exists() and _schema(ours) == _schema(by_mlflow)

    client = MlflowClient(f"sqlite:///{ours}")
    assert [experiment.name for experiment in client.search_experiments()] == ["Default"]  # its own, made on open
    run = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "artifacts")))
    client.log_metric(run.info.run_id, "m", 2.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 2.0}

    prepare_store(f"sqlite:///{ours}")  # an existing store is left alone
    assert MlflowClient(f"sqlite:///{ours}").get_run(run.info.run_id).data.metrics == {"m": 2.0}


def test_concurrent_creators_of_one_store_get_one_store(tmp_path):
    database = tmp_path / "race" / "mlflow.db"
    errors = []

    def create():
        try:
            prepare_store(f"sqlite:///{database}")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [path.name for path in database.parent.iterdir()] == ["mlflow.db"]  # no drafts left behind
    assert MlflowClient(f"sqlite:///{database}").search_experiments()[0].name == "Default"


# ----------------------------------------------------------------------------- MLflow's UI

def test_experiments_open_on_their_runs_and_runs_carry_their_data_as_dataset_inputs(tiny_overrides, tracking_uri):
    from vae_lab.config import load_config
    from vae_lab.data.datasets import load_data
    from vae_lab.train import train

    config = load_config(None, [*tiny_overrides, "train.epochs=1", "data.binarize=dynamic", "eval.enabled=false",
                                "tracking.log_images=false", "tracking.log_model=false"])
    data = load_data(config.data, "cpu")
    run_id = train(config, data=data).run_id
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    inputs = {tag.value: entry.dataset for entry in client.get_run(run_id).inputs.dataset_inputs
              for tag in entry.tags if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"train", "validation", "test"}
    for context, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        images, _ = data.split(split)
        dataset = inputs[context]
        assert dataset.name == "mnist5k" and "mnist_5k.csv.gz" in dataset.source
        assert json.loads(dataset.profile)["features_shape"] == list(images.shape)
    assert len({dataset.digest for dataset in inputs.values()}) == 3
    found = client.search_runs([experiment.experiment_id],
                               filter_string="dataset.name = 'mnist5k' and dataset.context = 'validation'")
    assert [run.info.run_id for run in found] == [run_id]
    tags = client.get_run(run_id).data.tags  # the UI's Source column
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]

    again = train(config, data=data).run_id  # the same seed: MLflow's own random names would repeat
    names = [client.get_run(run).info.run_name for run in (run_id, again)]
    assert names[0] != names[1] and all(name.startswith(f"{config.model.name}-") for name in names)


def test_two_workers_logging_one_new_dataset_at_once_both_log_it(tiny_overrides, tracking_uri):
    """MLflow looks a dataset up, then inserts it: another worker's insert between the two made the
    second insert fail (UNIQUE constraint), and with it the first trial of a worker. Here that
    other worker's insert lands in exactly that gap (SQLAlchemy's hook, before our INSERT runs)."""
    import sqlalchemy

    from vae_lab.config import load_config
    from vae_lab.data.datasets import load_data
    from vae_lab.tracking.tracker import RunTracker

    config = load_config(None, [*tiny_overrides, "train.epochs=1"])
    data = load_data(config.data, "cpu")
    ours, theirs = (RunTracker.start(config, torch.device("cpu"), run_name=name) for name in ("ours", "theirs"))
    cut_in = []

    def other_worker_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not cut_in:
            cut_in.append(True)
            theirs.log_datasets(data)  # its own lookup finds nothing yet, and its insert commits

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", other_worker_first)
    try:
        ours.log_datasets(data)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", other_worker_first)
    assert cut_in  # the other worker's insert did land between our lookup and our insert
    client = MlflowClient(tracking_uri)
    logged = [{(entry.dataset.name, entry.dataset.digest) for entry in client.get_run(tracker.run_id).inputs.dataset_inputs}
              for tracker in (ours, theirs)]
    assert logged[0] == logged[1] and len(logged[0]) == 3  # train, validation, test: one row each, shared
    for tracker in (ours, theirs):
        tracker.end("FINISHED")


def test_an_older_experiment_is_tagged_when_used_again(tmp_path):
    from vae_lab.tracking.stores import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=str(tmp_path / "artifacts"))
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "old", uri) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_two_workers_tagging_an_older_experiment_at_once_both_go_on(tmp_path):
    """MLflow's experiment tag is looked up, then inserted: the other worker's insert lands in
    that gap here (as in the dataset test above), and tagging goes on."""
    import sqlalchemy

    from vae_lab.tracking.stores import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=str(tmp_path / "artifacts"))
    cut_in = []

    def other_worker_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO EXPERIMENT_TAGS") and not cut_in:
            cut_in.append("the other worker")  # first: its own insert passes this hook too
            cut_in.append(get_or_create_experiment(MlflowClient(uri), "old", uri))

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", other_worker_first)
    try:
        assert get_or_create_experiment(client, "old", uri) == old
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", other_worker_first)
    assert cut_in == ["the other worker", old]
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_links_open_model_training_mode_and_never_print_credentials():
    from vae_lab.cli import shell_command
    from vae_lab.tracking.links import browse_lines, ui_links

    assert ui_links("sqlite:////x/mlflow.db", "3", "abc") == [
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning",
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"]
    assert ui_links("https://user:secret@mlflow.example.org:8443/base/", "7") == [
        "https://mlflow.example.org:8443/base/#/experiments/7?workflowType=machine_learning"]
    lines = browse_lines("http://u:p@10.0.0.5:5000", "2", "r1", "parent")
    assert lines == ["  runs:    http://10.0.0.5:5000/#/experiments/2?workflowType=machine_learning",
                     "  parent:  http://10.0.0.5:5000/#/experiments/2/runs/r1?workflowType=machine_learning"]
    assert browse_lines("sqlite:////x/mlflow.db", "2", "r1", "run")[0] == \
        f"  browse:  {shell_command('mlflow')} ui --backend-store-uri sqlite:////x/mlflow.db   (then open the links below)"


def test_system_metrics_are_logged_when_asked_and_on_in_studies(tiny_overrides, tracking_uri):
    import pytest

    from vae_lab.config import ConfigError, load_config
    from vae_lab.study.spec import parse_study
    from vae_lab.train import train

    quiet = [*tiny_overrides, "train.epochs=2", "eval.enabled=false", "tracking.log_images=false",
             "tracking.log_model=false"]
    client = MlflowClient(tracking_uri)
    # a sample is only logged once a full interval has passed while the run trains: 30 epochs do
    watched = train(load_config(None, [*quiet, "train.epochs=30", "tracking.system_metrics_every=0.05"])).run_id
    history = client.get_metric_history(watched, "system/cpu_utilization_percentage")
    assert len(history) >= 1 and all(0 <= point.value <= 100 for point in history)
    assert client.get_metric_history(watched, "system/system_memory_usage_megabytes")[0].value > 0
    plain = train(load_config(None, quiet)).run_id
    assert not [key for key in client.get_run(plain).data.metrics if key.startswith("system/")]

    spec = parse_study({"study": {"name": "s", "sampler": "grid", "objectives": [{"metric": "val/loss"}]},
                        "search_space": {"train.seed": [0, 1]}})
    assert spec.trial_config({"train.seed": 0}).tracking.system_metrics_every == 5.0
    with pytest.raises(ConfigError, match="tracking.system_metrics_every must be zero or positive"):
        load_config(None, ["tracking.system_metrics_every=-1"])


def test_a_model_from_an_older_architecture_is_refused_with_one_line(tiny_overrides, tracking_uri, tmp_path, capsys):
    import pytest
    import torch

    from vae_lab.config import load_config
    from vae_lab.evaluate import main as evaluate
    from vae_lab.serve.images import RequestError, ServedRun
    from vae_lab.names import STATE_DICT_ARTIFACT
    from vae_lab.tracking.logged import IncompatibleModel, load_logged_model
    from vae_lab.train import train

    run_id = train(load_config(None, [*tiny_overrides, "model.name=conv_ae", "train.epochs=1", "eval.enabled=false",
                                      "tracking.log_images=false"])).run_id
    client = MlflowClient(tracking_uri)
    saved = torch.load(client.download_artifacts(run_id, STATE_DICT_ARTIFACT, str(tmp_path)), weights_only=True)
    first_up = next(key for key in saved["state_dict"] if key.startswith("decoder.") and key.endswith("weight"))
    channels_in, channels_out = saved["state_dict"][first_up].shape[:2]
    saved["state_dict"][first_up] = torch.zeros(channels_in, channels_out, 3, 3)  # the kernel-3 decoder
    older = tmp_path / "older" / "model_state"
    older.mkdir(parents=True)
    torch.save(saved, older / "state_dict.pt")
    client.log_artifact(run_id, str(older / "state_dict.pt"), "model_state")

    with pytest.raises(IncompatibleModel, match="logged by an older vae_lab") as refused:
        load_logged_model(run_id, tracking_uri)
    assert "\n" not in str(refused.value)
    with pytest.raises(RequestError) as served:
        ServedRun.load(run_id, tracking_uri)
    assert served.value.status == 409
    capsys.readouterr()  # MLflow's download bars so far
    assert evaluate(["--run", run_id, "--tracking-uri", tracking_uri]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "older vae_lab" in error and len(error.splitlines()) == 1


def test_one_redaction_hides_every_password_form_in_mlflow_and_optuna_uris():
    from vae_lab.tracking.links import browse_lines
    from vae_lab.tracking.uris import redact

    secret = "s3cr:t!"
    for uri, shown in [
        (f"postgresql://alice:{secret}@db:5432/mlflow", "postgresql://alice:***@db:5432/mlflow"),
        (f"postgresql+psycopg://alice:{secret}@db/optuna?sslmode=require",
         "postgresql+psycopg://alice:***@db/optuna?sslmode=require"),
        (f"postgresql://alice@db/optuna?sslmode=require&password={secret}",
         "postgresql://alice@db/optuna?sslmode=require&password=***"),
        (f"mysql://bob:{secret}@db/x?PASSWORD={secret}&charset=utf8", "mysql://bob:***@db/x?PASSWORD=***&charset=utf8"),
        (f"http://carol:{secret}@mlflow:5000", "http://carol:***@mlflow:5000"),
    ]:
        assert redact(uri) == shown
        assert secret not in "\n".join(browse_lines(uri, "1", "abc", "run"))
    for plain in ["sqlite:////tmp/m.db", "journal:////tmp/optuna.journal", "http://mlflow:5000",
                  "postgresql://alice@db/optuna", "file:///tmp/a@b/mlruns"]:
        assert redact(plain) == plain


def test_printed_commands_carry_the_environment_only_where_a_shell_would_miss_it(monkeypatch):
    import os
    import sys

    from vae_lab.cli import shell_command

    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    monkeypatch.setenv("PATH", venv_bin + os.pathsep + os.environ["PATH"])  # an activated environment
    assert shell_command("mlflow") == "mlflow"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a plain shell
    own = os.path.join(venv_bin, "mlflow")
    in_a_venv = sys.prefix != sys.base_prefix
    assert shell_command("mlflow") in ({os.path.relpath(own), own} if in_a_venv else {"mlflow"})
    assert shell_command("no-such-program") == "no-such-program"


def test_buffered_tags_go_out_with_the_metrics_in_requests_mlflow_accepts(tiny_overrides, tracking_uri):
    """log_tags waits for flush() and goes in its requests (within MLflow's 1,000 entities and 100
    tags per request); an interrupted end after a checkpoint drops them with the metrics, as the
    continued run sets them again; a failure's reason still reaches the run."""
    from vae_lab.config import load_config
    from vae_lab.names import CHECKPOINT_DIR, FAILURE_REASON_TAG, STOP_REASON_TAG
    from vae_lab.tracking.tracker import RunTracker

    client = MlflowClient(tracking_uri)
    tracker = RunTracker.start(load_config(None, tiny_overrides), torch.device("cpu"))
    requests = []
    send = tracker.client.log_batch
    tracker.client.log_batch = lambda *args, **kwargs: requests.append(kwargs) or send(*args, **kwargs)
    tracker.log_tags({f"t{index}": index for index in range(150)})
    tracker.log_metrics({f"m{index}": float(index) for index in range(1900)}, step=0)
    assert "t0" not in client.get_run(tracker.run_id).data.tags
    tracker.flush()
    run = client.get_run(tracker.run_id)
    assert {f"t{index}": str(index) for index in range(150)}.items() <= run.data.tags.items()
    assert len(run.data.metrics) == 1900 and run.data.metrics["m1899"] == 1899.0
    assert len(requests) == 3 and all(len(request["metrics"]) + len(request["tags"]) <= 1000
                                      and len(request["tags"]) <= 100 for request in requests)

    tracker.write_artifact(b"state", CHECKPOINT_DIR, "trial.pt")
    tracker.log_tags({STOP_REASON_TAG: "epochs"})
    tracker.log_metrics({"test/loss": 1.0}, step=1)
    tracker.end("KILLED", reason="KeyboardInterrupt", resumable=True)
    run = client.get_run(tracker.run_id)
    assert STOP_REASON_TAG not in run.data.tags and "test/loss" not in run.data.metrics
    assert run.data.tags[FAILURE_REASON_TAG] == "KeyboardInterrupt" and run.info.status == "KILLED"
