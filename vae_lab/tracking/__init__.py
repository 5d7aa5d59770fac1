"""MLflow, and nothing above it:

    uris           where a store is; sqlite paths; redact(uri), the one redaction
    stores         a store made ready (SQLite template) and its experiment
    checks         is a store reachable (before anything is created)
    tracker        one run's lifecycle: params, buffered metrics, artifacts, model, status
    errors         which errors mean "the store is down"
    provenance     source tags, environment tags, dataset inputs
    links          links into MLflow's UI
    logged         a finished run's config and model, read back
    studies        the one lookup of a study, its trials and its best run
    mlflow_compat  every private MLflow name vae_lab uses
"""
