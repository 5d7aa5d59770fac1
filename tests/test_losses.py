import math

import pytest
import torch
import torch.nn.functional as F

from vae_lab.models.losses import kl_to_standard_normal, kl_weight_at, loss_terms, reconstruction_nll
from vae_lab.models.autoencoders import Posterior


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


def test_kl_weight_warmup_is_linear_from_zero():
    assert kl_weight_at(0, 2.0, 100) == 0.0
    assert kl_weight_at(50, 2.0, 100) == 1.0
    assert kl_weight_at(500, 2.0, 100) == 2.0
    assert kl_weight_at(0, 2.0, 0) == 2.0


def test_loss_is_batch_mean_of_recon_plus_weighted_kl():
    torch.manual_seed(0)
    logits, images = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    posterior = Posterior(torch.randn(3, 2), torch.randn(3, 2))
    terms = loss_terms(logits, images, posterior, "bernoulli", kl_weight=0.5)
    assert torch.allclose(terms.loss, (terms.recon + 0.5 * terms.kl).mean())


def test_losses_stay_fp32_under_bf16_autocast():
    """The step runs the model under autocast; the loss and KL it optimizes are fp32."""
    from vae_lab.config import ModelConfig
    from vae_lab.models.autoencoders import build_model
    from vae_lab.training.steps import NoiseInput, autocast

    model = build_model(ModelConfig(name="linear_vae", latent_dim=4, hidden_dims=[32]), (1, 28, 28))
    images = torch.rand(8, 1, 28, 28)
    with autocast(torch.device("cpu"), True):
        logits, mean, logvar = NoiseInput(model)(images, torch.randn(8, 4, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16  # the forward really ran in bf16
    terms = loss_terms(logits, images, Posterior(mean, logvar), "bernoulli", 1.0)
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
