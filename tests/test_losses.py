import math

import pytest
import torch
import torch.nn.functional as F

from vae_lab.config import ConfigError, build_config
from vae_lab.models.losses import kl_weight_at, loss_terms, reconstruction_nll
from vae_lab.models.priors import kl_to_standard_normal
from vae_lab.models.autoencoders import Posterior
from vae_lab.models.components import check


def test_bce_with_logits_equals_bce_on_sigmoid():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 28, 28) * 3
    images = torch.rand(4, 1, 28, 28)
    ours = reconstruction_nll(logits, images, "bernoulli")
    reference = F.binary_cross_entropy(torch.sigmoid(logits), images, reduction="none").flatten(1).sum(1)
    assert ours.shape == (4,)
    assert torch.allclose(ours, reference, rtol=1e-4)


def test_bce_is_stable_for_extreme_logits():
    logits = torch.tensor([[[[200.0, -200.0]]]])
    images = torch.tensor([[[[0.0, 1.0]]]])
    assert torch.allclose(reconstruction_nll(logits, images, "bernoulli"), torch.tensor([400.0]))


def test_gaussian_is_a_normalized_negative_log_likelihood():
    """-log N(x; sigmoid(logits), sigma^2 I), its constant included: equal to torch's Normal."""
    torch.manual_seed(0)
    logits, images = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    for sigma in (1 / math.sqrt(2), 0.1, 1.0):
        reference = -torch.distributions.Normal(torch.sigmoid(logits), sigma).log_prob(images).flatten(1).sum(1)
        assert torch.allclose(reconstruction_nll(logits, images, "gaussian", sigma), reference, atol=1e-4)
    # the default sigma 1/sqrt(2): the summed squared error plus D/2 log(pi), 449 nats for 28x28
    blank, ones = torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)  # sigmoid(0) = 0.5 against 1
    expected = 784 * 0.25 + 392 * math.log(math.pi)
    assert torch.allclose(reconstruction_nll(blank, ones, "gaussian"), torch.tensor([expected] * 2))
    assert 392 * math.log(math.pi) == pytest.approx(448.7, abs=0.05)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean = torch.tensor([[0.5, -1.0, 2.0]])
    logvar = torch.tensor([[-0.5, 0.3, -1.2]])
    closed = kl_to_standard_normal(Posterior(mean, logvar)).sum()
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(400_000, 3)
    log_q = (-0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / std**2)).sum(1)
    log_p = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(1)
    monte_carlo = (log_q - log_p).mean()
    assert abs(closed.item() - monte_carlo.item()) < 0.02
    assert closed.item() > 0


def test_kl_is_zero_at_the_prior_and_for_an_ae():
    zero = torch.zeros(2, 3)
    assert torch.allclose(kl_to_standard_normal(Posterior(zero, zero)), zero)
    assert torch.equal(kl_to_standard_normal(Posterior(torch.randn(2, 3), None)), zero)


def loss_config(*overrides):
    return build_config(None, ["model.name=linear_vae", *overrides]).loss


def test_kl_weight_warmup_is_linear_from_zero():
    warmup = loss_config("loss.kl_weight=2.0", "loss.kl_warmup_steps=100")
    assert warmup.kl_schedule == "linear"  # a config from before loss.kl_schedule means what it meant
    assert [kl_weight_at(step, warmup, 1000) for step in (0, 50, 500)] == [0.0, 1.0, 2.0]
    assert kl_weight_at(0, loss_config("loss.kl_weight=2.0"), 1000) == 2.0


def test_the_cyclical_schedule_ramps_over_each_cycle_then_holds():
    """Fu et al. 2019: 1,000 steps in 4 cycles of 250; β rises over the first half of each."""
    cyclical = loss_config("loss.kl_weight=2.0", "loss.kl_schedule=cyclical", "loss.kl_cycles=4",
                           "loss.kl_cycle_ratio=0.5")
    expected = {0: 0.0, 25: 0.4, 125: 2.0, 249: 2.0, 250: 0.0, 300: 0.8, 999: 2.0}
    assert {step: kl_weight_at(step, cyclical, 1000) for step in expected} == pytest.approx(expected, abs=1e-6)


