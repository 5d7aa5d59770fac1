"""Every metric and tag name vae_lab logs, in one place.

Metrics are `<split>/<term>`:

    train/*  every `tracking.log_every_steps` steps (and at each epoch's end), on the training batches
    val/*    at the end of every epoch, on the validation split (carved from train; what selects)
    test/*   once, after training, on the test split (what is reported, never what selects)
    eval/*   once, after training, on the test split (IWAE NLL, probes, active units, PCA baseline,
             sample quality)

A study's objectives, its pruner, early stopping, the best trial and the report's best rows
read `val/*` (or `train/*`): `is_selectable` says which names may choose.
"""

from __future__ import annotations

from typing import NamedTuple

TRAIN, VAL, TEST, EVAL = "train", "val", "test", "eval"
SPLIT_TERMS = ("loss", "recon", "kl", "elbo", "mse_per_pixel")

# train/*, per logging step
TRAIN_LOSS, TRAIN_RECON, TRAIN_KL, TRAIN_KL_WEIGHT = "train/loss", "train/recon", "train/kl", "train/kl_weight"
# per epoch (at the step of the epoch's last batch)
EPOCH = "epoch"
IMAGES_PER_SEC = "train/images_per_sec"
EPOCH_SECONDS = "train/epoch_seconds"
VAL_LOSS, VAL_RECON, VAL_KL, VAL_ELBO, VAL_MSE = (f"val/{term}" for term in SPLIT_TERMS)
# derived by the analysis (not logged): a VAE's KL-weight-1 objective where the likelihood is not
# normalized, so there is no val/elbo; comparable across KL weights, but a loss, not a bound
VAL_RECON_PLUS_KL = "val/recon+kl"
# once, after training
BEST_EPOCH = "train/best_epoch"  # the epoch with the lowest val/loss (its weights are kept under early stopping)
STOPPED_EPOCH = "train/stopped_epoch"  # the last epoch trained
TEST_LOSS, TEST_RECON, TEST_KL, TEST_ELBO, TEST_MSE = (f"test/{term}" for term in SPLIT_TERMS)
EVAL_NLL_IWAE = "eval/nll_iwae"
EVAL_MSE, EVAL_PCA_MSE = "eval/mse_per_pixel", "eval/pca_mse_per_pixel"
EVAL_PROBE, EVAL_KNN = "eval/probe_accuracy", "eval/knn_accuracy"
EVAL_ACTIVE_UNITS, EVAL_ACTIVE_FRACTION = "eval/active_units", "eval/active_fraction"
# the KL's decomposition (Chen et al. 2018): E_x KL(q(z|x) || p(z)) = index-code mutual information
# + total correlation + dimension-wise KL, under the aggregate posterior of the test images
EVAL_MUTUAL_INFO, EVAL_TOTAL_CORRELATION, EVAL_DIMWISE_KL = (
    "eval/mutual_info", "eval/total_correlation", "eval/dimwise_kl")
KL_DECOMPOSITION = (EVAL_MUTUAL_INFO, EVAL_TOTAL_CORRELATION, EVAL_DIMWISE_KL)


class FeatureSpaceMetrics(NamedTuple):
    """Sample quality in one feature space (`vae_lab.evaluation.sample_quality`)."""
    fd: str  # Fréchet distance, prior samples against test images (VAEs)
    fd_recon: str  # ... reconstructions of the test images against them (every model)
    precision: str  # Kynkäänniemi et al. 2019, of the prior samples (VAEs)
    recall: str
    quality: str  # how good the feature network itself is on the test split


FD_CLASSIFIER = FeatureSpaceMetrics("eval/fd_classifier", "eval/fd_classifier_recon", "eval/sample_precision",
                                    "eval/sample_recall", "eval/fd_classifier_accuracy")
# data without labels: an autoencoder's bottleneck, its reconstruction MSE per pixel as the quality
FD_AUTOENCODER = FeatureSpaceMetrics("eval/fd_autoencoder", "eval/fd_autoencoder_recon",
                                     "eval/sample_precision_autoencoder", "eval/sample_recall_autoencoder",
                                     "eval/fd_autoencoder_mse_per_pixel")
EVAL_FD, EVAL_FD_RECON = FD_CLASSIFIER.fd, FD_CLASSIFIER.fd_recon

SELECTABLE_PREFIXES = (f"{VAL}/", f"{TRAIN}/")
HELD_OUT_PREFIXES = (f"{TEST}/", f"{EVAL}/")  # scored on the test split


# what a finished run logs (a study's objectives must be among them)
ALWAYS_LOGGED = (TRAIN_LOSS, TRAIN_RECON, IMAGES_PER_SEC, EPOCH_SECONDS,
                 STOPPED_EPOCH, TEST_LOSS, TEST_RECON, TEST_MSE)
VAL_LOGGED = (VAL_LOSS, VAL_RECON, VAL_MSE, BEST_EPOCH)
VAE_LOGGED = (TRAIN_KL, VAL_KL, VAL_ELBO, TEST_KL, TEST_ELBO)
# eval/* of labelled data: without labels a run logs no probes, and FD_AUTOENCODER's names instead of
# FD_CLASSIFIER's (the config alone cannot tell; eval/* never selects, so nothing is decided on this)
EVAL_LOGGED = (EVAL_MSE, EVAL_PCA_MSE, EVAL_PROBE, EVAL_KNN, FD_CLASSIFIER.fd_recon, FD_CLASSIFIER.quality)
EVAL_VAE_LOGGED = (EVAL_ACTIVE_UNITS, EVAL_ACTIVE_FRACTION, FD_CLASSIFIER.fd, FD_CLASSIFIER.precision,
                   FD_CLASSIFIER.recall)
