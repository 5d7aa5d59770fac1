import numpy as np
import pytest
import torch

from vae_lab.config import ModelConfig, build_config
from vae_lab.data.datasets import load_data
from vae_lab.evaluation.metrics import active_units, evaluate_model, iwae_nll, pca_mse_per_pixel, probe_accuracies
from vae_lab.models.losses import reconstruction_nll
from vae_lab.models.priors import kl_to_standard_normal
from vae_lab.models.components import build_model


@pytest.fixture(scope="module")
def binary_images():
    data = load_data(build_config(overrides=["data.binarize=static", "data.train_limit=600",
                                             "data.test_limit=200"]).data)
    return data, data.to_float(data.test_images[:8])


def _small_vae(seed=0, latent=4):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="linear_vae", latent_dim=latent, hidden_dims=[32]), (1, 28, 28)).eval()


def test_iwae_with_one_sample_averages_to_the_negative_elbo(binary_images):
    _, images = binary_images
    model = _small_vae()
    repeats = 4000
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        estimates = iwae_nll(model, images, samples=1, generator=generator, chunk=1)
        many = torch.stack([iwae_nll(model, images, 1, generator) for _ in range(200)]).mean(0)
        posterior = model.encode(images)
        noise = torch.randn((repeats, *posterior.mean.shape), generator=generator)
        z = posterior.mean + noise * posterior.std
        logits = model.decode(z.reshape(-1, model.latent_dim))
        recon = reconstruction_nll(logits, images.repeat(repeats, 1, 1, 1), "bernoulli").view(repeats, -1)
        negative_elbo = recon.mean(0) + kl_to_standard_normal(posterior).sum(1)
    assert estimates.shape == (8,)
    assert torch.allclose(many, negative_elbo, rtol=0.01)


