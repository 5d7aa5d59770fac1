"""`python -m analysis.compare A B` on two real tiny studies in a temporary MLflow store.

The arms differ in their learning rate (the ablation); A sweeps the model over ae and
linear_vae, B only linear_vae, both at seeds 0 and 1, so one configuration matches, paired by
seed, and A's ae has no counterpart.
"""

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import compare
from conftest import TINY_RUN
from vae_lab.config import load_config
from vae_lab.data.datasets import load_data
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store
from vae_lab.train import train

ARMS = {"arm_a": ("train.lr=1e-3", ["ae", "linear_vae"]), "arm_b": ("train.lr=3e-3", ["linear_vae"])}


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    common = [*TINY_RUN, f"tracking.uri={uri}", "train.epochs=2", "device=cpu", "data.binarize=dynamic",
              "tracking.log_images=false"]
    data = load_data(load_config(None, common).data, "cpu")
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, "vae_lab", uri)
    parents = {}
    for name, (lr, models) in ARMS.items():
        parent = client.create_run(experiment_id, run_name=name, tags={
            "vae_lab.role": "study", "vae_lab.study_name": name,
            "vae_lab.swept_params": "model.name,train.seed", "vae_lab.sampler": "grid"}).info.run_id
        for model in models:
            for seed in (0, 1):
                config = load_config(None, [*common, lr, f"model.name={model}", f"train.seed={seed}"])
                train(config, parent_run_id=parent, data=data,
                      tags={"vae_lab.role": "trial", "vae_lab.study_name": name})
        client.set_terminated(parent, "FINISHED")
        parents[name] = parent
    out = folder / "page"
    assert compare.main(["arm_a", parents["arm_b"], "--out", str(out), "--tracking-uri", uri]) == 0
    return {"uri": uri, "client": client, "parents": parents, "out": out}


def metrics_by_seed(client, parent: str, model: str, key: str) -> dict[str, float]:
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {run.data.params["train.seed"]: run.data.metrics[key] for run in runs
            if run.data.params["model.name"] == model}


def test_page_matches_configurations_and_pairs_them_by_seed(arms):
    out = arms["out"]
    assert {"index.html", "compare.md", "differences.csv", "learning_curves.png"} <= {p.name for p in out.iterdir()}
    differences = pd.read_csv(out / "differences.csv")
    assert set(differences["configuration"]) == {"linear_vae"}  # ae is only in A
    elbo = differences[differences["metric"] == "val/elbo"].iloc[0]
    a = metrics_by_seed(arms["client"], arms["parents"]["arm_a"], "linear_vae", "val/elbo")
    b = metrics_by_seed(arms["client"], arms["parents"]["arm_b"], "linear_vae", "val/elbo")
    paired = np.mean([a[seed] - b[seed] for seed in ("0", "1")])
    assert elbo["seeds"] == "paired over 2 shared seeds"
    shown = elbo["A − B [95% interval]"].split(" [")[0]  # rounded to what its interval supports
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    assert float(shown) == pytest.approx(paired, abs=0.5 * 10 ** -decimals + 1e-9)
    assert elbo["reported: test A − B"].startswith("test/elbo: ")
    deltas = [a[seed] - b[seed] for seed in ("0", "1")]
    resolved = deltas[0] * deltas[1] > 0  # two seeds: the percentile interval spans exactly the two deltas
    expected = ("A better" if paired > 0 else "B better") if resolved else "not resolved: "  # val/elbo: higher wins
    assert elbo["call"].startswith(expected)
    text = (out / "compare.md").read_text()
    assert "| train.lr | 0.001 | 0.003 |" in text  # what the ablation changes
    assert "only in A: ae" in text
    assert "1 configuration(s) are in both studies" in text
    # the findings count the table's calls, metric by metric
    for metric, rows in differences.groupby("metric"):
        calls = list(rows["call"])
        with_interval = [call for call in calls if not call.startswith("no interval")]
        if with_interval:
            assert (f"On {metric}: A is better in {calls.count('A better')}, B in {calls.count('B better')}, "
                    f"and {sum(call.startswith('not resolved') for call in calls)} are not resolved") in text


def test_page_sets_sample_quality_beside_rate_and_distortion(arms):
    text = (arms["out"] / "compare.md").read_text()
    section = text.split("## Rate, distortion and sample quality", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| linear_vae |")]
    assert [row.split(" | ")[1] for row in rows] == ["test/recon", "test/kl", "eval/fd_classifier"]
    a = metrics_by_seed(arms["client"], arms["parents"]["arm_a"], "linear_vae", "eval/fd_classifier")
    b = metrics_by_seed(arms["client"], arms["parents"]["arm_b"], "linear_vae", "eval/fd_classifier")
    cells = rows[2].split(" | ")

    def shown_near(cell, value):  # the mean as rounded to what its interval supports
        shown = cell.split(" [")[0]
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        return abs(float(shown) - value) <= 0.5 * 10 ** -decimals + 1e-9

    assert shown_near(cells[2], np.mean(list(a.values())))
    assert shown_near(cells[4], np.mean([a[seed] - b[seed] for seed in a]))
    assert cells[5].startswith("paired over 2 shared seeds")


def test_page_overlays_curves_and_reconstructs_the_same_images(arms):
    out = arms["out"]
    with Image.open(out / "learning_curves.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    with Image.open(out / "reconstructions.png") as image:
        assert image.size[1] > 100  # original, A and B rows
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "Learning curves, A (solid) against B (dashed)" in html


@pytest.mark.parametrize("given, words", [
    (["arm_a"], "exactly two studies"),
    (["arm_a", "arm_b", "arm_a"], "exactly two studies"),
    (["arm_a", "arm_a"], "are the same study"),
    (["arm_a", "nope"], "no study named 'nope'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(arms, tmp_path, capsys, given, words):
    out = tmp_path / "page"
    assert compare.main([*given, "--out", str(out), "--tracking-uri", arms["uri"]]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and words in error
    if words.startswith("no study"):
        assert "studies in this store: " in error and arms["parents"]["arm_a"] in error
    assert not out.exists()


def test_a_study_name_with_a_quote_is_unknown_not_a_crash(arms, capsys):
    assert compare.main(["it's", "arm_a", "--tracking-uri", arms["uri"]]) == 2
    assert "no study named \"it's\"" in capsys.readouterr().err