IWAE_METRIC = EVAL_NLL_IWAE
KNOWN_METRICS = ALWAYS_LOGGED + VAL_LOGGED + VAE_LOGGED + EVAL_LOGGED + EVAL_VAE_LOGGED + (IWAE_METRIC,)


def metrics_logged(config, variational: bool) -> set[str]:
    """The metric names a finished run with this config (a `vae_lab.config.Config`) has, its
    model `variational` (`vae_lab.models.components.is_variational`) or not."""
    metrics = set(ALWAYS_LOGGED)
    if config.data.val_size > 0:
        metrics.update(VAL_LOGGED)
    vae = variational
    if vae:
        metrics.update(name for name in VAE_LOGGED
                       if (config.data.val_size > 0 or not name.startswith("val/"))
                       and (config.likelihood_is_normalized or not name.endswith("/elbo")))
    if config.eval.enabled:
        metrics.update(EVAL_LOGGED)
        if vae:
            metrics.update(EVAL_VAE_LOGGED)
            if config.prior.name == "standard_normal":  # a prior whose marginals are known
                metrics.update(KL_DECOMPOSITION)
            if config.likelihood_is_normalized:
                metrics.add(IWAE_METRIC)
    return metrics


def split_metrics(split: str, variational: bool) -> tuple[str, ...]:
    """The names `vae_lab.training.scoring.evaluate_split` can log for `split` (val or test), in reading order:
    kl and elbo only for VAEs (elbo only where `Config.likelihood_is_normalized`)."""
    terms = SPLIT_TERMS if variational else ("loss", "recon", "mse_per_pixel")
    return tuple(f"{split}/{term}" for term in terms)


def is_selectable(metric: str) -> bool:
    """May this metric choose (objective, pruning, best trial)? Only val/* and train/* may."""
    return metric.startswith(SELECTABLE_PREFIXES)


def held_out_counterpart(metric: str) -> str | None:
    """val/recon -> test/recon: the test number reported for what val/recon selected."""
    if metric.startswith(f"{VAL}/"):
        return f"{TEST}/{metric[len(VAL) + 1:]}"
    return None


# tags
ROLE_TAG = "vae_lab.role"  # "study" on a parent run, "trial" on a child
STUDY_NAME_TAG = "vae_lab.study_name"
TRIAL_NUMBER_TAG = "vae_lab.trial_number"
CONFIGURATION_TAG = "vae_lab.configuration"  # a trial's swept values but the seed: group by it for seed means
BATCHED_TRIALS_TAG = "vae_lab.batched_trials"
PADDED_TO_TAG = "vae_lab.padded_to"  # a batch of several sizes: the widest, which each trial is held in
BEST_RUN_TAG = "vae_lab.best_run_id"
SLURM_JOB_TAG = "vae_lab.slurm_job"  # the Slurm job (ARRAY_TASK) that trained the trial last: its log is there
FAILURE_REASON_TAG = "failure_reason"
STOP_REASON_TAG = "vae_lab.stop_reason"  # "early_stopping" or "epochs"
THREADS_TAG = "vae_lab.threads"  # torch's CPU threads in the run's process, and why that many
PRECISION_TAG = "vae_lab.precision"  # what train.amp became on this device: "bf16 autocast" or "fp32"
KL_ESTIMATOR_TAG = "vae_lab.kl_estimator"  # how */kl was computed: "analytic", or a one-sample Monte Carlo estimate
RESUMED_FROM_TAG = "vae_lab.resumed_from_epoch"  # set when a run was continued from a checkpoint
EVAL_SETTINGS_TAG = "vae_lab.eval_settings"  # the eval.* settings that vae_lab.evaluate scored a run with
FD_FEATURE_SPACE_TAG = "vae_lab.fd_feature_space"  # the feature space of eval/fd_*, and how good it is
POSTERIOR_COLLAPSE_TAG = "posterior_collapse"  # "true" when the posterior carries (almost) no information
NLL_IWAE_TAG = "nll_iwae"  # how eval/nll_iwae was computed, or why it was not
MODEL_TAG, DATASET_TAG = "model", "dataset"  # model.name and data.name, for the UI's columns
DATA_DIGEST_TAG = "vae_lab.data_digest"  # sha256 of the images and labels the run trained and was scored on
DATA_SOURCE_TAG = "vae_lab.data_source"  # the file or folder they were read from
LABELS_TAG = "vae_lab.labels"  # "none" when the data has no labels (no probe accuracies, one colour in plots)
DEVICE_TAG, DEVICE_NAME_TAG = "device", "device_name"
GIT_COMMIT_TAG = "git_commit"
# on a study's parent run
SWEPT_PARAMS_TAG = "vae_lab.swept_params"  # comma-separated config keys
OBJECTIVES_TAG = "vae_lab.objectives"  # comma-separated metric:direction
SAMPLER_TAG, PRUNER_TAG = "vae_lab.sampler", "vae_lab.pruner"
OPTUNA_STORAGE_TAG = "vae_lab.optuna_storage"  # redacted
# MLflow's own: an experiment of this kind opens on its runs, not on MLflow's GenAI overview
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"  # the query that keeps MLflow's UI in model-training mode
DATASET_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}  # split -> mlflow.data.context

# artifacts of a run
CONFIG_ARTIFACT = "config.yaml"  # the run's whole config (what --resume and vae_lab.evaluate rebuild it from)
COMPONENTS_ARTIFACT_DIR = "components"  # the source files of a run's own components (file.py:Class)
MODEL_ARTIFACT = "model"  # the MLflow pytorch model (pickle format: keeps encode/decode/sample)
STATE_DICT_ARTIFACT = "model_state/state_dict.pt"  # the plain state dict, read with weights_only=True
CHECKPOINT_DIR = "checkpoint"  # a running trial's training state (two slots); removed when it finishes
