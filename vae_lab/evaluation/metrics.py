"""End-of-run evaluation on the test split, logged as `eval/...`.

- eval/nll_iwae          importance-weighted -log p(x), nats per image (Burda et al. 2016);
                         only where the likelihood is normalized: Bernoulli on binarized
                         pixels, or Gaussian (with its constant and loss.gaussian_std)
- eval/active_units      latent dimensions whose posterior mean varies over the data
                         (variance above 0.01); eval/active_fraction
- posterior_collapse     tag: true when the posterior carries (almost) no information: a
                         test KL under 0.1 nats per image, or no active unit at all
- kl_per_dim             the mean KL of each latent dimension (a table artifact)
- eval/probe_accuracy    logistic regression on the latent means (fit on train, scored on test);
                         only where the data has labels (two classes or more)
- eval/knn_accuracy      5-nearest-neighbours on the same features, likewise
- eval/mse_per_pixel     the model's reconstruction MSE from the posterior mean
- eval/pca_mse_per_pixel PCA with as many components as the latent size: the baseline to beat
- eval/fd_classifier     Fréchet distance between prior samples and test images in the 128 hidden
                         features of a small conv classifier trained on the dataset's own train split
                         (not "FID": no Inception weights offline, and the MNIST literature scores
                         digits with a digit classifier); VAEs only. eval/fd_classifier_recon the same
                         for the reconstructions of the test images (every model);
                         eval/sample_precision and eval/sample_recall of the samples (Kynkäänniemi et
                         al. 2019, k = 3); eval/fd_classifier_accuracy the classifier's test accuracy.
                         Data without labels: an autoencoder's bottleneck, named eval/fd_autoencoder...;
                         the tag vae_lab.fd_feature_space says which. The network is cached by the
                         data's digest (`vae_lab.evaluation.sample_quality`)

Sizes are capped by `eval.max_points` (probe, PCA, units), `eval.iwae_points` (IWAE) and
`eval.fd_samples` (sample quality) so the evaluation stays bounded on the full datasets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vae_lab import names
from vae_lab.config import Config
from vae_lab.files import write_whole
from vae_lab.data.datasets import ImageData, default_root
from vae_lab.evaluation.sample_quality import sample_quality
from vae_lab.models.losses import DEFAULT_GAUSSIAN_STD, reconstruction_nll
from vae_lab.models.priors import StandardNormal, gaussian_log_density, kl_to_standard_normal
from vae_lab.models.autoencoders import Autoencoder

ACTIVE_UNIT_THRESHOLD = 0.01
EXACT_PCA_LIMIT = 2048  # the data's smaller side up to which the PCA baseline is exact
COLLAPSE_KL_NATS = 0.1  # total KL per image below which q(z|x) says (almost) nothing about x


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    kl_per_dim: np.ndarray | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # the posterior means and labels of the (first eval.max_points) test images, for the artifacts
    test_means: np.ndarray | None = None
    test_labels: np.ndarray | None = None


@torch.no_grad()
def iwae_nll(model: Autoencoder, images: torch.Tensor, samples: int,
             generator: torch.Generator | None = None, chunk: int = 64, likelihood: str = "bernoulli",
             gaussian_std: float = DEFAULT_GAUSSIAN_STD) -> torch.Tensor:
    """Per-image -log p(x) estimated with `samples` importance samples from q(z|x).

    With one sample this is the negative ELBO with a single-sample KL estimate; with more
    it is a tighter (lower, on average) bound.
    """
    posterior = model.encode(images)
    mean, logvar = posterior.mean, posterior.logvar
    log_weights = []
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        noise = torch.randn((count, *mean.shape), generator=generator, device=mean.device)
        z = posterior.sample(noise)  # [K, B, D]
        logits = model.decode(z.reshape(-1, mean.shape[1]))
        targets = images.unsqueeze(0).expand(count, *images.shape).reshape(-1, *images.shape[1:])
        log_likelihood = -reconstruction_nll(logits.float(), targets, likelihood, gaussian_std).view(count, -1)
        log_prior = model.log_prior(z.float())  # the run's own prior
        log_posterior = gaussian_log_density(z, mean, logvar)
        log_weights.append(log_likelihood + log_prior - log_posterior)
    log_weights = torch.cat(log_weights)  # [K, B]
    return -(torch.logsumexp(log_weights, dim=0) - math.log(samples))


DECOMPOSITION_POINTS = 2000  # test images whose posteriors make the aggregate q(z): N^2 D work
# entries of one chunk's [rows, D, N] float32 table: 4 MB, so it stays in the CPU's cache
DECOMPOSITION_CHUNK_ENTRIES = 2 ** 20


@torch.no_grad()
def kl_decomposition(means: torch.Tensor, logvars: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """Chen et al. (2018)'s decomposition of E_x KL(q(z|x) || N(0, I)) over N images, with one
    z_n ~ q(z|x_n) each and the aggregate posterior q(z) = (1/N) Σ_m q(z|x_m) of the same images:

        mutual information   E[log q(z_n|x_n) - log q(z_n)]
        total correlation    E[log q(z_n) - Σ_j log q(z_nj)]
        dimension-wise KL    E[Σ_j log q(z_nj) - log p(z_nj)]

    Their sum is the one-sample estimate E[log q(z_n|x_n) - log p(z_n)] term by term; each is a
    consistent (for small N, biased) estimate. Needs a factorized prior: the standard normal.

    log q(z_n | x_m) for every pair is two float64 matrix products (the squares expanded); the
    marginals log q(z_nj) need every (n, j, m), N^2 D terms, summed in float32 (2.6x faster at
    N = 1000, D = 16; the terms move in their 7th digit). Each quantity enters two terms with
    opposite signs, so the three still add up to the one-sample estimate exactly."""
    means, logvars = means.double(), logvars.double()
    count = means.shape[0]
    noise = torch.randn(means.shape, generator=generator, device=generator.device if generator else None)
    z = means + noise.to(means) * torch.exp(0.5 * logvars)
    log_conditional = gaussian_log_density(z, means, logvars)  # [N]
    precision = torch.exp(-logvars)  # [N, D]
    constants = (-0.5 * (math.log(2 * math.pi) + logvars) - 0.5 * means.square() * precision).sum(1)  # [N]
    log_pairs = constants - 0.5 * z.square() @ precision.T + z @ (means * precision).T  # [n, m]: log q(z_n | x_m)
    log_aggregate = torch.logsumexp(log_pairs, dim=1) - math.log(count)
    # every image's posterior as [D, N], so the sums over images run along contiguous memory
    means_t = means.T.contiguous().float()
    inverse_std_t = torch.exp(-0.5 * logvars).T.contiguous().float()
    offset_t = (-0.5 * (math.log(2 * math.pi) + logvars)).T.contiguous().float()
    samples = z.float()
    log_marginals = []
    chunk = max(1, DECOMPOSITION_CHUNK_ENTRIES // means.numel())
    for start in range(0, count, chunk):
        rows = samples[start:start + chunk].unsqueeze(2)  # [c, D, 1]
        per_dim = (rows - means_t).mul_(inverse_std_t).square_().mul_(-0.5).add_(offset_t)  # [c, D, N]: log q(z_cd | x_n)
        log_marginals.append(torch.logsumexp(per_dim, dim=2))
    log_marginals = torch.cat(log_marginals).double() - math.log(count)  # [N, D]
    log_prior_marginals = -0.5 * (math.log(2 * math.pi) + z.square())  # [N, D]
    return {names.EVAL_MUTUAL_INFO: float((log_conditional - log_aggregate).mean()),
            names.EVAL_TOTAL_CORRELATION: float((log_aggregate - log_marginals.sum(-1)).mean()),
            names.EVAL_DIMWISE_KL: float((log_marginals - log_prior_marginals).sum(-1).mean())}


def active_units(latent_means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions whose posterior mean varies across the data (Cov_x(E_q[z]) > threshold)."""
    return int((latent_means.var(axis=0) > threshold).sum())


