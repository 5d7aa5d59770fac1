"""A published result reproduced: the test NLL of a gated-MLP VAE on dynamically binarized Fashion-MNIST.

    python benchmarks/nll_reference.py                          # the whole protocol (up to 2000 epochs)
    python benchmarks/nll_reference.py train.epochs=300         # a shorter run (not the protocol: say so)
    python benchmarks/nll_reference.py device=cuda
    python benchmarks/nll_reference.py --resume RUN_ID          # continue a stopped run from its checkpoint

Trains `experiments/runs/fashion_mnist_nll.yaml` (the VampPrior code's protocol, see that file)
with `vae_lab.train.train`, tracked in MLflow (experiment `fashion_mnist_nll`, default store),
then prints `eval/nll_iwae` (5000 importance samples on the 10,000 test images) beside the
published figure for that protocol, with the epochs trained and the time taken. On a 2-core
CPU the whole protocol takes hours (early stopping decides); on a GPU, minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import machine_line

from vae_lab.config import ConfigError, load_config  # noqa: E402
from vae_lab.data.datasets import DEBIAN_FASHION_MNIST, DataUnavailable  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import resumable_run, train  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "fashion_mnist_nll.yaml"
# Norouzi, Fleet & Norouzi, "Exemplar VAE", NeurIPS 2020, Table 1 (test NLL in nats, 5000
# importance samples, mean ± std over runs), "VAE w/ Gaussian prior" on Fashion-MNIST: -228.70 ± 0.15
# as a log-likelihood. Checked against the table as the authors publish it in their repository,
# github.com/sajadn/Exemplar-VAE, images/density_estimation.png (commit 4dbd091).
PUBLISHED = {"source": "Exemplar VAE (NeurIPS 2020), Table 1, VAE w/ Gaussian prior, Fashion-MNIST",
             "nll": 228.70, "std": 0.15}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/nll_reference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run of this protocol")
    parser.add_argument("overrides", nargs="*", help="section.key=value (with --resume: device, tracking.uri)")
    args = parser.parse_args(argv)
    overrides, resume = args.overrides, None
    try:
        if args.resume:
            config, resume = resumable_run(args.resume, None, overrides)
        else:
            config = load_config(CONFIG, overrides)
        device = resolve_device(config.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(machine_line(device))
    print(f"{CONFIG.relative_to(CONFIG.parents[2])} {' '.join(overrides)}".rstrip()
          + (f" (continuing run {args.resume} from epoch {resume.checkpoint.epoch})" if resume else ""))
    protocol = config.train.epochs == 2000 and config.train.early_stopping_patience == 50
    started = time.perf_counter()
    try:
        result = train(config, resume=resume)
    except DataUnavailable as error:
        print(f"error: {error} ({DEBIAN_FASHION_MNIST})", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    metrics = result.metrics
    nll = metrics["eval/nll_iwae"]
    stopped, best = int(metrics["train/stopped_epoch"]), int(metrics["train/best_epoch"])
    print(f"\nrun {result.run_id} (MLflow experiment {config.tracking.experiment!r})")
    print(f"epochs: {stopped} trained ({'early stopping' if stopped < config.train.epochs else 'all'}), "
          f"best val/loss at epoch {best}; {seconds / 60:.1f} min{' in this process' if resume else ''}")
    print(f"val/elbo {metrics['val/elbo']:.2f}  test/elbo {metrics['test/elbo']:.2f} nats (one sample)")
    print(f"eval/nll_iwae {nll:.2f} nats ({config.eval.iwae_samples} samples, "
          f"{min(config.eval.iwae_points, 10000)} test images)")
    print(f"published     {PUBLISHED['nll']:.2f} ± {PUBLISHED['std']:.2f}  ({PUBLISHED['source']})")
    print(f"difference    {nll - PUBLISHED['nll']:+.2f} nats"
          + ("" if protocol else "   (not the full protocol: overrides changed epochs or patience)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
