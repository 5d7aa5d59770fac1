"""Study files: parsing, expansion of points/seeds, and bad files refused before anything exists."""

from pathlib import Path

import optuna
import pytest
import yaml

from conftest import run_in_fresh_process
from vae_lab import sweep
from vae_lab.config import ConfigError
from vae_lab.study.spec import load_study_spec, parse_study, point_key

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_points_and_seeds_expand_as_points_times_axes_times_seeds():
    spec = parse_study({
        "study": {"sampler": "grid"},
        "search_space": {
            "points": [{"model.hidden_dims": [32], "model.latent_dim": 4},
                       {"model.hidden_dims": [64], "model.latent_dim": 8}],
            "loss.kl_weight": [0.5, 1.0],
            "seeds": [0, 1, 2],
        },
    })
    points = spec.grid_points()
    assert len(points) == 2 * 2 * 3
    assert points[:3] == [{"model.hidden_dims": [32], "model.latent_dim": 4, "loss.kl_weight": 0.5,
                           "train.seed": seed} for seed in (0, 1, 2)]
    pairs = {(tuple(p["model.hidden_dims"]), p["model.latent_dim"]) for p in points}
    assert pairs == {((32,), 4), ((64,), 8)}  # paired values stay paired
    assert len({point_key(p) for p in points}) == len(points)
    assert spec.swept_keys() == ["loss.kl_weight", "model.hidden_dims", "model.latent_dim", "train.seed"]
    config = spec.trial_config(points[-1])
    assert (config.model.hidden_dims, config.model.latent_dim, config.train.seed) == ([64], 8, 2)


