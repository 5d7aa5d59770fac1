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

import logging
import os

# MLflow prints "View run ... at: <tracking URI>" when a run ends, credentials and all; vae_lab's
# commands print their own links, without them (set it to false to have MLflow's back)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a bar per downloaded artifact (each checkpoint read, each image served) is noise on stderr;
# vae_lab's commands show their own progress
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's database stores log every failed statement with its traceback before raising it, and
# its system-metrics thread logs every failed write of an outage; vae_lab reports (or waits out)
# the error itself, in one line. A filter, not a level: importing MLflow resets its loggers' levels.
for _name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
    logging.getLogger(_name).addFilter(lambda record: record.levelno >= logging.CRITICAL)
