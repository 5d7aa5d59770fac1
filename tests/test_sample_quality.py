"""Sample quality (vae_lab.evaluation.sample_quality): the Fréchet distance and precision/recall in a
feature network's space behave as a distance between image sets should, the network is cached by the
data's digest and never reused on other data, and every run logs the metrics its model allows."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from mlflow.tracking import MlflowClient
from torchvision.transforms.functional import gaussian_blur

from conftest import TINY_RUN
from vae_lab import names
from vae_lab.config import ModelConfig, build_config
from vae_lab.data.datasets import load_data
from vae_lab.evaluation import sample_quality
from vae_lab.evaluation.sample_quality import (AUTOENCODER, CLASSIFIER, FEATURE_NET_VERSION, FeatureNet,
                                               cache_path, feature_space, frechet_distance, precision_recall)
from vae_lab.models.components import build_model
from vae_lab.train import main, train
from vae_lab.training.run import run_trials
from vae_lab.training.trial import TrialSpec


@pytest.fixture(scope="module")
def mnist():
    """mnist5k as a default run loads it, its classifier, and the features of 1000 test and 1000 train images."""
    data = load_data(build_config().data)
    space = feature_space(data)
    test = data.to_float(data.test_images[:1000])
    train_images = data.to_float(data.train_images[:1000])
    return data, space, space.embed(test), train_images


def test_the_classifier_learns_its_data(mnist):
    _, space, test_features, _ = mnist
    assert space.kind == CLASSIFIER and space.score > 0.85
    assert test_features.shape == (1000, sample_quality.FEATURE_DIM)


def test_train_against_test_is_near_zero_and_noise_and_blur_raise_it_monotonically(mnist):
    _, space, test_features, train_images = mnist
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(train_images.shape, generator=generator)
    noisy = [frechet_distance(test_features, space.embed((train_images + level * noise).clamp(0, 1)))
             for level in (0.0, 0.1, 0.2, 0.4)]
    blurred = [frechet_distance(test_features, space.embed(gaussian_blur(train_images, 9, sigma)))
               for sigma in (1.0, 1.5, 2.0, 3.0)]
    clean = noisy[0]
    assert all(before < after for before, after in zip(noisy, noisy[1:])), noisy
    assert all(before < after for before, after in zip([clean, *blurred], blurred)), blurred
    assert 0 <= clean < 0.1 * min(noisy[-1], blurred[-1])


def test_precision_and_recall_of_real_images_are_near_one_and_of_noise_zero(mnist):
    _, space, test_features, train_images = mnist
    precision, recall = precision_recall(test_features, space.embed(train_images))
    assert precision > 0.8 and recall > 0.8
    noise = torch.rand(train_images.shape, generator=torch.Generator().manual_seed(1))
    assert precision_recall(test_features, space.embed(noise)) == (0.0, 0.0)


def test_precision_and_recall_are_the_definitions_of_kynkaanniemi_et_al():
    """Against the definition written out with scipy: precision, the share of generated points
    within the 3rd-nearest-neighbour radius of some real point; recall, the same the other way
    round; in chunks smaller than either set, and with the real radii given."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 5))
    generated = rng.normal(loc=0.4, scale=1.3, size=(230, 5))  # overlapping: both shares strictly inside (0, 1)

    def radii(points):
        return np.sort(cdist(points, points), axis=1)[:, 3]  # column 0 is the point itself

    expected = ((cdist(generated, real) <= radii(real)[None, :]).any(axis=1).mean(),
                (cdist(real, generated) <= radii(generated)[None, :]).any(axis=1).mean())
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95
    real_t, generated_t = torch.from_numpy(real), torch.from_numpy(generated)
    assert precision_recall(real_t, generated_t, chunk=64) == pytest.approx(expected, abs=1.5 / 230)
    given = precision_recall(real_t, generated_t, chunk=1000,
                             real_radii=torch.from_numpy(radii(real)).float())
    assert given == pytest.approx(expected, abs=1.5 / 230)


def test_frechet_distance_is_the_textbook_formula():
    """Against the usual implementation: scipy's sqrtm of Σ1 Σ2, its imaginary part dropped."""
    rng = np.random.default_rng(0)
    first = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    second = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    mean_gap = first.mean(0) - second.mean(0)
    cov_first, cov_second = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    root = scipy.linalg.sqrtm(cov_first @ cov_second).real
    expected = mean_gap @ mean_gap + np.trace(cov_first + cov_second - 2 * root)
    assert frechet_distance(torch.from_numpy(first), torch.from_numpy(second)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.from_numpy(first), torch.from_numpy(first)) == pytest.approx(0.0, abs=1e-9)


