"""Your own components: a model family named by file or import path, its options checked against
its signature, its interface checked on two images before anything is created; and the shipped
example (experiments/components/residual_vae.py) through a whole study: batched trials, a kill -9
and a rerun, the report, vae_lab.evaluate from the run's logged copy of the file, and the serve page."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RUN
from test_crash_proof import SLOW_DIGITS, running_child_past_epoch, wait_for
from test_sweep import PYTHON, children, optuna_trials, run, runs_of, subprocess_env, tiny_base
from vae_lab import names
from vae_lab.components import Registry
from vae_lab.config import ConfigError, build_config, load_config
from vae_lab.models import Autoencoder, Prior, register_model
from vae_lab.models.components import build_model, check, is_variational
from vae_lab.models.registry import MODEL_FAMILIES

EXAMPLE = Path(__file__).parents[1] / "experiments" / "components" / "residual_vae.py"

BROKEN_DECODER = '''
import math
from torch import nn
from vae_lab.models import Autoencoder


class FlatVAE(Autoencoder):
    variational = True

    def __init__(self, image_shape, latent_dim, width):
        super().__init__(image_shape, latent_dim)
        pixels = math.prod(image_shape)
        self.encoder = nn.Linear(pixels, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, pixels)

    def encode_stats(self, x):
        return self.encoder(x.flatten(1))

    def decode(self, z):
        return self.decoder(z)  # forgot .view(-1, *self.image_shape)
'''

STUDENT_PRIOR = '''
import torch
from vae_lab.models import Prior


class StudentT(Prior):
    """A product of Student-t marginals with a learned scale."""

    def __init__(self, latent_dim, degrees=3.0):
        super().__init__()
        self.degrees = degrees
        self.log_scale = torch.nn.Parameter(torch.zeros(latent_dim))

    def _distribution(self):
        return torch.distributions.StudentT(self.degrees, 0.0, self.log_scale.exp())

    def log_prob(self, z, model=None):
        return self._distribution().log_prob(z).sum(-1)

    def sample(self, count, model=None, generator=None):
        noise = torch.distributions.StudentT(self.degrees).sample((count, self.log_scale.shape[0]))
        return noise.to(self.log_scale.device) * self.log_scale.exp()
'''


def train_command(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    store = tmp_path / "store"
    return subprocess.run([PYTHON, "-m", "vae_lab.train", *TINY_RUN, f"tracking.uri=sqlite:///{store}/mlflow.db",
                           *overrides], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=subprocess_env(f"sqlite:///{store}/mlflow.db"))


# ----------------------------------------------------------------------------- finding and checking

def test_a_file_component_is_relative_to_the_config_that_names_it(tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "models" / "mine.py")
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  name: models/mine.py:ResidualVAE\n  options: {blocks: 3, width: 32}\n")
    config = load_config(config_file)
    assert config.model.name == f"{tmp_path / 'models' / 'mine.py'}:ResidualVAE"
    assert config.flat()["model.options.blocks"] == 3  # logged and swept as a dotted key
    check(config)
    model = build_model(config.model, (1, 28, 28), config.prior)
    assert type(model).__name__ == "ResidualVAE" and is_variational(config)
    assert sum(module.__class__.__name__ == "ResidualBlock" for module in model.modules()) == 2 * 3
    assert model(torch.rand(5, 1, 28, 28)).logits.shape == (5, 1, 28, 28)


def test_an_import_path_and_a_registered_name_find_the_same_class(tmp_path, monkeypatch):
    package = tmp_path / "my_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, package / "residual.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = build_config(overrides=["model.name=my_models.residual:ResidualVAE", "model.options.blocks=1"])
    check(config)
    family = MODEL_FAMILIES.resolve("my_models.residual:ResidualVAE")
    registry = Registry("model", "model.name")  # a fresh one: the test leaves the real one as it was
    registry.register("residual", family)
    assert registry.resolve("residual") is family
    assert registry.names() == ["residual"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("residual", Autoencoder)


def test_ours_are_registered_as_a_users_would_be():
    assert set(MODEL_FAMILIES.names()) >= {"ae", "linear_vae", "conv_ae", "conv_vae"}
    for name in ("ae", "linear_vae", "conv_ae", "conv_vae"):
        assert issubclass(MODEL_FAMILIES.resolve(name), Autoencoder)
    assert register_model.__self__ is MODEL_FAMILIES  # the decorator the built-ins use is the public one


@pytest.mark.parametrize("overrides, expected", [
    (["model.name=my_vae"], "model.name='my_vae' is not a registered model; registered: ae, conv_ae, conv_vae, "
                            "linear_vae; or name your own as package.module:Class or path/to/file.py:Class"),
    (["model.name=no_such_package.models:VAE"], "model.name='no_such_package.models:VAE' could not be imported "
                                                "(ModuleNotFoundError: No module named 'no_such_package')"),
    (["model.name=json:loads"], "model.name='json:loads' is a function, not a model family"),
    (["model.name=missing.py:VAE"], "no file"),
    ([f"model.name={EXAMPLE}:Nope"], "residual_vae.py has no 'Nope'"),
    ([f"model.name={EXAMPLE}:ResidualVAE", "model.options.block=2"],
     "model.options.block is not an option of ResidualVAE; allowed: model.options.blocks, model.options.width"),
    ([f"model.name={EXAMPLE}:ResidualVAE", "model.options.latent_dim=2"], "model.options.latent_dim"),
    ([f"model.name={EXAMPLE}:ResidualVAE", "model.latent_layout=cube"], "model.latent_layout='cube' is not used"),
    ([f"model.name={EXAMPLE}:ResidualVAE", "model.options.blocks=-1"],
     "failed in building it on a batch of 2 images of shape [1, 28, 28] (ValueError: blocks must be 0 or more"),
    (["model.name=ae", "prior.name=mog"], "prior.name=mog needs a VAE"),
    (["prior.name=vampprior", "prior.options.temperature=2"], "prior.options.temperature is not an option of "
                                                              "vampprior"),
])
def test_a_component_that_cannot_be_used_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as error:
        check(build_config(overrides=overrides))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_class_that_breaks_the_interface_stops_the_run_before_anything_is_created(tmp_path):
    (tmp_path / "flat.py").write_text(BROKEN_DECODER)
    missing = train_command(tmp_path, "model.name=flat.py:FlatVAE")
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error: FlatVAE needs model.options.width (it has no default); "
                                      "allowed: model.options.width")
    result = train_command(tmp_path, "model.name=flat.py:FlatVAE", "model.options.width=8")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: model.name='{tmp_path / 'flat.py'}:FlatVAE': decode(z) gave [2, 784]; the interface wants "
        "[2, 1, 28, 28] (the README's 'Your own components')"]
    (tmp_path / "broken.py").write_text("import torch\nraise ImportError('the GPU extension is not built')\n")
    result = train_command(tmp_path, "model.name=broken.py:Anything")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("could not be imported (ImportError: the GPU extension is not built)")
    assert not (tmp_path / "store").exists()  # nothing created


def test_each_prior_names_itself_for_the_page():
    labels = {}
    for overrides in (["prior.name=standard_normal"], ["prior.name=mog", "prior.components=7"],
                      ["prior.name=vampprior", "prior.components=9"]):
        config = build_config(overrides=overrides)
        labels[config.prior.name] = build_model(config.model, (1, 28, 28), config.prior).prior.label
    assert labels == {"standard_normal": "N(0, I)", "mog": "mixture-of-7-Gaussians",
                      "vampprior": "VampPrior (9 pseudo-inputs)"}


def test_a_users_prior_trains_with_the_model_and_is_checked_like_ours(tmp_path):
    (tmp_path / "student.py").write_text(STUDENT_PRIOR)
    name = f"{tmp_path / 'student.py'}:StudentT"
    config = build_config(overrides=[f"prior.name={name}", "prior.options.degrees=5.0", "model.hidden_dims=[16]",
                                     "model.latent_dim=3"])
    check(config)
    model = build_model(config.model, (1, 28, 28), config.prior)
    assert model.prior.degrees == 5.0 and not model.prior.analytic_kl and model.prior.label == "StudentT"
    z = torch.randn(4, 3)
    expected = torch.distributions.StudentT(5.0).log_prob(z).sum(-1)
    torch.testing.assert_close(model.log_prior(z), expected)
    assert "model.prior.log_scale" in {f"model.{key}" for key in model.state_dict()}  # trains, checkpoints
    with pytest.raises(ConfigError, match="loss.free_bits clamps the KL of each latent dimension"):
        check(build_config(overrides=[f"prior.name={name}", "loss.free_bits=0.5"]))


# ----------------------------------------------------------------------------- the example, end to end

def test_the_example_through_a_study_a_kill_the_report_evaluate_and_serve(tmp_path, tracking_uri):
    from analysis import report
    from vae_lab.evaluate import main as evaluate
    from vae_lab.serve.app import create_app

    (tmp_path / "components").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "components" / "residual_vae.py")
    base = tiny_base(**SLOW_DIGITS, **{"train.epochs": 6, "data.binarize": "dynamic", "tracking.log_model": True})
    base.update({"model.name": "components/residual_vae.py:ResidualVAE", "model.latent_dim": 4,
                 "model.options": {"width": 32}})
    document = {"study": {"name": "residual", "sampler": "grid"}, "base": base,
                "search_space": {"model.options.blocks": [0, 2], "loss.kl_weight": [0.5, 1.0]}}
    path = tmp_path / "residual.yaml"
    path.write_text(yaml.safe_dump(document))

    process = subprocess.Popen([PYTHON, "-m", "vae_lab.sweep", str(path)], env=subprocess_env(tracking_uri),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent)
    killed_run = wait_for(lambda: running_child_past_epoch(tracking_uri, 2), process, what="epoch 2")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert run(path, tracking_uri) == 0

    runs = runs_of(tracking_uri)
    parent = runs[runs[names.ROLE_TAG] == "study"].iloc[0]["run_id"]
    kids = children(runs, parent)
    assert sorted(zip(kids["param:model.options.blocks"], kids["param:loss.kl_weight"])) == [
        ("0", "0.5"), ("0", "1.0"), ("2", "0.5"), ("2", "1.0")]  # each point once
    assert set(kids["status"]) == {"FINISHED"}
    assert set(kids[names.MODEL_TAG]) == {"ResidualVAE"}
    assert set(kids[names.BATCHED_TRIALS_TAG]) == {"2"}  # the two KL weights of a depth, one batch
    client = MlflowClient(tracking_uri)
    killed = client.get_run(killed_run)
    assert killed.info.status == "FINISHED" and int(killed.data.tags[names.RESUMED_FROM_TAG]) >= 2
    epochs = [metric.step for metric in client.get_metric_history(killed_run, names.VAL_LOSS)]
    assert epochs == sorted(set(epochs)) and len(epochs) == 6  # no epoch lost, none twice
    assert len([t for t in optuna_trials(tracking_uri, "residual") if t.state.name == "COMPLETE"]) == 4
    for run_id in kids["run_id"]:
        logged = [item.path for item in client.list_artifacts(run_id, names.COMPONENTS_ARTIFACT_DIR)]
        assert logged == [f"{names.COMPONENTS_ARTIFACT_DIR}/residual_vae.py"]

    out = tmp_path / "report"
    assert report.main(["--run", parent, "--out", str(out), "--tracking-uri", tracking_uri]) == 0
    page = (out / "index.html").read_text()
    assert "ResidualVAE" in page and "model.options.blocks" in page

    # the file is gone: what evaluates and serves the runs is the copy each run logged
    shutil.rmtree(tmp_path / "components")
    assert evaluate(["--study", "residual", "eval.iwae_samples=3", "--tracking-uri", tracking_uri]) == 0
    for run_id in kids["run_id"]:
        assert client.get_run(run_id).data.tags["nll_iwae"].startswith("3 samples")
    http = create_app(tracking_uri, default_run_id=killed_run).test_client()
    info = http.get(f"/api/runs/{killed_run}").get_json()
    assert info["model"] == "ResidualVAE" and info["variational"] is True and info["prior"] == "N(0, I)"
    response = http.get(f"/api/runs/{killed_run}/prior.png?seed=0")
    assert response.status_code == 200 and response.mimetype == "image/png"


RENYI = Path(__file__).parents[1] / "experiments" / "components" / "renyi_objective.py"


def test_a_users_objective_is_found_checked_and_matches_what_it_generalizes():
    """The example Rényi bound at α = 0 is the IWAE bound, on the same draws; its options are
    checked like a model's; it trains (one short run, batched with a second α)."""
    from vae_lab.models.components import build_objective
    from vae_lab.models.objectives import Draws

    name = f"{RENYI}:RenyiBound"
    config = build_config(overrides=[f"loss.objective={name}", "loss.iwae_samples=4", "loss.options.alpha=0.0"])
    check(config)
    renyi, iwae = build_objective(config.loss), build_objective(build_config(
        overrides=["loss.objective=iwae", "loss.iwae_samples=4"]).loss)
    generator = torch.Generator().manual_seed(0)
    recon, ratio = torch.rand(12, generator=generator) * 50, torch.randn(12, generator=generator) * 3
    draws = Draws(recon, ratio, recon.mean(), 4, lambda: ratio)
    torch.testing.assert_close(renyi(draws, 1.0), iwae(draws, 1.0))
    assert renyi.draws_per_image == 4
    for overrides, expected in [
        (["loss.options.beta=2"], "loss.options.beta is not an option of RenyiBound; allowed: loss.options.alpha"),
        (["loss.options.alpha=1.0"], "could not be built (ValueError: alpha = 1 is the ELBO"),
        (["loss.free_bits=0.5"], "takes neither loss.free_bits"),
        (["model.name=ae"], "needs a VAE"),
    ]:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check(build_config(overrides=[f"loss.objective={name}", *overrides]))
    with pytest.raises(ConfigError, match="loss.iwae_samples=3 is for loss.objective=iwae"):
        check(build_config(overrides=["loss.iwae_samples=3"]))  # the ELBO takes no draws