def test_iwae_with_more_samples_is_not_above_the_negative_elbo(binary_images):
    _, images = binary_images
    model = _small_vae(seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        one = torch.stack([iwae_nll(model, images, 1, generator) for _ in range(50)]).mean()
        hundred = torch.stack([iwae_nll(model, images, 100, generator) for _ in range(5)]).mean()
    assert hundred < one


def test_active_units_ignore_dimensions_the_encoder_does_not_use(binary_images):
    data, _ = binary_images
    model = _small_vae(latent=6)
    with torch.no_grad():  # the mean of dims 1 and 4 no longer depends on x
        model.encoder[-1].weight[[1, 4]] = 0.0
        model.encoder[-1].bias[[1, 4]] = 0.3
        means = model.encode(data.to_float(data.test_images)).mean.numpy()
    means = means * 10  # an untrained encoder barely varies; scale the used ones above 0.01
    assert active_units(means) == 4
    assert active_units(np.zeros((50, 3))) == 0


def test_pca_baseline_equals_an_explicit_projection():
    rng = np.random.default_rng(0)
    train = rng.random((200, 30))
    test = rng.random((50, 30))
    mean = train.mean(0)
    _, _, components = np.linalg.svd(train - mean, full_matrices=False)
    basis = components[:5]
    reconstructed = (test - mean) @ basis.T @ basis + mean
    expected = np.mean((reconstructed - test) ** 2)
    assert pca_mse_per_pixel(train, test, 5) == pytest.approx(expected, rel=1e-6)
    assert pca_mse_per_pixel(train, test, 30) == pytest.approx(0.0, abs=1e-12)


def test_probes_read_separable_latents_perfectly():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = labels[:, None] * 10.0 + rng.normal(size=(120, 2))
    scores = probe_accuracies(features, labels, features, labels)
    assert scores == {"eval/probe_accuracy": 1.0, "eval/knn_accuracy": 1.0}


def test_evaluate_model_reports_iwae_only_for_binarized_bernoulli(binary_images):
    data, _ = binary_images
    model = _small_vae()
    config = build_config(overrides=["data.binarize=static", "eval.iwae_samples=3", "eval.iwae_points=50",
                                     "model.latent_dim=4"])
    result = evaluate_model(model, data, config, torch.device("cpu"))
    assert result.metrics["eval/nll_iwae"] > 0
    assert result.kl_per_dim.shape == (4,)
    assert result.metrics["eval/active_units"] <= 4
    greyscale = build_config(overrides=["eval.iwae_samples=3", "model.latent_dim=4"])
    result = evaluate_model(model, data, greyscale, torch.device("cpu"))
    assert "eval/nll_iwae" not in result.metrics
    assert "not computed" in result.tags["nll_iwae"]


def test_probes_match_scikit_learn():
    """The torch probes decide as scikit-learn's StandardScaler + LogisticRegression and 5-NN do."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=1.5, size=(4, 6))
    labels = rng.integers(0, 4, size=900)
    features = centres[labels] + rng.normal(size=(900, 6))  # overlapping classes: accuracies well below 1
    train, test = slice(0, 600), slice(600, 900)
    ours = probe_accuracies(features[train], labels[train], features[test], labels[test])
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features[train], labels[train])
    knn = KNeighborsClassifier(n_neighbors=5).fit(features[train], labels[train])
    assert 0.5 < ours["eval/probe_accuracy"] < 0.99
    assert ours["eval/probe_accuracy"] == pytest.approx(logistic.score(features[test], labels[test]), abs=1 / 300)
    assert ours["eval/knn_accuracy"] == pytest.approx(knn.score(features[test], labels[test]), abs=1e-12)


def test_collapse_means_no_information_not_few_active_units(binary_images):
    data, _ = binary_images
    config = build_config(overrides=["data.binarize=static", "eval.iwae_samples=2", "eval.iwae_points=20",
                                     "model.latent_dim=4"])
    model = _small_vae()
    with torch.no_grad():  # one informative unit, three that ignore the input and match the prior
        stats = model.encoder[-1]
        stats.weight[1:4].zero_(), stats.bias[1:4].zero_()  # means of units 1-3: 0
        stats.weight[5:8].zero_(), stats.bias[5:8].zero_()  # log-variances of units 1-3: 0
        stats.weight[0].mul_(100.0)  # unit 0's mean varies with the input
    result = evaluate_model(model, data, config, torch.device("cpu"))
    assert result.metrics["eval/active_units"] == 1 and result.kl_per_dim.sum() > 0.1
    assert result.tags["posterior_collapse"] == "false"  # 1 of 4 active is not collapse
    with torch.no_grad():  # now no unit says anything about x: q(z|x) = N(0, I)
        stats.weight.zero_(), stats.bias.zero_()
    result = evaluate_model(model, data, config, torch.device("cpu"))
    assert result.kl_per_dim.sum() < 0.1 and result.tags["posterior_collapse"] == "true"


def test_the_pca_baseline_is_the_same_on_each_path(monkeypatch):
    """Covariance eigenvectors (N >= D), a thin SVD (N < D) and, past EXACT_PCA_LIMIT, a randomized
    SVD give one baseline: numpy's full SVD of the same data."""
    from vae_lab.evaluation import metrics

    rng = np.random.default_rng(0)
    scales = np.linspace(4, 0.5, 12)
    for rows, dims in ((300, 50), (40, 300)):
        train = (rng.normal(size=(rows, 12)) * scales) @ rng.normal(size=(12, dims)) + 0.1 * rng.normal(size=(rows, dims))
        test = (rng.normal(size=(30, 12)) * scales) @ rng.normal(size=(12, dims))
        centred = train - train.mean(axis=0)
        basis = np.linalg.svd(centred, full_matrices=False)[2][:6]
        residual = (test - train.mean(axis=0)) @ basis.T @ basis - (test - train.mean(axis=0))
        expected = float(np.mean(residual ** 2))
        assert metrics.pca_mse_per_pixel(train, test, 6) == pytest.approx(expected, rel=1e-9)
        monkeypatch.setattr(metrics, "EXACT_PCA_LIMIT", 10)
        assert metrics.pca_mse_per_pixel(train, test, 6) == pytest.approx(expected, rel=1e-6)
        monkeypatch.undo()


def test_the_pca_baseline_is_computed_once_per_data_and_read_back_by_later_processes(monkeypatch, tmp_path):
    from vae_lab.evaluation import metrics

    monkeypatch.setenv("HOME", str(tmp_path))  # the cache under a home of this test's own
    config = build_config({}, ["data.name=digits", "model.latent_dim=3"])
    computed = []
    original = metrics.pca_mse_per_pixel
    monkeypatch.setattr(metrics, "pca_mse_per_pixel", lambda *args: computed.append(args) or original(*args))
    model = build_model(config.model, (1, 8, 8), config.prior)
    first = evaluate_model(model, load_data(config.data), config, torch.device("cpu")).metrics["eval/pca_mse_per_pixel"]
    assert len(computed) == 1
    # another process: the same data loaded again, nothing in memory
    again = evaluate_model(model, load_data(config.data), config, torch.device("cpu")).metrics["eval/pca_mse_per_pixel"]
    assert again == first and len(computed) == 1
    files = list(tmp_path.rglob("pca_baselines/*.json"))
    assert len(files) == 1 and not list(tmp_path.rglob("pca_baselines/.*"))
    files[0].write_text("{torn")  # an unreadable file is computed again, and replaced
    third = evaluate_model(model, load_data(config.data), config, torch.device("cpu")).metrics["eval/pca_mse_per_pixel"]
    assert third == first and len(computed) == 2
    assert files[0].read_text() != "{torn"
