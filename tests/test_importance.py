"""Hyperparameter importance and Optuna's plots: written by the sweep on the parent run when a
study ends (vae_lab.study.summary), shown by the report (analysis.importance).

One real sampled study (random sampler, two numeric params, six one-epoch trials on digits) in
a module-wide store; the rest are Optuna studies built in memory, with no training.
"""

import json
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from analysis.importance import importance_section
from analysis.page import Table, Text, render_html, render_markdown
from analysis.plots import Figure
from analysis.runs import load_study
from vae_lab import sweep
from vae_lab.study.spec import parse_study
from vae_lab.study.importance import param_importances, varying_params
from vae_lab.study.plots import applicable_plots, save_plots
from vae_lab.study.summary import log_summary
from vae_lab.tracking.stores import get_or_create_experiment

SWEPT = {"model.latent_dim", "train.lr"}
SAMPLED_STUDY = {
    "study": {"name": "importance", "sampler": {"name": "random", "seed": 0}, "n_trials": 6},
    "base": {"data.name": "digits", "data.train_limit": 256, "data.test_limit": 64, "model.name": "ae",
             "model.hidden_dims": [32], "train.epochs": 1, "train.batch_size": 64, "train.progress": False,
             "train.checkpoint_every": 0, "tracking.log_model": False, "tracking.log_images": False,
             "eval.enabled": False},
    "search_space": {"model.latent_dim": {"low": 2, "high": 8, "type": "int"},
                     "train.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module: creating one takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('importance_store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sampled_study(store, tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, parent run id) of the finished sampled study."""
    path = tmp_path_factory.mktemp("importance_study") / "importance.yaml"
    path.write_text(yaml.safe_dump(SAMPLED_STUDY))
    assert sweep.main([str(path), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("vae_lab")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.`vae_lab.role` = 'study'")
    return store, parent.info.run_id


def read_json(client: MlflowClient, run_id: str, path: str, folder: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(folder))).read_text())


def test_a_finished_study_logs_importances_per_objective_and_optunas_plots(sampled_study, tmp_path):
    uri, parent_id = sampled_study
    client = MlflowClient(uri)
    importances = read_json(client, parent_id, "study/importances.json", tmp_path)
    assert importances["evaluator"].startswith("fANOVA") and importances["trials"] == 6
    assert list(importances["objectives"]) == ["val/loss"]
    by_param = importances["objectives"]["val/loss"]
    assert set(by_param) == SWEPT and sum(by_param.values()) == pytest.approx(1.0)
    assert list(by_param.values()) == sorted(by_param.values(), reverse=True)
    summary = read_json(client, parent_id, "study/summary.json", tmp_path)
    assert summary["importance"]["file"] == "study/importances.json" and "plot_errors" not in summary
    listed = {info.path for info in client.list_artifacts(parent_id, "study")}
    # two numeric params: a contour beside the slice
    assert {"study/optimization_history.png", "study/param_importances.png", "study/slice.png",
            "study/contour.png"} <= listed
    assert not {"study/pareto_front.png", "study/best.png"} & listed


def test_report_section_has_the_importance_table_and_the_plots(sampled_study, tmp_path):
    uri, parent_id = sampled_study
    folder = tmp_path / "report"
    section = importance_section(load_study(uri, parent_id), folder)
    assert section.title == "Hyperparameter importance"
    [table] = [block for block in section.blocks if isinstance(block, Table)]
    assert set(table.frame["param"]) == SWEPT and list(table.frame.columns) == ["param", "val/loss"]
    text = " ".join(block.text for block in section.blocks if isinstance(block, Text))
    assert "fANOVA" in text and "6 complete trials" in text and "validation" in text
    figures = [block for block in section.blocks if isinstance(block, Figure)]
    assert [figure.title for figure in figures] == ["Optimization history", "Parameter importances", "Contour",
                                                    "Slice"]
    assert all(figure.path.parent == folder and figure.path.is_file() for figure in figures)
    assert "data:image/png;base64," in render_html("report", [section])
    assert "](optuna_slice.png)" in render_markdown("report", [section], folder)


def test_report_section_for_a_single_run_and_for_a_study_without_importances(store, tmp_path):
    client = MlflowClient(store)
    experiment_id = get_or_create_experiment(client, "old", store)  # its artifacts in the store's folder
    single = client.create_run(experiment_id).info.run_id
    old_study = client.create_run(experiment_id, tags={"vae_lab.role": "study"}).info.run_id
    [line] = importance_section(load_study(store, single), tmp_path).blocks
    assert "single run" in line.text
    [line] = importance_section(load_study(store, old_study), tmp_path).blocks
    assert "no importances logged" in line.text and "sweep command again" in line.text


# ----------------------------------------------------------------------------- studies built in memory

def spec_of(objectives: list[str], search_space: dict):
    return parse_study({"study": {"name": "memory", "sampler": "random", "n_trials": 8, "objectives": objectives},
                        "base": {"model": {"name": "linear_vae"}}, "search_space": search_space})


def test_one_complete_trial_skips_importance_with_the_reason_in_summary_json(store):
    spec = spec_of(["val/loss"], {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    study = optuna.create_study()
    lr = FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(create_trial(params={"train.lr": 1e-3}, distributions={"train.lr": lr}, value=90.0))
    study.add_trial(create_trial(params={"train.lr": 1e-2}, distributions={"train.lr": lr},
                                 state=TrialState.FAIL))
    client = MlflowClient(store)
    parent_id = client.create_run(get_or_create_experiment(client, "memory", store)).info.run_id
    summary = log_summary(client, parent_id, study, spec)
    assert summary["importance"] == {"skipped": "needs at least 2 complete trials, the study has 1"}
    listed = {info.path for info in client.list_artifacts(parent_id, "study")}
    assert "study/optimization_history.png" in listed
    assert not {"study/importances.json", "study/param_importances.png", "study/slice.png"} & listed


def test_two_objectives_get_importances_and_plots_each_and_the_seed_is_named(tmp_path):
    spec = spec_of(["val/recon", "val/kl"], {"loss.kl_weight": {"low": 0.1, "high": 10.0, "log": True},
                                             "train.seed": [0, 1]})
    weight, seed = FloatDistribution(0.1, 10.0, log=True), CategoricalDistribution([0, 1])
    study = optuna.create_study(directions=["minimize", "minimize"])
    for number, value in enumerate([0.1, 0.3, 1.0, 3.0, 10.0, 0.5]):
        study.add_trial(create_trial(params={"loss.kl_weight": value, "train.seed": number % 2},
                                     distributions={"loss.kl_weight": weight, "train.seed": seed},
                                     values=[100.0 - value, 5.0 * value + number % 2]))
    params = varying_params(study)
    importances = param_importances(study, spec, params)
    assert list(importances["objectives"]) == ["val/recon", "val/kl"]
    for by_param in importances["objectives"].values():
        assert set(by_param) == {"loss.kl_weight", "train.seed"} and sum(by_param.values()) == pytest.approx(1.0)
        assert by_param["loss.kl_weight"] > by_param["train.seed"]
    assert "as rerunning with another seed" in importances["notes"]["train.seed"]
    assert save_plots(study, spec, params, importances, tmp_path) == {}
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "param_importances_val_kl.png", "param_importances_val_recon.png", "pareto_front.png",
        "slice_val_kl.png", "slice_val_recon.png"]
    # each chart draws the importances importances.json holds (not a second fit)
    for metric, file in (("val/recon", "param_importances_val_recon.png"), ("val/kl", "param_importances_val_kl.png")):
        with warnings.catch_warnings(), matplotlib.rc_context():  # as save_plots draws it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = applicable_plots(study, spec, params, importances)[file]()
        drawn = sorted(bar.get_width() for bar in axes.patches)
        plt.close(axes.figure)
        assert drawn == pytest.approx(sorted(importances["objectives"][metric].values()))


def test_no_varying_param_or_a_constant_objective_skips_importance():
    spec = spec_of(["val/loss"], {"train.lr": [1e-3, 1e-2]})
    lr = CategoricalDistribution([1e-3, 1e-2])
    same_lr = optuna.create_study()
    for value in (90.0, 91.0):
        same_lr.add_trial(create_trial(params={"train.lr": 1e-3}, distributions={"train.lr": lr}, value=value))
    assert param_importances(same_lr, spec, varying_params(same_lr)) == {
        "skipped": "no swept param takes more than one value over the 2 complete trials"}
    same_loss = optuna.create_study()
    for value in (1e-3, 1e-2):
        same_loss.add_trial(create_trial(params={"train.lr": value}, distributions={"train.lr": lr}, value=90.0))
    assert param_importances(same_loss, spec, varying_params(same_loss)) == {
        "skipped": "val/loss has the same value in all 2 complete trials"}


@pytest.mark.parametrize("low, high, minor_labels", [(20, 40, ["20", "30", "40"]), (1e-4, 1e-1, [])])
def test_log_axes_are_labelled_with_plain_numbers_that_do_not_run_together(low, high, minor_labels):
    import matplotlib.pyplot as plt

    from vae_lab.study.plots import plain_log_ticks

    figure, ax = plt.subplots()
    ax.plot([low, high], [1, 2], "o")
    ax.set_xscale("log")
    plain_log_ticks(figure)
    figure.canvas.draw()
    shown = [tick for tick in ax.xaxis.get_minor_ticks() + ax.xaxis.get_major_ticks()
             if low * 0.9 <= tick.get_loc() <= high * 1.1 and tick.label1.get_text()]
    labels = [tick.label1.get_text() for tick in shown]
    assert all("×" not in label and "$" not in label for label in labels)
    assert [label for label in labels if label in minor_labels] == minor_labels or not minor_labels
    assert labels  # something is labelled in view
    plt.close(figure)