def test_a_users_objective_trains_in_a_batch_as_alone(tracking_uri):
    from test_batched import assert_batched_as_alone

    configs = [build_config(None, [*TINY_RUN, f"tracking.uri={tracking_uri}", f"loss.objective={RENYI}:RenyiBound",
                                   "loss.iwae_samples=3", "loss.options.alpha=0.5", "train.epochs=2",
                                   "eval.enabled=false", "tracking.log_model=false", "tracking.log_images=false",
                                   f"loss.kl_weight={weight}"]) for weight in (0.5, 1.0)]
    alone = assert_batched_as_alone(configs, ("val/loss", "val/kl", "train/loss", "test/loss"))
    assert alone[0].metrics["val/kl"] != pytest.approx(alone[1].metrics["val/kl"], rel=1e-3)


SPARE_LAYER = '''
import math
from torch import nn
from vae_lab.models import Autoencoder


class SpareVAE(Autoencoder):
    """An MLP VAE with a frozen first layer, its encoder registered under a second name (`trunk`),
    and a layer its loss uses only while `use_spare` is set (never, by default)."""

    variational = True
    use_spare = False

    def __init__(self, image_shape, latent_dim):
        super().__init__(image_shape, latent_dim)
        pixels = math.prod(image_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 16), nn.ReLU(), nn.Linear(16, 2 * latent_dim))
        self.encoder[1].requires_grad_(False)
        self.trunk = self.encoder  # the same module: its tensors are in the state dict twice
        self.decoder = nn.Linear(latent_dim, pixels)
        self.spare = nn.Linear(latent_dim, 1)

    def encode_stats(self, x):
        return self.trunk(x)

    def decode(self, z):
        logits = self.decoder(z)
        if self.use_spare:
            logits = logits + self.spare(z)
        return logits.view(-1, *self.image_shape)
'''