def test_free_bits_leave_dimensions_below_the_floor_alone_and_report_the_true_kl():
    torch.manual_seed(0)
    logits, images = torch.randn(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    mean = torch.tensor([[0.05, 2.0, -1.5]]).repeat(5, 1) + 0.01 * torch.randn(5, 3)
    mean.requires_grad_(True)
    logvar = torch.zeros(5, 3)
    terms = loss_terms(logits, images, kl_to_standard_normal(Posterior(mean, logvar)), "bernoulli", 0.5, free_bits=0.5)
    kl_dims = kl_to_standard_normal(Posterior(mean, logvar))
    floor = torch.maximum(kl_dims.mean(0), torch.tensor(0.5)).sum()
    assert terms.loss.item() == pytest.approx((terms.recon.mean() + 0.5 * floor).item(), rel=1e-6)
    torch.testing.assert_close(terms.kl, kl_dims.sum(1))  # what is logged is the KL, not the floor
    terms.loss.backward()
    assert torch.all(mean.grad[:, 0] == 0)  # dimension 0 holds 0.00125 nats < 0.5: not pushed further
    assert torch.all(mean.grad[:, 1:] != 0)
    plain = loss_terms(logits, images, kl_to_standard_normal(Posterior(mean, logvar)), "bernoulli", 0.5)
    assert plain.loss.item() == pytest.approx((plain.recon + 0.5 * plain.kl).mean().item(), rel=1e-6)


@pytest.mark.parametrize("overrides, expected", [
    (["loss.free_bits=-0.1"], "loss.free_bits must be zero or positive"),
    (["loss.free_bits=.inf"], "loss.free_bits must be zero or positive"),
    (["model.name=ae", "loss.free_bits=0.5"], "loss.free_bits needs a VAE"),
    (["loss.kl_schedule=cyclical", "loss.kl_cycles=0"], "needs loss.kl_cycles of 1 or more"),
    (["loss.kl_schedule=cyclical", "loss.kl_cycle_ratio=1.5"], "loss.kl_cycle_ratio"),
    (["loss.kl_schedule=linear"], "give it 1 or more steps"),
    (["loss.kl_schedule=sigmoid"], "kl_schedule"),
    (["loss.tc_weight=-1"], "loss.tc_weight must be zero or positive"),
    (["loss.objective=iwae", "loss.iwae_samples=0"], "loss.iwae_samples must be 1 or more"),
    (["loss.iwae_samples=5"], "is for loss.objective=iwae"),
    (["model.name=ae", "loss.objective=iwae"], "loss.objective=iwae needs a VAE"),
    (["loss.objective=iwae", "loss.free_bits=0.5"], "takes neither loss.free_bits"),
    (["model.name=conv_ae", "loss.tc_weight=6"], "loss.tc_weight needs a VAE"),
])
def test_bad_schedule_or_free_bits_is_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        check(build_config(None, ["model.name=linear_vae", *overrides]))


def test_loss_is_batch_mean_of_recon_plus_weighted_kl():
    torch.manual_seed(0)
    logits, images = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    posterior = Posterior(torch.randn(3, 2), torch.randn(3, 2))
    terms = loss_terms(logits, images, kl_to_standard_normal(posterior), "bernoulli", kl_weight=0.5)
    assert torch.allclose(terms.loss, (terms.recon + 0.5 * terms.kl).mean())


def test_losses_stay_fp32_under_bf16_autocast():
    """The step runs the model under autocast; the loss and KL it optimizes are fp32."""
    from vae_lab.config import ModelConfig
    from vae_lab.models.components import build_model
    from vae_lab.training.steps import NoiseInput, autocast

    model = build_model(ModelConfig(name="linear_vae", latent_dim=4, hidden_dims=[32]), (1, 28, 28))
    images = torch.rand(8, 1, 28, 28)
    with autocast(torch.device("cpu"), True):
        logits, mean, logvar, kl_terms, _ = NoiseInput(model)(images, torch.randn(8, 4, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16  # the forward really ran in bf16
    terms = loss_terms(logits, images, kl_terms, "bernoulli", 1.0)
    assert terms.loss.dtype == terms.recon.dtype == terms.kl.dtype == torch.float32


def test_amp_falls_back_to_fp32_with_one_warning_where_bf16_is_emulated(monkeypatch):
    import warnings

    from vae_lab.training import device as device_policy

    monkeypatch.setattr(device_policy, "cpu_has_native_bf16", lambda: False)  # this machine's flags, as on an AVX2 CPU
    monkeypatch.setattr(device_policy, "_warned_amp", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert device_policy.effective_amp(True, torch.device("cpu")) is False
        assert device_policy.effective_amp(True, torch.device("cpu")) is False
    assert len(caught) == 1 and "7.8x slower" in str(caught[0].message)
    assert device_policy.effective_amp(False, torch.device("cpu")) is False
    monkeypatch.setattr(device_policy, "cpu_has_native_bf16", lambda: True)
    assert device_policy.effective_amp(True, torch.device("cpu")) is True


def test_the_total_correlation_term_weighs_what_it_says_and_sees_dependence():
    from vae_lab.models.losses import total_correlation_mws

    torch.manual_seed(0)
    mean = torch.randn(256, 2)
    logvar = torch.full((256, 2), -4.0)
    z = mean + 0.1 * torch.randn(256, 2)
    independent = total_correlation_mws(z, mean, logvar, dataset_size=256)
    tied = mean[:, :1].repeat(1, 2)  # both dimensions the same: all the information is shared
    dependent = total_correlation_mws(tied + 0.1 * torch.randn(256, 2), tied, logvar, dataset_size=256)
    assert float(dependent) > float(independent) + 1.0

    logits, images = torch.randn(256, 1, 4, 4), torch.rand(256, 1, 4, 4)
    kl_terms = kl_to_standard_normal(Posterior(mean, logvar))
    plain = loss_terms(logits, images, kl_terms, "bernoulli", 1.0)
    same = loss_terms(logits, images, kl_terms, "bernoulli", 1.0, total_correlation=dependent, tc_weight=1.0)
    assert same.loss.item() == plain.loss.item()  # tc_weight 1: the ELBO, to the bit
    heavier = loss_terms(logits, images, kl_terms, "bernoulli", 1.0, total_correlation=dependent, tc_weight=6.0)
    assert heavier.loss.item() == pytest.approx(plain.loss.item() + 5 * dependent.item(), rel=1e-6)
    torch.testing.assert_close(heavier.kl, plain.kl)  # */kl stays the KL


def test_the_iwae_objective_at_one_sample_is_the_elbo_and_tighter_with_more():
    from vae_lab.models.losses import iwae_loss

    torch.manual_seed(0)
    recon, log_ratio = torch.rand(4 * 5) * 100, torch.randn(4 * 5) * 3 + 5  # 4 images x 5 samples
    one = iwae_loss(recon[:4], log_ratio[:4], samples=1, kl_weight=1.0)
    assert one.item() == pytest.approx((recon[:4] + log_ratio[:4]).mean().item(), rel=1e-6)
    five = iwae_loss(recon, log_ratio, samples=5, kl_weight=1.0)
    per_sample = (recon + log_ratio).view(4, 5).mean(dim=1).mean()  # the ELBO estimated on the same draws
    assert five.item() < per_sample.item()  # log-mean-exp >= mean: a tighter bound
    manual = -(torch.logsumexp(-(recon + log_ratio).view(4, 5), dim=1) - math.log(5)).mean()
    assert five.item() == pytest.approx(manual.item(), rel=1e-6)


def test_iwae_trials_train_in_a_batch_as_they_do_alone(tracking_uri):
    from conftest import TINY_RUN
    from test_batched import assert_batched_as_alone

    configs = [build_config(None, [*TINY_RUN, f"tracking.uri={tracking_uri}", "train.epochs=2", "eval.enabled=false",
                                   "tracking.log_model=false", "tracking.log_images=false", "data.binarize=dynamic",
                                   "loss.objective=iwae", "loss.iwae_samples=5", f"train.seed={seed}"])
               for seed in (0, 1)]
    alone = assert_batched_as_alone(configs, ("train/loss", "val/loss", "val/elbo", "test/loss"))
    for single in alone:
        # the IWAE bound is tighter than the ELBO beside it on the same draws: a lower training loss
        assert single.metrics["train/loss"] < single.metrics["train/recon"] + single.metrics["train/kl"]
