"""`python -m analysis.report` on a real tiny study in a temporary MLflow store.

The study is built by hand exactly as the sweep contract says (a parent run with the study
tags and `study/study.yaml`, children trained by `vae_lab.train.train`), once per module:
ae at two seeds, linear_vae over latent size x KL weight, one trial that fails and one that
is pruned, all on a slice of mnist5k with dynamic binarization (so eval/nll_iwae exists).
Beside it, one stand-alone run without images, latents or a model.

A second, synthetic study (runs logged with MlflowClient, no training) gives val/* and test/*
opposite answers, so the report must pick its ★ rows, winners and trends on validation.
"""

import re
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import plots, report
from analysis.runs import ReportInputError, load_study, newest_parent_of, newest_study_id
from analysis.stats import supported_decimals
from conftest import TINY_RUN
from vae_lab.config import load_config
from vae_lab.data.datasets import load_data
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store
from vae_lab.train import train

STUDY = "tiny_report_study"
SWEPT = "model.name,model.latent_dim,loss.kl_weight,train.seed"
STUDY_YAML = f"""study:
  name: {STUDY}
  sampler: grid
  objectives:
    - {{metric: val/recon, direction: minimize}}
    - {{metric: val/kl, direction: minimize}}
base:
  data: {{name: mnist5k, train_limit: 512, test_limit: 256, binarize: dynamic}}
  train: {{epochs: 2}}
search_space:
  model.name: [ae, linear_vae]
  model.latent_dim: [2, 4]
  loss.kl_weight: [1.0, 10.0]
seeds: [0, 1]
"""
# (model, latent, kl weight, seed, what happens)
TRIALS = [
    ("ae", 4, 1.0, 0, "finish"),
    ("ae", 4, 1.0, 1, "finish"),
    ("linear_vae", 2, 1.0, 0, "finish"),
    ("linear_vae", 4, 1.0, 0, "finish"),
    ("linear_vae", 2, 10.0, 0, "finish"),
    ("linear_vae", 4, 10.0, 0, "finish"),
    ("linear_vae", 4, 1.0, 1, "fail"),
    ("linear_vae", 2, 10.0, 1, "prune"),
]


class TrialBroke(RuntimeError):
    pass


