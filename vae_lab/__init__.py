"""vae_lab: train, track and compare autoencoders (AE, VAE, conv AE, conv VAE).

A package per layer along the data flow; a module imports only from its own layer and those
before it (tests/test_layers.py):

    config, names   the typed config; every metric, tag and artifact name
    data/           datasets as tensors on the device; splits; a per-process cache
    models/         model families, the posterior and its reparameterization; losses
    evaluation/     eval/* metrics, figures, artifacts, the latent-evolution GIF
    tracking/       store URIs and their redaction, the run tracker, provenance, reading logged
                    runs and studies, every private MLflow name (mlflow_compat)
    training/       the one loop for K >= 1 trials (run_trials), the step, early stopping,
                    checkpoints, batching, device policy, end-of-run finalization
    study/          a study's spec, Optuna storage, workers, claims, outcomes, repair, runner
    serve/          the page, its run catalog, its images
    train, sweep, evaluate, serve/__main__   the commands: arguments, printing, exit codes
"""

__version__ = "0.1.0"
