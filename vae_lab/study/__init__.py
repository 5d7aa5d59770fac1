"""Studies: a grid or an Optuna search over run configs, one MLflow parent run and a child per trial.

    spec       the study file: search space, objectives, sampler, pruner; trial configs
    space      the Optuna side: sampler, pruner, a trial's suggested values
    storage    the Optuna storage, the attributes vae_lab keeps there, Optuna's internals
    session    what every worker of a study shares (a plain record)
    workers    a worker's identity, counters, heartbeat, and the --workers helper processes
    claims     which trials a worker runs: grid points claimed, trials asked, retries queued
    trials     the worker loop: claimed trials trained through vae_lab.training.run
    outcomes   record_outcome: the one place that decides a trial's fate
    repair     what stopped workers left: stale trials, orphan runs
    runner     open a study (create or join), run it with helpers, finish its parent run
    summary, importance, plots, progress   the study's summary, fANOVA, Optuna's plots, the bar
"""