def stop_after_first_epoch(outcome):
    def on_epoch_end(epoch, metrics):
        if outcome == "fail":
            raise TrialBroke("simulated crash after epoch 1")
        raise optuna.TrialPruned()
    return on_epoch_end


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The study (and a stand-alone run) in a module-wide SQLite store; built once."""
    folder = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    common = [*TINY_RUN, f"tracking.uri={uri}", "data.binarize=dynamic", "train.epochs=2",
              "tracking.log_every_steps=4", "device=cpu"]
    data = load_data(load_config(None, common).data, "cpu")
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, "vae_lab", uri)
    parent = client.create_run(experiment_id, run_name=STUDY, tags={
        "vae_lab.role": "study", "vae_lab.study_name": STUDY, "vae_lab.swept_params": SWEPT,
        "vae_lab.objectives": "val/recon:minimize,val/kl:minimize", "vae_lab.sampler": "grid"})
    parent_id = parent.info.run_id
    client.log_text(parent_id, STUDY_YAML, "study/study.yaml")
    for number, (model, latent, kl_weight, seed, outcome) in enumerate(TRIALS):
        config = load_config(None, [*common, f"model.name={model}", f"model.latent_dim={latent}",
                                    f"loss.kl_weight={kl_weight}", f"train.seed={seed}"])
        tags = {"vae_lab.role": "trial", "vae_lab.study_name": STUDY, "vae_lab.trial_number": str(number)}
        if outcome == "finish":
            train(config, parent_run_id=parent_id, tags=tags, data=data)
        else:
            with pytest.raises((TrialBroke, optuna.TrialPruned)):
                train(config, parent_run_id=parent_id, tags=tags, data=data,
                      on_epoch_end=stop_after_first_epoch(outcome))
    client.set_terminated(parent_id, "FINISHED")

    lone = load_config(None, [*common, "model.name=ae", "train.epochs=1", "tracking.log_images=false",
                              "tracking.log_model=false", "tracking.run_name=lone_ae"])
    lone_id = train(lone, data=data).run_id
    return {"uri": uri, "parent": parent_id, "lone": lone_id, "client": client}


@pytest.fixture(scope="module")
def study_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "tiny"
    code = report.main(["--run", store["parent"], "--out", str(out), "--tracking-uri", store["uri"]])
    assert code == 0
    return out


def children(store) -> list:
    return store["client"].search_runs(
        [store["client"].get_run(store["parent"]).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{store['parent']}'")


def findings_of(folder: Path) -> list[str]:
    text = (folder / "report.md").read_text()
    section = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


# ----------------------------------------------------------------------------- files and artifact

def test_report_writes_every_file_and_valid_pngs(study_report):
    for name in ["index.html", "report.md", "runs.csv", "learning_curves.png", "rate_distortion.png",
                 "metric_vs_latent.png", "heatmap_0.png", "latents.png", "reconstructions.png",
                 "prior_samples.png"]:
        assert (study_report / name).is_file(), name
    pngs = sorted(study_report.glob("*.png"))
    gifs = sorted(study_report.glob("latent_evolution_*.gif"))
    assert len(gifs) == 5  # one animation per configuration (the failed and the pruned trials have none)
    for image_file in pngs + gifs:
        with Image.open(image_file) as image:
            image.verify()
            assert image.format == image_file.suffix[1:].upper()
    page = (study_report / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(pngs) + len(gifs)  # every figure inline, nothing fetched from elsewhere
    assert sum(source.startswith("data:image/png;base64,") for source in sources) == len(pngs)
    assert sum(source.startswith("data:image/gif;base64,") for source in sources) == len(gifs)
    markdown = (study_report / "report.md").read_text()
    assert all(f"]({image_file.name})" in markdown for image_file in pngs + gifs)


def test_report_is_logged_to_the_parent_run(store, study_report):
    logged = {Path(item.path).name for item in store["client"].list_artifacts(store["parent"], "report")}
    expected = {path.name for path in study_report.iterdir()}
    assert expected <= logged
    assert {"index.html", "report.md", "runs.csv", "latents.png"} <= logged


# ----------------------------------------------------------------------------- content

def test_what_was_run_counts_statuses_and_shows_the_study_file(store, study_report):
    text = (study_report / "report.md").read_text()
    assert "Runs: 8 — finished 6, failed 1, pruned or interrupted (KILLED) 1, still running 0" in text
    assert "Swept parameters: model.name, model.latent_dim, loss.kl_weight, train.seed" in text
    assert "Objectives: val/recon (minimize), val/kl (minimize)" in text
    assert report.SELECTION_RULE in text
    assert "TrialBroke: simulated crash after epoch 1" in text
    assert "search_space:\n  model.name: [ae, linear_vae]" in text
    assert "Device: cpu (8 runs)" in text
    assert "this study has 2 objectives, val/recon and val/kl, and no single best" in text  # what the ★ means then
    # findings first; the study file last, folded
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings[0] == "Findings" and headings[1] == "What was run" and headings[-1] == "The study file"
    assert text.rstrip().endswith("</details>") and "<details><summary>the parent's study/study.yaml (" in text
    assert "<details><summary>the parent&#x27;s study/study.yaml (" in (study_report / "index.html").read_text()


def test_runs_csv_matches_mlflow(store, study_report):
    table = pd.read_csv(study_report / "runs.csv")
    runs = {run.info.run_id: run for run in children(store)}
    assert set(table["run_id"]) == set(runs)
    for _, row in table.iterrows():
        run = runs[row["run_id"]]
        assert row["status"] == run.info.status
        if run.info.status == "FINISHED":
            assert row["test/recon"] == pytest.approx(run.data.metrics["test/recon"])
            assert row["eval/mse_per_pixel"] == pytest.approx(run.data.metrics["eval/mse_per_pixel"])
    assert sorted(table["status"]) == ["FAILED", "FINISHED", "FINISHED", "FINISHED", "FINISHED", "FINISHED",
                                       "FINISHED", "KILLED"]


def markdown_tables(folder: Path, section_title: str) -> list[pd.DataFrame]:
    """The tables of one section of report.md, as strings."""
    text = (folder / "report.md").read_text()
    section = text.split(f"## {section_title}\n", 1)[1].split("\n## ", 1)[0]
    tables, lines = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
            tables.append(pd.DataFrame(split[2:], columns=split[0]))
            lines = []
    return tables


def comparison_rows(folder: Path) -> pd.DataFrame:
    [table] = markdown_tables(folder, "Comparison")
    return table


def test_comparison_table_matches_the_runs(store, study_report):
    table = comparison_rows(study_report)
    finished = [run for run in children(store) if run.info.status == "FINISHED"]
    assert len(table) == 5  # ae x 1 (two seeds) + linear_vae x 4; failed and pruned runs left out

    ae = [run.data.metrics["test/recon"] for run in finished if run.data.params["model.name"] == "ae"]
    ae_row = table[table["family"] == "ae"].iloc[0]
    assert ae_row["runs"] == "2"
    digits = supported_decimals(np.std(ae, ddof=1))  # two significant digits of the std
    assert ae_row["test/recon"] == f"{np.mean(ae):.{digits}f} ± {np.std(ae, ddof=1):.{digits}f}"

    for run in finished:
        params = run.data.params
        if params["model.name"] != "linear_vae":
            continue
        row = table[(table["family"] == "linear_vae") & (table["model.latent_dim"] == params["model.latent_dim"])
                    & (table["loss.kl_weight"] == f"{float(params['loss.kl_weight']):g}")]
        assert len(row) == 1
        assert row.iloc[0]["runs"] == "1"
        assert row.iloc[0]["test/kl"] == f"{run.data.metrics['test/kl']:.{4 if run.data.metrics['test/kl'] < 1 else 2}f}"
        assert row.iloc[0]["eval/nll_iwae"] != "–"

    # a ★ on exactly one row per family: for linear_vae the highest mean validation ELBO,
    # whose column stands beside the test ELBO it reports
    stars = table[table[""] == "★"]
    assert sorted(stars["family"]) == ["ae", "linear_vae"]
    columns = list(table.columns)
    assert columns.index("val/elbo") + 1 == columns.index("test/elbo")
    assert columns.index("val/recon") + 1 == columns.index("test/recon")
    # sample quality beside distortion and rate; an AE has no prior samples to score
    assert columns.index("test/recon") + 1 == columns.index("test/kl") == columns.index("eval/fd_classifier") - 1
    assert ae_row["eval/fd_classifier"] == "–" and ae_row["eval/fd_classifier_recon"] != "–"
    vaes = [run for run in finished if run.data.params["model.name"] == "linear_vae"]
    best = max(vaes, key=lambda run: run.data.metrics["val/elbo"])
    star = stars[stars["family"] == "linear_vae"].iloc[0]
    assert (star["model.latent_dim"], star["loss.kl_weight"]) == (
        best.data.params["model.latent_dim"], f"{float(best.data.params['loss.kl_weight']):g}")


def test_findings_agree_with_the_numbers(store, study_report):
    sentences = findings_of(study_report)
    vae = {(run.data.params["model.latent_dim"], float(run.data.params["loss.kl_weight"])): run.data.metrics
           for run in children(store)
           if run.info.status == "FINISHED" and run.data.params["model.name"] == "linear_vae"}

    for latent in ("2", "4"):
        low, high = vae[(latent, 1.0)], vae[(latent, 10.0)]
        kl_change = 100 * (high["val/kl"] - low["val/kl"]) / abs(low["val/kl"])
        recon_change = 100 * (high["val/recon"] - low["val/recon"]) / abs(low["val/recon"])
        kl_words = f"{'cut' if kl_change < 0 else 'raised'} KL by {abs(kl_change):.0f}%"
        recon_words = f"{'raised' if recon_change > 0 else 'lowered'} reconstruction loss by {abs(recon_change):.0f}%"
        expected = f"linear_vae (latent_dim={latent}): KL weight 10 {kl_words} and {recon_words} compared with KL weight 1"
        assert any(sentence.startswith(expected) for sentence in sentences), expected

    for kl_weight in (1.0, 10.0):
        improved = vae[("4", kl_weight)]["val/recon"] < vae[("2", kl_weight)]["val/recon"]
        [trend] = [s for s in sentences if s.startswith("Validation reconstruction (val/recon)")
                   and f"kl_weight={kl_weight:g})" in s]
        assert ("(1/1 step;" in trend) == improved
        assert ("gets worse" in trend) == (not improved)

    [iwae] = [s for s in sentences if s.startswith("eval/nll_iwae (")]
    iwae_values = [metrics["eval/nll_iwae"] for metrics in vae.values()]
    assert f"computed on the test split for 4 run(s): {min(iwae_values):.1f} to {max(iwae_values):.1f} nats/image" \
        in iwae
    assert any("does not apply to the 2 plain autoencoder run(s)" in s for s in sentences)

    [samples] = [s for s in sentences if s.startswith("Prior samples against the test images, eval/fd_classifier")]
    distances = {key: metrics["eval/fd_classifier"] for key, metrics in vae.items()}
    lowest, highest = min(distances, key=distances.get), max(distances, key=distances.get)
    assert f"from {distances[lowest]:.1f} (" in samples and f"to {distances[highest]:.1f} (" in samples
    assert f"latent_dim={lowest[0]}" in samples.split(f"from {distances[lowest]:.1f} (")[1].split(")")[0]
    accuracy = {metrics["eval/fd_classifier_accuracy"] for metrics in vae.values()}
    assert len(accuracy) == 1 and f"test accuracy {accuracy.pop():.4f}" in samples
    assert "over 4 VAE configuration(s)" in samples

    flagged = sum(run.data.tags.get("posterior_collapse") == "true" for run in children(store)
                  if run.info.status == "FINISHED")
    [collapse] = [s for s in sentences if "posterior collapse" in s.lower()]
    assert (f"collapse in {flagged}/4 VAE runs" in collapse) if flagged else collapse.startswith("No posterior collapse")

    beats = sum(metrics["eval/mse_per_pixel"] < metrics["eval/pca_mse_per_pixel"] for metrics in vae.values())
    ae_runs = [run.data.metrics for run in children(store)
               if run.info.status == "FINISHED" and run.data.params["model.name"] == "ae"]
    ae_beats = np.mean([m["eval/mse_per_pixel"] for m in ae_runs]) < np.mean([m["eval/pca_mse_per_pixel"] for m in ae_runs])
    assert any(s.startswith(f"{beats + int(ae_beats)}/5 configurations beat their PCA baseline") for s in sentences)


def test_report_lists_what_is_missing_and_skipped(study_report):
    text = (study_report / "report.md").read_text()
    # two numeric swept params besides the seed: the heatmap is drawn, over those two
    assert "Heatmap: val/recon over model.latent_dim × loss.kl_weight" in text
    assert "Not drawn" not in text
    assert "Runs that did not finish" in text


# ----------------------------------------------------------------------------- other targets

def test_single_run_without_latents_or_model_still_reports(store, tmp_path):
    out = tmp_path / "lone"
    assert report.main(["--run", store["lone"], "--out", str(out), "--tracking-uri", store["uri"]]) == 0
    text = (out / "report.md").read_text()
    assert "# vae_lab report: lone_ae (single run)" in text
    assert "Runs: 1 — finished 1, failed 0" in text
    assert "Not drawn: no run has test latents" in text
    assert "no logged model" in text
    assert "Not drawn: no logged model could be loaded" in text
    assert "## The run's config" in text and "<details><summary>config.yaml (" in text
    table = comparison_rows(out)
    metrics = store["client"].get_run(store["lone"]).data.metrics
    assert table.iloc[0]["test/recon"] == f"{metrics['test/recon']:.2f}"
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    logged = {Path(item.path).name for item in store["client"].list_artifacts(store["lone"], "report")}
    assert {"index.html", "report.md", "runs.csv"} <= logged


def test_experiment_picks_the_newest_study(store, tmp_path, monkeypatch):
    client = store["client"]
    assert newest_study_id(client, "vae_lab") == store["parent"]
    study = load_study(store["uri"], store["parent"])
    assert study.is_study and study.name == STUDY and len(study.runs) == len(TRIALS)
    assert study.config_params == ["model.name", "model.latent_dim", "loss.kl_weight"]


def test_study_picks_the_newest_parent_of_that_name(store):
    # what `make sweep` reports: its own study, even when another one is newer
    client = store["client"]
    elsewhere = client.create_experiment("elsewhere_by_name")
    newer = client.create_run(elsewhere, tags={"vae_lab.role": "study", "vae_lab.study_name": "newer"}).info.run_id
    client.set_terminated(newer, "FINISHED")
    assert newest_parent_of(client, STUDY) == store["parent"]
    assert newest_parent_of(client, "newer") == newer
    with pytest.raises(ReportInputError, match=f"no study named 'nope'.*{STUDY}"):
        newest_parent_of(client, "nope")


def test_unknown_experiment_or_run_exits_2_with_one_line(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert report.main(["--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "no experiment named 'nope'" in error[0] and "vae_lab" in error[0]

    assert report.main(["--run", "0123456789abcdef", "--tracking-uri", store["uri"]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "no run '0123456789abcdef'" in error[0] and store["parent"] in error[0]

    assert report.main(["--study", "nope", "--tracking-uri", store["uri"]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no study named 'nope'" in error[0]

    store["client"].create_experiment("no_studies_here")
    assert report.main(["--experiment", "no_studies_here", "--tracking-uri", store["uri"]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "has no study" in error[0]
    assert not (tmp_path / "reports").exists()


def test_missing_store_is_refused_without_creating_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "absent" / "mlflow.db"
    assert report.main(["--experiment", "vae_lab", "--tracking-uri", f"sqlite:///{database}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no MLflow store at" in error[0]
    assert not database.exists() and not (tmp_path / "reports").exists()


def test_command_line_without_a_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([])
    assert exit_info.value.code == 2
    assert "one of the arguments --experiment --run --study is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- select on val, report on test

SELECTION_STUDY = "val_selects_test_reports"
EPOCHS, STEPS_PER_EPOCH = 3, 10
# (model, latent size, seed, val (recon, kl) of the kept weights, test (recon, kl), early stopped):
# val and test disagree on purpose. linear_vae latent 4 has the best single val/elbo run (-99) and
# the best test/elbo, but latent 2 has the best val/elbo mean over seeds (-102 against -103; -104.5
# if its early-stopped run were read at its last epoch instead of its kept weights). ae latent 4
# wins on test/recon, latent 2 on val/recon; linear_vae beats ae on test/recon, ae beats it on val/recon.
SYNTHETIC_TRIALS = [
    ("ae", 2, 0, (80.0, None), (90.0, None), False),
    ("ae", 2, 1, (82.0, None), (90.0, None), False),
    ("ae", 4, 0, (85.0, None), (70.0, None), False),
    ("ae", 4, 1, (85.0, None), (70.0, None), False),
    ("linear_vae", 2, 0, (95.0, 5.0), (62.0, 48.0), True),
    ("linear_vae", 2, 1, (98.0, 6.0), (62.0, 48.0), False),
    ("linear_vae", 4, 0, (93.0, 6.0), (60.0, 30.0), False),
    ("linear_vae", 4, 1, (101.0, 6.0), (60.0, 30.0), False),
]


def split_metrics(split: str, recon: float, kl: float | None) -> dict[str, float]:
    """What the engine logs for a split: an AE's loss is its recon; a VAE (KL weight 1) adds kl and elbo."""
    if kl is None:
        return {f"{split}/loss": recon, f"{split}/recon": recon}
    return {f"{split}/loss": recon + kl, f"{split}/recon": recon, f"{split}/kl": kl, f"{split}/elbo": -(recon + kl)}