def principal_components(train, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], basis [k, D]) of a PCA in float64. Exact while the smaller side of the N x D
    data is at most EXACT_PCA_LIMIT: the top eigenvectors of the D x D covariance when N >= D
    (the same subspace as a full SVD, and for N >> D much faster), else a thin SVD. Beyond it
    (10,000 64x64 colour images: D = 12,288) a randomized SVD with power iterations (Halko et
    al. 2011), whose top-k subspace matches the exact one to a few digits."""
    data = torch.tensor(np.asarray(train), dtype=torch.float64)
    mean = data.mean(dim=0)
    centred = data - mean
    rows, dims = centred.shape
    components = min(components, rows, dims)
    if min(rows, dims) > EXACT_PCA_LIMIT:
        _, _, vectors = torch.svd_lowrank(centred, q=min(components + 10, rows, dims), niter=6)
        return mean, vectors[:, :components].T
    if rows < dims:
        return mean, torch.linalg.svd(centred, full_matrices=False).Vh[:components]
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return mean, vectors[:, vectors.shape[1] - components:].flip(1).T


def pca_mse_per_pixel(train_pixels, test_pixels, components: int) -> float:
    """Test reconstruction MSE per pixel of a PCA with `components` components."""
    mean, basis = principal_components(train_pixels, components)
    centred = torch.tensor(np.asarray(test_pixels), dtype=torch.float64) - mean
    return float((centred @ basis.T @ basis - centred).square().mean())


PCA_CACHE_VERSION = 1  # bump when pca_mse_per_pixel's arithmetic changes


def pca_baseline(data: ImageData, train_pixels, test_pixels, components: int, cap: int, seed: int | None) -> float:
    """`pca_mse_per_pixel` of these pixels, which depend on the data, the cap and (under dynamic
    binarization) the seed alone: computed once per data, then kept in memory (the trials of a
    study) and in ~/.cache/vae_lab/pca_baselines/, keyed by the data's digest (later runs: 0.6 s
    saved on Fashion-MNIST's 10,000 x 784 pixels). A file that cannot be read is computed again."""
    key = ("pca_mse_per_pixel", components, cap, seed)
    if key not in data.derived:
        path = (default_root() / "pca_baselines"
                / f"v{PCA_CACHE_VERSION}-{data.digest}-k{components}-n{cap}{'' if seed is None else f'-s{seed}'}.json")
        try:
            data.derived[key] = float(json.loads(path.read_text())["mse"])
        except (OSError, ValueError, KeyError, TypeError):
            data.derived[key] = pca_mse_per_pixel(train_pixels, test_pixels, components)
            write_whole(path, lambda handle: handle.write(json.dumps({"mse": data.derived[key]}).encode()))
    return data.derived[key]


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's StandardScaler: the train mean and (population) std; a constant feature keeps scale 1."""
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def logistic_probe_accuracy(train_features, train_labels, test_features, test_labels,
                            l2_inverse: float = 1.0, max_iter: int = 500) -> float:
    """Accuracy of a multinomial logistic regression on standardized features: scikit-learn's
    `make_pipeline(StandardScaler(), LogisticRegression(C=1.0))`, solved as it solves it: its
    objective (mean cross-entropy plus ||W||^2 / (2 C N), intercept unpenalized, every class its
    own weights, from zeros) with its analytic gradient, minimized by SciPy's L-BFGS-B with its
    settings (stop when the gradient's largest entry is under 1e-4). Without scikit-learn, whose
    import alone costs a one-run process about 1 s; SciPy's L-BFGS-B needs about 6x fewer
    evaluations than torch's L-BFGS and matches scikit-learn's result. NumPy's BLAS runs on one
    thread: its idle threads would otherwise spin on the cores torch trains on next."""
    from scipy.optimize import minimize  # about 0.2 s, once per process: only where a probe runs

    train = torch.from_numpy(np.asarray(train_features, dtype=np.float64))
    test = torch.from_numpy(np.asarray(test_features, dtype=np.float64))
    train, test = (np.concatenate([split.numpy(), np.ones((split.shape[0], 1))], axis=1)  # the intercept's column
                   for split in _standardize(train, test))
    classes, targets = np.unique(np.asarray(train_labels), return_inverse=True)
    count, width = train.shape
    rows = np.arange(count)
    train_t = np.ascontiguousarray(train.T)
    penalized = np.ones((width, 1))
    penalized[-1] = 0.0  # the intercept's row
    strength = 1.0 / (l2_inverse * count)

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        # The logits are held class by point ([classes, N]): reducing over a short inner axis (the
        # classes, in [N, classes]) is 10x slower in NumPy, and torch's exp is 3x faster than NumPy's.
        # Together they halve the probe's time.
        weights = flat.reshape(width, len(classes))
        logits = weights.T @ train_t
        logits -= np.maximum.reduce(logits, axis=0)
        probabilities = np.empty_like(logits)
        torch.exp(torch.from_numpy(logits), out=torch.from_numpy(probabilities))
        normalizer = np.add.reduce(probabilities, axis=0)
        loss = (np.log(normalizer).sum() - logits[targets, rows].sum()) / count \
            + 0.5 * strength * float((penalized * weights * weights).sum())
        probabilities /= normalizer
        probabilities[targets, rows] -= 1.0  # minus the one-hot targets
        gradient = train_t @ probabilities.T
        gradient /= count
        gradient += strength * penalized * weights
        return loss, gradient.ravel()

    with blas_on_one_thread():
        solution = minimize(objective, np.zeros(width * len(classes)), jac=True, method="L-BFGS-B",
                            options={"maxiter": max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
    predicted = classes[(test @ solution.x.reshape(width, len(classes))).argmax(axis=1)]
    return float(np.mean(predicted == np.asarray(test_labels)))


_blas_threads = None  # threadpoolctl's controller: finding the BLAS libraries costs 3-13 ms a time


def blas_on_one_thread():
    """NumPy's BLAS held to one thread (a context manager)."""
    global _blas_threads
    if _blas_threads is None:
        from threadpoolctl import ThreadpoolController

        _blas_threads = ThreadpoolController()
    return _blas_threads.limit(limits=1, user_api="blas")


KNN_CHUNK_ENTRIES = 2 ** 21  # test-to-train distances per chunk: 8 MB, so topk reads them from the cache


def knn_accuracy(train_features, train_labels, test_features, test_labels, neighbours: int = 5) -> float:
    """Accuracy of a `neighbours`-nearest-neighbour vote (Euclidean), ties going to the smallest
    label, as scikit-learn's KNeighborsClassifier decides them. The test points go in chunks whose
    distance table stays in the CPU's cache (10,000 x 10,000 points: 0.23 s against 0.5 s in
    chunks of 2,048 rows)."""
    train = torch.from_numpy(np.asarray(train_features, dtype=np.float32))
    test = torch.from_numpy(np.asarray(test_features, dtype=np.float32))
    chunk = max(1, KNN_CHUNK_ENTRIES // max(1, train.shape[0]))
    classes, train_codes = np.unique(np.asarray(train_labels), return_inverse=True)
    train_codes = torch.from_numpy(train_codes)
    neighbours = min(neighbours, train.shape[0])
    predicted = []
    for start in range(0, test.shape[0], chunk):
        nearest = torch.cdist(test[start:start + chunk], train).topk(neighbours, largest=False).indices
        votes = torch.nn.functional.one_hot(train_codes[nearest], len(classes)).sum(dim=1)
        predicted.append(votes.argmax(dim=1))  # the first (smallest) label among the most voted
    predicted = classes[torch.cat(predicted).numpy()]
    return float(np.mean(predicted == np.asarray(test_labels)))


def probe_accuracies(train_features: np.ndarray, train_labels: np.ndarray,
                     test_features: np.ndarray, test_labels: np.ndarray) -> dict[str, float]:
    return {names.EVAL_PROBE: logistic_probe_accuracy(train_features, train_labels, test_features, test_labels),
            names.EVAL_KNN: knn_accuracy(train_features, train_labels, test_features, test_labels)}


@torch.no_grad()
def _encode_split(model: Autoencoder, data: ImageData, split: str, limit: int, generator,
                  batch_size: int = 1000, logvars: list | None = None, reconstructions: list | None = None):
    """Pixels, posterior means and labels of (at most `limit`) images of `split`; on the test split
    also the per-dimension KL sums and the reconstructions' squared error, and (into
    `reconstructions`) the reconstructions themselves, as images in [0, 1]."""
    pixels, means, labels, kl_sums, squared_error = [], [], [], None, 0.0
    for images, batch_labels in data.batches(split, batch_size, limit=limit, noise_generator=generator):
        posterior = model.encode(images)
        means.append(posterior.mean.float().cpu())
        if logvars is not None and posterior.logvar is not None:
            logvars.append(posterior.logvar.float().cpu())
        labels.append(batch_labels.cpu())
        pixels.append(images.flatten(1).cpu())
        if split == "test":
            reconstructed = torch.sigmoid(model.decode(posterior.mean).float())
            squared_error += (reconstructed - images).square().sum().item()
            if reconstructions is not None:
                reconstructions.append(reconstructed)
            if model.variational and model.prior.analytic_kl:  # per dimension only where it is exact
                kl = kl_to_standard_normal(posterior).float().sum(dim=0).cpu()
                kl_sums = kl if kl_sums is None else kl_sums + kl
    return (torch.cat(pixels).numpy(), torch.cat(means).numpy(), torch.cat(labels).numpy(),
            kl_sums, squared_error)


@torch.no_grad()
def evaluate_model(model: Autoencoder, data: ImageData, config: Config,
                   device: torch.device) -> EvaluationResult:
    model.eval()
    cap = config.eval.max_points
    seed = config.train.seed + 2_000_003
    generator = torch.Generator(device=device).manual_seed(seed)
    train_pixels, train_means, train_labels, _, _ = _encode_split(model, data, "train", cap, generator)
    test_logvars: list = []
    reconstructions: list = []  # of the test images, which sample quality scores too
    test_pixels, test_means, test_labels, kl_sums, squared_error = _encode_split(
        model, data, "test", cap, generator, logvars=test_logvars, reconstructions=reconstructions)

    metrics = {names.EVAL_MSE: squared_error / test_pixels.size,
               names.EVAL_PCA_MSE: pca_baseline(data, train_pixels, test_pixels, model.latent_dim, cap,
                                                config.train.seed if data.binarize == "dynamic" else None)}
    if data.labeled and len(np.unique(train_labels)) > 1:  # a probe needs classes to tell apart
        metrics.update(probe_accuracies(train_means, train_labels, test_means, test_labels))
    result = EvaluationResult(metrics, test_means=test_means, test_labels=test_labels)
    quality, feature_space = sample_quality(model, data, config.eval.fd_samples, seed,
                                            reconstructions=torch.cat(reconstructions))
    metrics.update(quality)
    result.tags[names.FD_FEATURE_SPACE_TAG] = feature_space

    if model.variational:
        units = active_units(test_means)
        metrics[names.EVAL_ACTIVE_UNITS] = float(units)
        metrics[names.EVAL_ACTIVE_FRACTION] = units / model.latent_dim
        if kl_sums is not None:
            result.kl_per_dim = (kl_sums / test_pixels.shape[0]).numpy()
            collapsed = float(result.kl_per_dim.sum()) < COLLAPSE_KL_NATS or units == 0
        else:  # a prior without a per-dimension KL: no latent dimension moves with the data
            collapsed = units == 0
        if isinstance(model.prior, StandardNormal):  # its marginals are known
            points = min(DECOMPOSITION_POINTS, test_means.shape[0])
            metrics.update(kl_decomposition(torch.from_numpy(test_means[:points]),
                                            torch.cat(test_logvars)[:points], torch.Generator().manual_seed(seed)))
        result.tags[names.POSTERIOR_COLLAPSE_TAG] = str(collapsed).lower()
        if config.likelihood_is_normalized:
            nll_total, count = 0.0, 0
            for images, _ in data.batches("test", 100, limit=config.eval.iwae_points, noise_generator=generator):
                nll_total += iwae_nll(model, images, config.eval.iwae_samples, generator,
                                      likelihood=config.loss.likelihood,
                                      gaussian_std=config.loss.gaussian_std).sum().item()
                count += images.shape[0]
            metrics[names.EVAL_NLL_IWAE] = nll_total / count
            result.tags[names.NLL_IWAE_TAG] = f"{config.eval.iwae_samples} samples on {count} test images"
        else:
            result.tags[names.NLL_IWAE_TAG] = ("not computed: a Bernoulli likelihood on grey pixels is not a normalized "
                                       "likelihood; use data.binarize=dynamic or static, or loss.likelihood=gaussian")
    return result
