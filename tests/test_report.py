"""`python -m analysis.report` on a real tiny study in a temporary MLflow store.

The study is built by hand exactly as the sweep contract says (a parent run with the study
tags and `study/study.yaml`, children trained by `vae_lab.train.train`), once per module:
ae at two seeds, linear_vae over latent size x KL weight, one trial that fails and one that
is pruned, all on a slice of mnist5k with dynamic binarization (so eval/nll_iwae exists).
Beside it, one stand-alone run without images, latents or a model.
"""

import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import report
from analysis.runs import load_study, newest_study_id
from conftest import TINY_RUN
from vae_lab.config import load_config
from vae_lab.data import load_data
from vae_lab.tracking import get_or_create_experiment, prepare_store
from vae_lab.train import train

STUDY = "tiny_report_study"
SWEPT = "model.name,model.latent_dim,loss.kl_weight,train.seed"
STUDY_YAML = f"""study:
  name: {STUDY}
  sampler: grid
  objectives:
    - {{metric: test/recon, direction: minimize}}
    - {{metric: test/kl, direction: minimize}}
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
        "vae_lab.objectives": "test/recon:minimize,test/kl:minimize", "vae_lab.sampler": "grid"})
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
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    page = (study_report / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(pngs)  # every figure inline, nothing fetched from elsewhere
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    markdown = (study_report / "report.md").read_text()
    assert all(f"]({png.name})" in markdown for png in pngs)


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
    assert "Objectives: test/recon (minimize), test/kl (minimize)" in text
    assert "TrialBroke: simulated crash after epoch 1" in text
    assert "search_space:\n  model.name: [ae, linear_vae]" in text
    assert "Device: cpu (8 runs)" in text


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


def comparison_rows(folder: Path) -> pd.DataFrame:
    text = (folder / "report.md").read_text()
    section = text.split("## Comparison", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return pd.DataFrame(split[2:], columns=split[0])


def test_comparison_table_matches_the_runs(store, study_report):
    table = comparison_rows(study_report)
    finished = [run for run in children(store) if run.info.status == "FINISHED"]
    assert len(table) == 5  # ae x 1 (two seeds) + linear_vae x 4; failed and pruned runs left out

    ae = [run.data.metrics["test/recon"] for run in finished if run.data.params["model.name"] == "ae"]
    ae_row = table[table["family"] == "ae"].iloc[0]
    assert ae_row["runs"] == "2"
    assert ae_row["test/recon"] == f"{np.mean(ae):.2f} ± {np.std(ae, ddof=1):.2f}"

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

    # a ★ on exactly one row per family: for linear_vae the highest mean test ELBO
    stars = table[table[""] == "★"]
    assert sorted(stars["family"]) == ["ae", "linear_vae"]
    vaes = [run for run in finished if run.data.params["model.name"] == "linear_vae"]
    best = max(vaes, key=lambda run: run.data.metrics["test/elbo"])
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
        kl_change = 100 * (high["test/kl"] - low["test/kl"]) / abs(low["test/kl"])
        recon_change = 100 * (high["test/recon"] - low["test/recon"]) / abs(low["test/recon"])
        kl_words = f"{'cut' if kl_change < 0 else 'raised'} KL by {abs(kl_change):.0f}%"
        recon_words = f"{'raised' if recon_change > 0 else 'lowered'} reconstruction loss by {abs(recon_change):.0f}%"
        expected = f"linear_vae (latent_dim={latent}): KL weight 10 {kl_words} and {recon_words} compared with KL weight 1"
        assert any(sentence.startswith(expected) for sentence in sentences), expected

    for kl_weight in (1.0, 10.0):
        improved = vae[("4", kl_weight)]["test/recon"] < vae[("2", kl_weight)]["test/recon"]
        [trend] = [s for s in sentences if s.startswith("Reconstruction") and f"kl_weight={kl_weight:g})" in s]
        assert ("(1/1 step;" in trend) == improved
        assert ("gets worse" in trend) == (not improved)

    [iwae] = [s for s in sentences if s.startswith("eval/nll_iwae (")]
    assert "computed for 4 run(s)" in iwae
    lowest = min(metrics["eval/nll_iwae"] for metrics in vae.values())
    assert f"lowest {lowest:.1f} nats/image" in iwae
    assert any("does not apply to the 2 plain autoencoder run(s)" in s for s in sentences)

    flagged = sum(run.data.tags.get("posterior_collapse") == "true" for run in children(store)
                  if run.info.status == "FINISHED")
    [collapse] = [s for s in sentences if "posterior collapse" in s.lower()]
    assert (f"flagged in {flagged}/4 VAE runs" in collapse) if flagged else collapse.startswith("No posterior collapse")

    beats = sum(metrics["eval/mse_per_pixel"] < metrics["eval/pca_mse_per_pixel"] for metrics in vae.values())
    ae_runs = [run.data.metrics for run in children(store)
               if run.info.status == "FINISHED" and run.data.params["model.name"] == "ae"]
    ae_beats = np.mean([m["eval/mse_per_pixel"] for m in ae_runs]) < np.mean([m["eval/pca_mse_per_pixel"] for m in ae_runs])
    assert any(s.startswith(f"{beats + int(ae_beats)}/5 configurations beat their PCA baseline") for s in sentences)


def test_report_lists_what_is_missing_and_skipped(study_report):
    text = (study_report / "report.md").read_text()
    # two numeric swept params besides the seed: the heatmap is drawn, over those two
    assert "Heatmap: test/recon over model.latent_dim × loss.kl_weight" in text
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
    assert "The run's config.yaml:" in text
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
    assert "one of the arguments --experiment --run is required" in capsys.readouterr().err