def log_synthetic_trial(client: MlflowClient, experiment_id: str, parent_id: str, number: int,
                        model: str, latent: int, seed: int, val: tuple, test: tuple, early_stopped: bool) -> str:
    """A finished trial as the engine logs it: train/loss by step, val/* and `epoch` at each epoch's
    last step, test/* once at the end. val/loss falls to `val` at the best epoch; an early-stopped
    trial trains one epoch past it (val 5 nats worse), then its kept weights' val/* are logged
    again at the last step, later, as the engine does when it restores them."""
    run_id = client.create_run(experiment_id, run_name=f"trial-{number}", tags={
        "mlflow.parentRunId": parent_id, "vae_lab.role": "trial", "vae_lab.study_name": SELECTION_STUDY,
        "vae_lab.trial_number": str(number), "model": model}).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("train/loss", 200.0 - step, now, step) for step in range(0, EPOCHS * STEPS_PER_EPOCH, 5)]
    kept_val = split_metrics("val", *val)
    best_epoch = EPOCHS - 1 if early_stopped else EPOCHS
    for epoch in range(1, EPOCHS + 1):
        step = epoch * STEPS_PER_EPOCH - 1
        if epoch > best_epoch:
            epoch_val = split_metrics("val", val[0] + 5.0, val[1])
        else:
            epoch_val = {**kept_val, "val/loss": kept_val["val/loss"] + 10.0 * (best_epoch - epoch)}
        metrics += [Metric("epoch", epoch, now, step)]
        metrics += [Metric(key, value, now, step) for key, value in epoch_val.items()]
    last_step = EPOCHS * STEPS_PER_EPOCH - 1
    end = {**split_metrics("test", *test), **(kept_val if early_stopped else {})}
    metrics += [Metric(key, value, now + 1, last_step) for key, value in end.items()]
    params = {"model.name": model, "model.latent_dim": str(latent), "train.seed": str(seed), "loss.kl_weight": "1.0"}
    client.log_batch(run_id, metrics=metrics, params=[Param(key, value) for key, value in params.items()],
                     tags=[RunTag("dataset", "mnist5k")])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def selection_report(tmp_path_factory):
    """A synthetic study whose val/* and test/* disagree, and its report; built once."""
    folder = tmp_path_factory.mktemp("selection")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, "selection", uri)
    parent_id = client.create_run(experiment_id, run_name=SELECTION_STUDY, tags={
        "vae_lab.role": "study", "vae_lab.study_name": SELECTION_STUDY,
        "vae_lab.swept_params": "model.name,model.latent_dim,train.seed"}).info.run_id
    for number, trial in enumerate(SYNTHETIC_TRIALS):
        log_synthetic_trial(client, experiment_id, parent_id, number, *trial)
    client.set_terminated(parent_id, "FINISHED")
    out = folder / "report"
    assert report.main(["--run", parent_id, "--out", str(out), "--tracking-uri", uri]) == 0
    return {"uri": uri, "parent": parent_id, "client": client, "out": out}


