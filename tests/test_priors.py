"""Priors: each density against torch.distributions, the Monte Carlo KL against the closed form,
and VAEs with a learned prior trained alone and in a batch, evaluated and logged with their prior."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import distributions as D

from conftest import TINY_RUN
from test_batched import assert_batched_as_alone
from vae_lab import names
from vae_lab.config import ConfigError, ModelConfig, PriorConfig, build_config
from vae_lab.models.components import build_model
from vae_lab.models.posterior import Posterior
from vae_lab.models.priors import Prior, StandardNormal, kl_to_standard_normal
from vae_lab.tracking.logged import load_logged_model
from vae_lab.train import train
from vae_lab.models.components import check

LATENT = 3


def vae_with(prior: str, components: int = 4):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="linear_vae", latent_dim=LATENT, hidden_dims=[16]), (1, 6, 6),
                       PriorConfig(name=prior, components=components, init_mean=0.3, init_std=0.2))


def test_the_standard_normal_density_is_torchs():
    z = torch.randn(7, LATENT)
    reference = D.Independent(D.Normal(torch.zeros(LATENT), torch.ones(LATENT)), 1).log_prob(z)
    torch.testing.assert_close(StandardNormal(LATENT).log_prob(z), reference)


def test_the_mixture_density_is_torchs_mixture_same_family():
    model = vae_with("mog")
    prior = model.prior
    with torch.no_grad():  # not the starting point: distinct weights and variances
        prior.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
        prior.logvars.copy_(torch.randn(4, LATENT) * 0.5)
    reference = D.MixtureSameFamily(D.Categorical(logits=prior.logits),
                                    D.Independent(D.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1))
    z = torch.randn(2, 5, LATENT) * 2
    torch.testing.assert_close(model.log_prior(z), reference.log_prob(z))


def test_the_vampprior_density_is_the_mixture_of_the_encoder_at_its_pseudo_inputs():
    model = vae_with("vampprior", components=6)
    pseudo = model.prior.pseudo_inputs().detach()
    assert pseudo.shape == (6, 1, 6, 6) and 0 <= float(pseudo.min()) and float(pseudo.max()) <= 1
    encoded = model.encode(pseudo)
    reference = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(6)),
                                    D.Independent(D.Normal(encoded.mean, encoded.std), 1))
    z = torch.randn(4, LATENT)
    torch.testing.assert_close(model.log_prior(z), reference.log_prob(z))
    samples = model.prior.sample(5, model, torch.Generator().manual_seed(1))
    again = model.prior.sample(5, model, torch.Generator().manual_seed(1))
    assert samples.shape == (5, LATENT) and torch.equal(samples, again)


def test_the_monte_carlo_kl_averages_to_the_closed_form():
    torch.manual_seed(0)
    posterior = Posterior(torch.randn(1, LATENT), torch.randn(1, LATENT) * 0.5)
    z = posterior.sample(torch.randn(200_000, 1, LATENT))
    estimate = Prior.kl_terms(StandardNormal(LATENT), Posterior(posterior.mean.expand(200_000, 1, LATENT),
                                                                posterior.logvar.expand(200_000, 1, LATENT)), z, None)
    closed = kl_to_standard_normal(posterior).sum()
    assert float(estimate.mean()) == pytest.approx(float(closed), abs=0.02)
    assert estimate.shape == (200_000, 1, 1)


@pytest.mark.parametrize("prior", ["mog", "vampprior"])
def test_a_vae_with_a_learned_prior_trains_evaluates_and_logs_it(tracking_uri, prior):
    config = build_config(None, [*TINY_RUN, f"tracking.uri={tracking_uri}", f"prior.name={prior}",
                                 "prior.components=8", "train.epochs=2", "data.binarize=dynamic",
                                 "eval.iwae_samples=4", "eval.iwae_points=64"])
    torch.manual_seed(0)
    start = build_model(config.model, (1, 28, 28), config.prior).prior.state_dict()
    result = train(config)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.KL_ESTIMATOR_TAG].startswith("monte carlo")
    assert run.data.params["prior.name"] == prior
    for key in ("val/kl", "val/elbo", "test/elbo", "eval/nll_iwae"):
        assert math.isfinite(run.data.metrics[key]), key
    # the prior's own parameters trained with the model
    trained = result.model.prior.state_dict()
    assert any(not torch.equal(trained[name].cpu(), value) for name, value in start.items())
    model, _ = load_logged_model(result.run_id, tracking_uri)
    for name, value in trained.items():
        torch.testing.assert_close(model.prior.state_dict()[name], value.cpu())


def test_vampprior_trials_in_a_batch_match_alone(tracking_uri):
    configs = [build_config(None, [*TINY_RUN, f"tracking.uri={tracking_uri}", "prior.name=vampprior",
                                   "prior.components=8", "train.epochs=2", "eval.enabled=false",
                                   "tracking.log_model=false", "tracking.log_images=false", f"loss.kl_weight={weight}"])
               for weight in (0.5, 2.0)]
    alone = assert_batched_as_alone(configs, ("val/loss", "val/kl", "test/loss"))
    assert alone[0].metrics["val/kl"] != pytest.approx(alone[1].metrics["val/kl"], rel=1e-2)


@pytest.mark.parametrize("overrides, expected", [
    (["model.name=ae", "prior.name=vampprior"], "an AE has no prior"),
    (["prior.components=-1"], "prior.components must be 1 or more"),
    (["prior.name=mog", "loss.free_bits=0.5"], "only in closed form"),
    (["prior.name=flow"], "prior.name"),
    (["prior.init_std=.nan"], "prior.init_std"),
])
def test_a_bad_prior_is_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        check(build_config(None, ["model.name=linear_vae", *overrides]))


def test_the_kl_decomposition_sums_to_the_kl_it_splits():
    """Chen et al.'s three terms add up, sample by sample, to the one-sample estimate of
    E_x KL(q(z|x) || N(0, I)) with the same draws, and that to the closed-form mean KL."""
    from vae_lab.evaluation.metrics import kl_decomposition
    from vae_lab.models.priors import gaussian_log_density

    torch.manual_seed(0)
    means = torch.randn(1500, LATENT) * torch.tensor([2.0, 0.5, 0.05])  # one dimension nearly unused
    logvars = torch.randn(1500, LATENT) * 0.3 - 1.0
    terms = kl_decomposition(means, logvars, torch.Generator().manual_seed(5))
    assert set(terms) == set(names.KL_DECOMPOSITION)
    noise = torch.randn(means.shape, generator=torch.Generator().manual_seed(5))
    z = (means.double() + noise.double() * torch.exp(0.5 * logvars.double()))
    one_sample = (gaussian_log_density(z, means.double(), logvars.double())
                  - StandardNormal(LATENT).log_prob(z)).mean()
    assert sum(terms.values()) == pytest.approx(float(one_sample), rel=1e-9)
    closed = float(kl_to_standard_normal(Posterior(means, logvars)).sum(1).mean())
    assert sum(terms.values()) == pytest.approx(closed, rel=0.05)
    assert all(value > -0.05 for value in terms.values())  # each term is a KL: non-negative up to noise


def test_the_kl_decomposition_does_not_depend_on_its_chunks(monkeypatch):
    from vae_lab.evaluation import metrics

    means, logvars = torch.randn(700, 5), torch.randn(700, 5) * 0.3 - 1.0
    whole = metrics.kl_decomposition(means, logvars, torch.Generator().manual_seed(2))
    monkeypatch.setattr(metrics, "DECOMPOSITION_CHUNK_ENTRIES", 3 * 5 * 700)  # 3 rows a chunk, the last one short
    assert metrics.kl_decomposition(means, logvars, torch.Generator().manual_seed(2)) == pytest.approx(whole, rel=1e-12)