def test_a_parameter_without_a_gradient_takes_no_step_in_a_batch_as_alone(tmp_path, tracking_uri):
    """As with torch's Adam: a parameter without a gradient takes no step and has no Adam state,
    in a stacked batch as in a plain step. One the loss does not use failed the batch (autograd
    refused it) and a plain run's checkpoint; a frozen one (requires_grad=False) trained in a
    batch. Checkpoints keep each parameter's own step, so a run resumes exactly where it was.
    A module registered twice has its tensors under both names in every state a batch hands out
    (its trials failed at the end: the model could not be rebuilt)."""
    from test_batched import assert_batched_as_alone
    from vae_lab.training.steps import PlainStep, StackedStep, loss_weights

    path = tmp_path / "spare.py"
    path.write_text(SPARE_LAYER)
    configs = [build_config(None, [*TINY_RUN, f"tracking.uri={tracking_uri}", f"model.name={path}:SpareVAE",
                                   "train.epochs=2", "train.checkpoint_every=1", "train.grad_clip=1",
                                   "eval.enabled=false", "tracking.log_model=false", "tracking.log_images=false",
                                   f"train.seed={seed}"]) for seed in (0, 1)]
    assert_batched_as_alone(configs, ("val/loss", "test/loss", "train/loss"))

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    models = [build_model(config.model, (1, 28, 28), config.prior) for config in configs]
    spare = [model.spare.weight.detach().clone() for model in models]
    frozen = [model.encoder[1].weight.detach().clone() for model in models]
    generator = torch.Generator().manual_seed(3)
    latent = configs[0].model.latent_dim
    draws = [(torch.rand(2, 8, 1, 28, 28, generator=generator).bernoulli(), torch.randn(2, 8, latent, generator=generator))
             for _ in range(3)]

    def stacked_step(stepper, index, rows):
        images, noise = draws[index]
        stepper.train_step(images[rows], 0, noise[rows], 0, loss_weights(stepper.configs, cpu))

    def plain_step(stepper, index):  # the second trial's draws
        images, noise = draws[index]
        stepper.train_step(images[1], None, noise[1], None, loss_weights([configs[1]], cpu))

    pair = StackedStep(models, configs, cpu)
    assert set(pair.state(0)) == set(models[0].state_dict()) >= {"trunk.1.weight", "encoder.1.weight"}
    stacked_step(pair, 0, [0, 1])
    for row in (0, 1):
        assert torch.equal(pair.state(row)["spare.weight"], spare[row])
        assert torch.equal(pair.state(row)["encoder.1.weight"], frozen[row])
        moments = pair.optimizer_state(row)
        assert {"spare.weight", "encoder.1.weight"}.isdisjoint(moments["exp_avg"])
        assert "decoder.weight" in moments["exp_avg"]
    plain = PlainStep(build_model(configs[1].model, (1, 28, 28), configs[1].prior), configs[1], cpu)
    plain.load_state(0, pair.state(1))
    plain.load_optimizer_states([pair.optimizer_state(1)])
    pair.keep([1])  # the first trial leaves; the second goes on as it would alone
    stacked_step(pair, 1, [1])
    plain_step(plain, 1)
    for name, value in plain.state(0).items():
        torch.testing.assert_close(pair.state(0)[name], value, rtol=0, atol=1e-6)
    assert torch.equal(plain.state(0)["spare.weight"], spare[1])
    assert torch.equal(plain.state(0)["encoder.1.weight"], frozen[1])

    # used on the third step only: its own step count (1, against 3) survives a checkpoint
    plain.model(0).use_spare = True
    plain_step(plain, 2)
    saved = plain.optimizer_state(0)
    assert saved["step"] == 3 and saved["steps"] == {"spare.weight": 1.0, "spare.bias": 1.0}
    resumed = PlainStep(build_model(configs[1].model, (1, 28, 28), configs[1].prior), configs[1], cpu)
    resumed.load_state(0, plain.state(0))
    resumed.load_optimizer_states([saved])
    resumed.model(0).use_spare = True
    for stepper in (plain, resumed):
        plain_step(stepper, 0)
    for name, value in plain.state(0).items():
        torch.testing.assert_close(resumed.state(0)[name], value, rtol=0, atol=0)