def test_star_rows_follow_the_validation_mean_not_test(selection_report):
    table = comparison_rows(selection_report["out"])
    stars = table[table[""] == "★"]
    # by test/* (or by the single best val/elbo run) the ★ would be on latent 4 in both families
    assert sorted(zip(stars["family"], stars["model.latent_dim"])) == [("ae", "2"), ("linear_vae", "2")]
    text = (selection_report["out"] / "report.md").read_text()
    assert ("★ = the best configuration of each model family on validation, by the mean over its seeds of "
            "ae: val/recon (min); linear_vae: val/elbo (max). The test/* and eval/* columns are reported, "
            "not used to choose.") in text
    vae_star = stars[stars["family"] == "linear_vae"].iloc[0]
    assert vae_star["val/elbo"].startswith("-102.0 ± ") and vae_star["test/elbo"] == "-110.00 ± 0.00"


def test_findings_decide_on_validation_and_label_their_numbers(selection_report):
    sentences = findings_of(selection_report["out"])
    assert ("Best linear_vae configuration by val/elbo (max), mean over seeds [95% interval]: linear_vae, "
            "latent_dim=2 (val/elbo -102.0 [-104.0, -100.0]; reported test/elbo -110.0).") in sentences
    [winner] = [s for s in sentences if " beats " in s]
    assert winner.startswith("ae beats linear_vae on validation reconstruction loss (val/recon) by 15.5 nats "
                             "(best configuration of each, mean over seeds: 81.0 vs 96.5; 95% interval "
                             "[15.0, 16.0], paired over 2 shared seeds; ae better in 100% of resamples")
    assert "; their test/recon: 90.0 vs 62.0 (difference 28.00 [28.00, 28.00]" in winner
    [ae_trend] = [s for s in sentences if s.endswith(".") and "for ae" in s]
    assert ae_trend.startswith("Validation reconstruction (val/recon) gets worse at every step of latent size")
    assert any("validation rate–distortion Pareto front" in s for s in sentences)
    assert any(s.startswith("Seed-to-seed spread") and "val/recon" in s for s in sentences)