def test_overrides_reach_study_base_and_search_space(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("study: {sampler: tpe, n_trials: 3}\nsearch_space:\n  loss.kl_weight: {low: 1e-2, high: 10, log: true}\n")
    spec = load_study_spec(path, ["study.n_trials=40", "base.train.epochs=20", "search_space.model.latent_dim=[2,8]"])
    assert spec.n_trials == 40 and spec.base_config().train.epochs == 20
    assert spec.space["loss.kl_weight"].low == 0.01 and spec.space["loss.kl_weight"].log  # 1e-2 is a number
    assert spec.space["model.latent_dim"].values == (2, 8)
    assert spec.name == "s"


@pytest.mark.parametrize("name", sorted(path.name for path in EXPERIMENTS.glob("*.yaml")))
def test_shipped_study_files_are_valid(name):
    spec = load_study_spec(EXPERIMENTS / name)
    assert spec.swept_keys()
    if spec.is_grid:
        assert all(spec.trial_config(point) for point in spec.grid_points())


def test_shipped_study_files_say_what_the_brief_asks():
    nas = load_study_spec(EXPERIMENTS / "seed000_nas.yaml").grid_points()
    assert [(p["model.hidden_dims"], p["model.latent_dim"]) for p in nas] == \
        [([32], 4), ([64], 8), ([128], 16), ([256], 32), ([512], 64)]
    kl = load_study_spec(EXPERIMENTS / "seed001_kl.yaml")
    configs = [kl.trial_config(p) for p in kl.grid_points()]
    assert [c.model.name for c in configs] == ["ae", "linear_vae", "linear_vae", "conv_ae", "conv_vae"]
    assert [c.loss.kl_weight for c in configs[1:3]] == [1.0, 100.0] and configs[1].model.latent_dim == 2
    assert (configs[4].loss.kl_weight, configs[4].model.latent_layout, configs[4].model.latent_dim,
            configs[4].data.resize) == (0.8, "cube", 64, 32)
    assert {c.loss.likelihood for c in configs} == {"gaussian"}  # the seed's summed squared error
    optuna_study = load_study_spec(EXPERIMENTS / "latent_kl_optuna.yaml")
    assert [str(o) for o in optuna_study.objectives] == ["val/recon:minimize", "val/kl:minimize"]
    assert optuna_study.sampler == "tpe" and optuna_study.pruner == "none"
    assert optuna_study.space["loss.kl_weight"].log
    assert load_study_spec(EXPERIMENTS / "fashion_mnist.yaml").base_config().data.name == "fashion-mnist"


GOOD = {"study": {"name": "bad", "sampler": "grid"}, "base": {"train": {"epochs": 1}},
        "search_space": {"model.latent_dim": [2, 4]}}
BAD_FILES = {
    "unknown base key": ({"base": {"train": {"epochz": 1}}}, "train.epochz"),
    "unknown search key": ({"search_space": {"model.latent_size": [2]}}, "model.latent_size"),
    "continuous range under grid": ({"search_space": {"loss.kl_weight": {"low": 0.1, "high": 1.0}}},
                                    "continuous range"),
    "empty space": ({"search_space": {}}, "empty"),
    "empty list": ({"search_space": {"model.latent_dim": []}}, "empty list"),
    "unknown sampler": ({"study": {"name": "bad", "sampler": "bayes"}}, "bayes"),
    "unknown metric": ({"study": {"name": "bad", "sampler": "grid", "objectives": ["val/rec"]}}, "val/rec"),
    "metric an AE does not log": ({"study": {"name": "bad", "sampler": "grid", "objectives": ["val/kl"]},
                                   "search_space": {"model.name": ["ae", "linear_vae"]}}, "val/kl"),
    "pruning two objectives": ({"study": {"name": "bad", "sampler": "tpe", "n_trials": 2, "pruner": "median",
                                          "objectives": ["val/recon", "val/kl"]}}, "single objective"),
    "test objective": ({"study": {"name": "bad", "sampler": "grid", "objectives": ["test/recon"]}},
                       "test/recon is scored on the test split"),
    "eval objective": ({"study": {"name": "bad", "sampler": "grid",
                                  "objectives": [{"metric": "eval/probe_accuracy", "direction": "maximize"}]}},
                       "eval/probe_accuracy is scored on the test split"),
    "no validation split": ({"base": {"data": {"val_size": 0}}}, "base.data.val_size=0"),
    "bad validation size": ({"base": {"data": {"val_size": 2.5}}}, "data.val_size"),
    "negative patience": ({"base": {"train": {"early_stopping_patience": -2}}}, "train.early_stopping_patience"),
    "bad value in a point": ({"search_space": {"points": [{"model.name": "vae"}]}}, "model.name"),
    "unknown section": ({"studies": {}}, "studies"),
    "infinite bound": ({"study": {"name": "bad", "sampler": "tpe", "n_trials": 2},
                        "search_space": {"loss.kl_weight": {"low": 0.1, "high": float("inf")}}}, "finite"),
    "grid over the cap": ({"search_space": {"model.latent_dim": list(range(2, 202)),
                                            "loss.kl_weight": [0.1 * i for i in range(1, 101)]}},
                          "the grid has 20,000 points, more than study.max_grid_points=10,000"),
    "cap not a count": ({"study": {"name": "bad", "sampler": "grid", "max_grid_points": 0}},
                        "study.max_grid_points"),
    "infinite step": ({"study": {"name": "bad", "sampler": "tpe", "n_trials": 2},
                       "search_space": {"loss.kl_weight": {"low": 0.1, "high": 2.0, "step": float("inf")}}},
                      "step must be a positive number"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_exits_2_with_one_line_and_creates_nothing(case, tmp_path, capsys):
    change, expected = BAD_FILES[case]
    document = {**GOOD, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    store = tmp_path / "store"
    code = sweep.main([str(path), "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("error:") and expected in error
    assert not store.exists()  # no MLflow store, no Optuna study


def test_bad_override_is_refused(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    with pytest.raises(ConfigError, match="must start with one of"):
        load_study_spec(path, ["train.epochs=3"])
    assert sweep.main([str(path), "study.n_trials=-1", "--tracking-uri", f"sqlite:///{tmp_path}/s/m.db"]) == 2
    assert "study.n_trials" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_default_journal_belongs_to_one_mlflow_store(tmp_path):
    """Beside an SQLite store; for a server or database store, a file named after the store
    (without its password): two stores never share a journal, one store keeps one."""
    import optuna

    from vae_lab.study.storage import default_storage_url, open_storage

    assert default_storage_url(f"sqlite:///{tmp_path}/a/mlflow.db", tmp_path / "elsewhere", "s") == \
        f"journal:///{tmp_path}/a/optuna.journal"
    one = default_storage_url("postgresql://alice:first@db/mlflow", tmp_path, "s")
    again = default_storage_url("postgresql://alice:second@db/mlflow", tmp_path, "s")
    other = default_storage_url("postgresql://alice:first@db2/mlflow", tmp_path, "s")
    server = default_storage_url("http://127.0.0.1:5000", tmp_path, "s")
    assert one == again and len({one, other, server}) == 3 and "first" not in one
    assert all(url.startswith(f"journal:///{tmp_path}/optuna-") and url.endswith(".journal")
               for url in (one, other, server))
    # a study an older vae_lab kept in the shared optuna.journal is resumed there
    shared = f"journal:///{tmp_path / 'optuna.journal'}"
    optuna.create_study(study_name="old", storage=open_storage(shared))
    assert default_storage_url("http://127.0.0.1:5000", tmp_path, "old") == shared
    assert default_storage_url("http://127.0.0.1:5000", tmp_path, "new") == server


def test_a_file_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("study: {name: deep, sampler: grid}\nbase:\n  train: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n")
    code = sweep.main([str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 's' / 'm.db'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert error == f"error: {path}: the YAML nests more than 32 levels deep (allowed: 32; a config nests 4)"


@pytest.mark.parametrize("name, value", [("VAE_LAB_STORE_PATIENCE_SECONDS", "soon"),
                                         ("VAE_LAB_STORE_PATIENCE_SECONDS", "-1"),
                                         ("VAE_LAB_HEARTBEAT_SECONDS", "0.1")])
def test_a_bad_duration_in_the_environment_is_one_line(tmp_path, capsys, monkeypatch, name, value):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv(name, value)
    assert sweep.main([str(path), "--tracking-uri", f"sqlite:///{tmp_path / 's' / 'm.db'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"error: ${name}=")
    assert not (tmp_path / "s").exists()


def test_a_large_grid_is_planned_and_queued_a_slice_at_a_time(tmp_path, tracking_uri, capsys):
    """20,000 points (the cap raised): --dry-run lists the first 1,000; the sweep queues 256
    points, not 20,000, before its first trial trains (study.timeout ends it after one batch)."""
    from test_sweep import write_study
    from vae_lab.study.claims import ENQUEUE_AHEAD
    from vae_lab.study.storage import open_storage

    space = {"model.latent_dim": list(range(2, 202)), "loss.kl_weight": [0.1 * i for i in range(1, 101)]}
    path = write_study(tmp_path / "large.yaml", "large", space, study={"max_grid_points": 20_000, "timeout": 1})
    assert sweep.main([str(path), "--dry-run", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "20,000 grid points, the first 1000 in " in out and "... and 19,000 more" in out
    assert sweep.main([str(path), "--tracking-uri", tracking_uri]) == 0
    journal = Path(tracking_uri.removeprefix("sqlite:///")).parent / "optuna.journal"
    trials = optuna.load_study(study_name="large", storage=open_storage(f"journal:///{journal}")).get_trials()
    done = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert done and len(trials) <= ENQUEUE_AHEAD + len(done)
    assert {trial.user_attrs["vae_lab.point"] for trial in done} <= {
        trial.user_attrs["vae_lab.point"] for trial in trials[:ENQUEUE_AHEAD]}  # the grid's first slice


def test_a_helper_worker_imports_neither_the_summary_s_charts_nor_its_importances():
    """A `--workers` helper (or a Slurm array task before its end) never writes the summary: the
    modules of its charts (matplotlib) and fANOVA importances (scikit-learn) load only for it."""
    run_in_fresh_process(
        "import sys\n"
        "import vae_lab.study.runner, vae_lab.sweep\n"
        "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'matplotlib', 'sklearn'})\n"
        "assert not loaded, loaded\n"
        "import vae_lab.study.summary\n"
        "assert {'matplotlib', 'sklearn'} <= {name.split('.')[0] for name in sys.modules}\n")