def test_an_installed_package_registers_through_an_entry_point(tmp_path, monkeypatch):
    """A distribution on sys.path that declares `[vae_lab.models] residual = ...` is found by name."""
    package = tmp_path / "residual_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, package / "models.py")
    info = tmp_path / "residual_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: residual-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vae_lab.models]\nresidual = residual_pkg.models:ResidualVAE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "residual" in MODEL_FAMILIES.names()
    config = build_config(overrides=["model.name=residual", "model.options.blocks=1"])
    check(config)
    assert type(build_model(config.model, (1, 28, 28), config.prior)).__name__ == "ResidualVAE"


def test_a_study_whose_component_option_is_bad_stops_before_anything_is_created(tmp_path, tracking_uri, capsys):
    shutil.copy(EXAMPLE, tmp_path / "residual_vae.py")
    base = tiny_base(**{"model.name": "residual_vae.py:ResidualVAE"})
    document = {"study": {"name": "bad_blocks", "sampler": "grid"}, "base": base,
                "search_space": {"model.options.blocks": [1, -1]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    assert run(path, tracking_uri) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: search_space (model.options.blocks=-1): model.name=") and "\n" not in error
    assert "blocks must be 0 or more" in error
    assert not Path(tracking_uri.removeprefix("sqlite:///")).parent.exists()