def test_intervals_and_differences_are_paired_by_seed(selection_report):
    means, differences = markdown_tables(selection_report["out"], "Intervals and paired differences")
    means = means.set_index("configuration")
    # ae latent 2: val/recon 80 and 82 over seeds 0 and 1; linear_vae latent 2: val/elbo -100 and -104
    assert means.loc["ae, latent_dim=2", "val/recon"] == "81.0 [80.0, 82.0]"
    assert means.loc["linear_vae, latent_dim=2", "val/elbo"] == "-102.0 [-104.0, -100.0]"
    assert means.loc["linear_vae, latent_dim=2", "test/elbo"] == "-110.00 [-110.00, -110.00]"
    assert means.loc["ae, latent_dim=2", ""] == "★" and means.loc["ae, latent_dim=4", ""] == ""
    assert len(differences) == 6  # four configurations: every pair
    pair = differences[(differences["A"] == "ae, latent_dim=2") & (differences["B"] == "ae, latent_dim=4")].iloc[0]
    # seed by seed: 80 - 85 and 82 - 85 on val/recon; 90 - 70 on test/recon for both seeds
    assert (pair["compared on"], pair["seeds"], pair["A − B [95% interval]"], pair["P(A better)"], pair["call"]) == \
        ("val/recon", "paired over 2 shared seeds", "-4.0 [-5.0, -3.0]", "100%", "A better")
    assert pair["reported: test A − B"] == "test/recon: 20.00 [20.00, 20.00]"
    # linear_vae latent 2 against 4 on val/elbo: seed 0 -100 vs -99, seed 1 -104 vs -107: not resolved
    vae = differences[differences["A"] == "linear_vae, latent_dim=2"].iloc[-1]
    assert vae["B"] == "linear_vae, latent_dim=4" and vae["compared on"] == "val/elbo"
    assert vae["A − B [95% interval]"] == "1.0 [-1.0, 3.0]"
    assert vae["call"] == ("not resolved: about 34 seeds would be needed for the interval to exclude zero if the "
                           "observed difference and spread held")  # t(0.975, 33) * 2.83 / sqrt(34) < 1
    mixed = differences[(differences["A"] == "ae, latent_dim=2") & (differences["B"] == "linear_vae, latent_dim=2")]
    assert mixed.iloc[0]["compared on"] == "val/recon"  # an AE has no ELBO: the two share val/recon