def test_a_cache_file_for_other_data_is_rebuilt_and_a_matching_one_is_read(mnist):
    data, space, test_features, _ = mnist
    path = cache_path(data.digest, CLASSIFIER)
    assert path.is_file() and path.parent == Path.home() / ".cache" / "vae_lab" / "feature_nets"
    key = ("feature_space", CLASSIFIER)
    impostor = FeatureNet(data.image_shape, CLASSIFIER, 10)  # untrained weights, another digest
    torch.save({"digest": "0" * 64, "version": FEATURE_NET_VERSION, "kind": CLASSIFIER, "score": 1.0,
                "state_dict": impostor.state_dict()}, path)
    try:
        del data.derived[key]
        rebuilt = feature_space(data)
        assert rebuilt.score == space.score != 1.0
        assert torch.allclose(rebuilt.embed(data.to_float(data.test_images[:1000])), test_features)
        stored = torch.load(path, weights_only=True)
        assert stored["digest"] == data.digest and stored["score"] == space.score

        # a file that matches is what the next process reads, not a network trained again
        stored["score"] = 0.5
        torch.save(stored, path)
        del data.derived[key]
        assert feature_space(data).score == 0.5
    finally:
        data.derived[key] = space


def test_data_without_labels_gets_an_autoencoder_and_says_so():
    data = load_data(build_config(overrides=["data.name=digits"]).data)
    for labels in (data.train_labels, data.test_labels, data.val_labels):
        labels.zero_()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="linear_vae", latent_dim=4, hidden_dims=[32]), data.image_shape).eval()
    metrics, described = sample_quality.sample_quality(model, data, 200, seed=0)
    assert set(metrics) == set(names.FD_AUTOENCODER) and not set(metrics) & set(names.FD_CLASSIFIER)
    assert "autoencoder" in described and "no labels" in described
    assert 0 < metrics[names.FD_AUTOENCODER.quality] < 0.1  # reconstruction MSE per pixel
    assert cache_path(data.digest, AUTOENCODER).is_file()


def test_the_feature_net_takes_colour_and_small_images():
    for shape in ((3, 32, 32), (1, 8, 8)):
        net = FeatureNet(shape, CLASSIFIER, 10)
        assert net.features(torch.rand(5, *shape)).shape == (5, sample_quality.FEATURE_DIM)
        assert FeatureNet(shape, AUTOENCODER, 1).loss(torch.rand(5, *shape), torch.zeros(5)).ndim == 0


def test_runs_log_sample_quality_as_their_model_allows(tracking_uri):
    common = [*TINY_RUN, f"tracking.uri={tracking_uri}", "tracking.log_model=false", "tracking.log_images=false"]
    data = load_data(build_config(overrides=common).data)
    client = MlflowClient(tracking_uri)
    vae = client.get_run(train(build_config(overrides=common), data=data).run_id)
    sample_metrics = {names.EVAL_FD, names.FD_CLASSIFIER.precision, names.FD_CLASSIFIER.recall}
    recon_metrics = {names.EVAL_FD_RECON, names.FD_CLASSIFIER.quality}
    assert sample_metrics | recon_metrics <= set(vae.data.metrics)
    assert vae.data.metrics[names.EVAL_FD] > 0 and 0 <= vae.data.metrics[names.FD_CLASSIFIER.precision] <= 1
    assert "classifier" in vae.data.tags[names.FD_FEATURE_SPACE_TAG]
    autoencoder = client.get_run(train(build_config(overrides=[*common, "model.name=ae"]), data=data).run_id)
    assert recon_metrics <= set(autoencoder.data.metrics)
    assert not sample_metrics & set(autoencoder.data.metrics)  # an AE has no prior to sample
    assert autoencoder.data.metrics[names.FD_CLASSIFIER.quality] == vae.data.metrics[names.FD_CLASSIFIER.quality]


def test_batched_trials_train_the_feature_net_once(tracking_uri, monkeypatch):
    trained = []
    real_train = sample_quality._train
    monkeypatch.setattr(sample_quality, "_train", lambda *args: trained.append(args) or real_train(*args))
    common = [*TINY_RUN, "data.train_limit=400", f"tracking.uri={tracking_uri}", "tracking.log_model=false",
              "tracking.log_images=false"]
    configs = [build_config(overrides=[*common, f"loss.kl_weight={weight}"]) for weight in (0.5, 1.0)]
    results = run_trials([TrialSpec(config) for config in configs], data=load_data(configs[0].data))
    assert len(trained) == 1
    assert all(names.EVAL_FD in result.metrics for result in results)


def test_a_sample_count_that_is_not_positive_exits_2_with_one_line(tracking_uri, capsys):
    assert main(["eval.fd_samples=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "eval.fd_samples" in error and "positive" in error
    assert not Path(tracking_uri[len("sqlite:///"):]).exists()


def test_the_evaluation_scores_the_reconstructions_it_made_as_sample_quality_would(mnist):
    """evaluate_model hands its test reconstructions to sample_quality: the numbers are the ones
    sample_quality computes on its own."""
    from vae_lab.evaluation.metrics import evaluate_model

    config = build_config(None, [*TINY_RUN, "model.name=linear_vae", "model.hidden_dims=[32]", "model.latent_dim=4",
                                 "eval.fd_samples=150"])
    data = mnist[0]
    torch.manual_seed(0)
    model = build_model(config.model, data.image_shape, config.prior).eval()
    alone, _ = sample_quality.sample_quality(model, data, 150, config.train.seed + 2_000_003)
    evaluated = evaluate_model(model, data, config, torch.device("cpu")).metrics
    assert alone.keys() <= evaluated.keys() and {names.EVAL_FD, names.EVAL_FD_RECON} <= alone.keys()
    assert {key: evaluated[key] for key in alone} == pytest.approx(alone, rel=1e-9)
