"""An 8-point KL-weight (or free-bits) study of seed 001's linear VAE on mnist5k: batched against one-by-one.

    python benchmarks/sweep.py                     # 10 epochs (the seed's), device=auto
    python benchmarks/sweep.py --epochs 3 --threads 1 --amp
    python benchmarks/sweep.py --sweep free_bits   # 8 values of loss.free_bits (kl_weight 1) instead
    python benchmarks/sweep.py --study experiments/default.yaml   # a whole study: where its time goes

Seed 001's MLP VAE (32 px, 1024-128-64-32 encoder, latent 2, Gaussian likelihood, Adam 5e-4,
batch 64; experiments/runs/seed001_linear_vae.yaml) at 8 KL weights, tracked in a temporary
MLflow store as two studies (a parent run each, one child run per trial):
  one-by-one  `vae_lab.train.train` per config, one after another
  batched     `vae_lab.training.run.run_trials` on all 8 at once (one pass over the data)
Prints the total seconds of each, the median seconds of one trial alone, the ratio
batched / single trial (goal: <= 3x on a 2-core CPU, <= 1.5x on a GPU), the split of the
batched time into the shared training pass and the per-trial rest (run creation, per-epoch
test evaluation, eval/* metrics, images, model logging), and how far each trial's batched
test loss is from its one-by-one twin (same seed, same data order: should be ~0).

With `--study FILE` it runs that study instead (`python -m vae_lab.sweep FILE`, in this process,
on a temporary store) and breaks each batch down: its shared training pass, the rest of its
epochs (val/*, checkpoints, latent frames), and its trials' end-of-run work stage by stage
(`vae_lab.training.finalize.END_OF_RUN_SECONDS`). Goal (issue 22): each trial's end-of-run work
at most 20% of its share of its batch's training pass.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

from _common import machine_line, ratio, set_threads, temporary_store

from mlflow.tracking import MlflowClient  # noqa: E402

import vae_lab.study.trials  # noqa: E402
from vae_lab.training.finalize import END_OF_RUN_SECONDS  # noqa: E402
from vae_lab.training.run import run_trials  # noqa: E402
from vae_lab.training.trial import TrialSpec  # noqa: E402
from vae_lab.config import load_config  # noqa: E402
from vae_lab.data.datasets import load_data  # noqa: E402
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED_001_VAE = REPO / "experiments" / "runs" / "seed001_linear_vae.yaml"
SWEEPS = {"kl_weight": ("loss.kl_weight", (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)),
          "free_bits": ("loss.free_bits", (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0))}
EXPERIMENT = "sweep_benchmark"


def configs_for(args, uri: str, epochs: int | None = None):
    common = ["data.name=mnist5k", f"device={args.device}", f"train.amp={str(args.amp).lower()}",
              f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", "train.progress=false"]
    if epochs or args.epochs:
        common.append(f"train.epochs={epochs or args.epochs}")
    key, values = SWEEPS[args.sweep]
    return [load_config(SEED_001_VAE, [*common, f"{key}={value}"]) for value in values]


def swept_value(args, config) -> float:
    return config.flat()[SWEEPS[args.sweep][0]]


def study_parent(client: MlflowClient, experiment_id: str, name: str, swept: str) -> str:
    run = client.create_run(experiment_id, run_name=name, tags={
        "vae_lab.role": "study", "vae_lab.study_name": name, "vae_lab.swept_params": swept,
        "vae_lab.objectives": "val/loss:minimize", "vae_lab.sampler": "grid"})
    return run.info.run_id


def trial_tags(name: str, number: int) -> dict[str, str]:
    return {"vae_lab.role": "trial", "vae_lab.study_name": name, "vae_lab.trial_number": str(number)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=0, help="0 = the seed config's 10")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (train.amp=true) in both modes")
    parser.add_argument("--sweep", default="kl_weight", choices=sorted(SWEEPS), help="the swept loss key")
    parser.add_argument("--study", type=Path, help="break this study file's run down instead")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line(device))
    if args.study:
        return study_breakdown(args.study)

    with temporary_store() as uri:
        prepare_store(uri)
        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, EXPERIMENT, uri)
        configs = configs_for(args, uri)
        data = load_data(configs[0].data, device)
        swept = SWEEPS[args.sweep][0]
        print(f"seed 001 linear VAE, {len(configs)} values of {swept}, {configs[0].train.epochs} epochs, "
              f"mnist5k ({data.train_images.shape[0]} train images), amp={args.amp}\n")
        # untimed warm-up: imports, the store's first writes, kernel caches
        train(configs_for(args, uri, epochs=1)[0], data=data, run_name="warm-up")

        alone_parent = study_parent(client, experiment_id, "one-by-one", swept)
        alone_seconds, alone_results = [], []
        for number, config in enumerate(configs):
            started = time.perf_counter()
            alone_results.append(train(config, data=data, parent_run_id=alone_parent,
                                       run_name=f"{args.sweep}={swept_value(args, config):g}",
                                       tags=trial_tags("one-by-one", number)))
            alone_seconds.append(time.perf_counter() - started)
        client.set_terminated(alone_parent)

        batched_parent = study_parent(client, experiment_id, "batched", swept)
        pass_seconds: list[float] = []
        record = [lambda epoch, metrics: pass_seconds.append(metrics["train/epoch_seconds"])]
        specs = [TrialSpec(config, run_name=f"{args.sweep}={swept_value(args, config):g}", tags=trial_tags("batched", number),
                           on_epoch_end=callback)
                 for number, (config, callback) in enumerate(zip(configs, record + [None] * (len(configs) - 1)))]
        started = time.perf_counter()
        batched_results = run_trials(specs, data=data, parent_run_id=batched_parent)
        batched_total = time.perf_counter() - started
        client.set_terminated(batched_parent)
        finished = [run.info.status for run in client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{batched_parent}'")]

    print(f"{args.sweep:>9s} {'alone s':>8s} {'test/loss alone':>16s} {'batched':>10s} {'diff':>8s}")
    gaps = []
    for config, seconds, alone, batched in zip(configs, alone_seconds, alone_results, batched_results):
        if isinstance(batched, BaseException):
            print(f"{swept_value(args, config):9g} {seconds:8.1f} {alone.metrics['test/loss']:16.3f}   {batched!r}")
            continue
        gap = abs(batched.metrics["test/loss"] - alone.metrics["test/loss"]) / alone.metrics["test/loss"]
        gaps.append(gap)
        print(f"{swept_value(args, config):9g} {seconds:8.1f} {alone.metrics['test/loss']:16.3f} "
              f"{batched.metrics['test/loss']:10.3f} {gap:8.1e}")
    single = statistics.median(alone_seconds)
    one_by_one = sum(alone_seconds)
    training_pass = sum(pass_seconds)
    print(f"\nbatched child runs: {', '.join(sorted(set(finished)))} ({len(finished)})")
    print(f"one-by-one total      {one_by_one:7.1f} s")
    print(f"single trial (median) {single:7.1f} s")
    print(f"batched total         {batched_total:7.1f} s  (training pass {training_pass:.1f} s, "
          f"per-trial rest {batched_total - training_pass:.1f} s)")
    goal = "1.5x (GPU)" if device.type == "cuda" else "3x (2-core CPU)"
    print(f"batched / single      {ratio(batched_total, single)}   goal <= {goal}")
    print(f"one-by-one / batched  {ratio(one_by_one, batched_total)}")
    print(f"largest test/loss gap batched vs alone: {max(gaps):.1e} (criterion 1%)" if gaps else "no trial finished")
    return 0


# the parts of eval/* (vae_lab.evaluation.metrics.evaluate_model), timed by wrapping them here
EVAL_PARTS = {"_encode_split": "encode", "probe_accuracies": "probes", "kl_decomposition": "KL decomposition",
              "iwae_nll": "IWAE", "sample_quality": "sample quality", "pca_mse_per_pixel": "PCA"}


def time_eval_parts(seconds: collections.Counter) -> None:
    """Count the seconds spent in each of EVAL_PARTS into `seconds`."""
    from vae_lab.evaluation import metrics

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[EVAL_PARTS[name]] += time.perf_counter() - started
        return call

    for name in EVAL_PARTS:
        setattr(metrics, name, timed(name, getattr(metrics, name)))


def study_breakdown(study_file: Path) -> int:
    """Run a whole study and print where each batch's time went."""
    from vae_lab.sweep import main as sweep_main

    batches = []
    eval_seconds: collections.Counter = collections.Counter()
    time_eval_parts(eval_seconds)

    def timed_run_trials(specs, **kwargs):
        before, started = END_OF_RUN_SECONDS.copy(), time.perf_counter()
        eval_before = eval_seconds.copy()
        outcomes = run_trials(specs, **kwargs)
        batches.append({"model": specs[0].config.model.name, "trials": len(specs),
                        "seconds": time.perf_counter() - started, "end": END_OF_RUN_SECONDS - before,
                        "eval": eval_seconds - eval_before,
                        "run_ids": [outcome.run_id for outcome in outcomes if hasattr(outcome, "run_id")]})
        return outcomes

    vae_lab.study.trials.run_trials = timed_run_trials
    with temporary_store() as uri:
        started = time.perf_counter()
        code = sweep_main([str(study_file), "--tracking-uri", uri])
        total = time.perf_counter() - started
        client = MlflowClient(uri)
        for batch in batches:
            batch["training"] = sum(metric.value for metric in client.get_metric_history(
                batch["run_ids"][0], "train/epoch_seconds")) if batch["run_ids"] else float("nan")
    stages = sorted({stage for batch in batches for stage in batch["end"]}, key=lambda stage: -sum(
        batch["end"][stage] for batch in batches))
    print(f"\n{study_file.name}: {total:.1f} s in all (exit {code}); per batch, seconds:")
    print(f"{'batch':>12s} {'K':>2s} {'pass':>6s} {'share':>6s} {'rest':>6s} {'end/trial':>9s} {'end/share':>9s}  "
          + "  ".join(f"{stage}" for stage in stages))
    worst = 0.0
    for batch in batches:
        trials = batch["trials"]
        end = sum(batch["end"].values())
        share = batch["training"] / trials
        rest = batch["seconds"] - batch["training"] - end
        worst = max(worst, end / trials / share)
        print(f"{batch['model']:>12s} {trials:2d} {batch['training']:6.2f} {share:6.2f} {rest:6.2f} "
              f"{end / trials:9.2f} {end / trials / share:8.0%}  "
              + "  ".join(f"{batch['end'][stage] / trials:{len(stage)}.3f}" for stage in stages))
    parts = list(EVAL_PARTS.values())
    print(f"\neval/* per trial, by part:\n{'batch':>12s}  " + "  ".join(parts))
    for batch in batches:
        print(f"{batch['model']:>12s}  " + "  ".join(f"{batch['eval'][part] / batch['trials']:{len(part)}.3f}"
                                                     for part in parts))
    training = sum(batch["training"] for batch in batches)
    end = sum(sum(batch["end"].values()) for batch in batches)
    print(f"all batches: training passes {training:.1f} s, end-of-run work {end:.1f} s ({end / training:.0%} of "
          f"training; worst batch {worst:.0%} of a trial's share; goal <= 20%)")
    return code


if __name__ == "__main__":
    sys.exit(main())