def test_plots_draw_validation_curves_and_the_validation_front(selection_report):
    study = load_study(selection_report["uri"], selection_report["parent"])
    histories = plots.learning_histories(study.client, study.runs)
    assert set(histories["curve"]) == {plots.EPOCH_CURVE, plots.STEP_CURVE} == {"val/loss by epoch",
                                                                                  "train/loss by step"}
    by_epoch = histories[histories["curve"] == plots.EPOCH_CURVE]
    assert by_epoch.groupby("run_id")["x"].apply(list).map(lambda xs: xs == [1.0, 2.0, 3.0]).all()
    # the early-stopped run's curve ends at its last epoch's own val/loss, not the re-logged kept one
    stopped = by_epoch[by_epoch["label"] == "linear_vae, latent_dim=2"].groupby("run_id")["value"].apply(list)
    assert sorted(stopped.tolist()) == [[110.0, 100.0, 105.0], [124.0, 114.0, 104.0]]
    text = (selection_report["out"] / "report.md").read_text()
    assert "### Rate–distortion (validation)" in text and "Heatmap" in text
    assert (selection_report["out"] / "learning_curves.png").is_file()


def test_single_seed_configurations_get_no_difference_table():
    runs = pd.DataFrame({"label": ["a", "b"], "family": ["ae", "ae"], "params.train.seed": ["0", "0"],
                         "metrics.val/recon": [90.0, 95.0]})
    summary = pd.DataFrame({"label": ["a", "b"], "family": ["ae", "ae"], "runs": [1, 1], "best": [True, False],
                            "ranked_metric": ["val/recon"] * 2, "val/recon mean": [90.0, 95.0],
                            "val/recon std": [np.nan, np.nan]})
    section = report.intervals_section(summary, runs)
    tables = [block for block in section.blocks if type(block).__name__ == "Table"]
    assert len(tables) == 1 and tables[0].frame["val/recon"].tolist() == ["90.00 (one seed: no interval)",
                                                                          "95.00 (one seed: no interval)"]
    assert "Every configuration ran one seed" in section.blocks[-1].text
