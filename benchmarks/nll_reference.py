"""A published result reproduced: the test NLL of a gated-MLP VAE on dynamically binarized Fashion-MNIST.

    python benchmarks/nll_reference.py                          # the whole protocol (up to 2000 epochs)
    python benchmarks/nll_reference.py --arm vampprior          # the same with a 500-pseudo-input VampPrior
    python benchmarks/nll_reference.py train.epochs=300         # a shorter run (not the protocol: say so)
    python benchmarks/nll_reference.py device=cuda
    python benchmarks/nll_reference.py --resume RUN_ID          # continue a stopped run from its checkpoint

Trains `experiments/runs/fashion_mnist_nll.yaml` (the VampPrior code's protocol, see that file),
or with `--arm vampprior` `experiments/runs/fashion_mnist_nll_vampprior.yaml`, with
`vae_lab.train.train`, tracked in MLflow (experiment `fashion_mnist_nll`, default store), then
prints `eval/nll_iwae` (5000 importance samples on the 10,000 test images) beside the published
figures of both arms, with the epochs trained and the time taken. On a 2-core
CPU the whole protocol takes hours (early stopping decides); on a GPU, minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import machine_line

from vae_lab.config import ConfigError, load_config  # noqa: E402
from vae_lab.data.datasets import DataUnavailable  # noqa: E402
from vae_lab.data.sources import DEBIAN_FASHION_MNIST  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import resumable_run, train  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "experiments" / "runs"
CONFIGS = {"gaussian": RUNS / "fashion_mnist_nll.yaml", "vampprior": RUNS / "fashion_mnist_nll_vampprior.yaml"}
# Norouzi, Fleet & Norouzi, "Exemplar VAE", NeurIPS 2020, Table 1 (test NLL in nats, 5000
# importance samples, mean ± std over runs), "VAE w/ Gaussian prior" on Fashion-MNIST: -228.70 ± 0.15
# as a log-likelihood. Checked against the table as the authors publish it in their repository,
# github.com/sajadn/Exemplar-VAE, images/density_estimation.png (commit 4dbd091).
# The VampPrior arm, the same table's "VAE w/ VampPrior": -227.35 ± 0.05.
PUBLISHED = {"gaussian": {"source": "Exemplar VAE (NeurIPS 2020), Table 1, VAE w/ Gaussian prior, Fashion-MNIST",
                          "nll": 228.70, "std": 0.15},
             "vampprior": {"source": "Exemplar VAE (NeurIPS 2020), Table 1, VAE w/ VampPrior, Fashion-MNIST",
                           "nll": 227.35, "std": 0.05}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/nll_reference.py", description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=sorted(CONFIGS), default="gaussian", help="the prior (default gaussian)")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run of this protocol")
    parser.add_argument("overrides", nargs="*", help="section.key=value (with --resume: device, tracking.uri)")
    args = parser.parse_args(argv)
    overrides, resume = args.overrides, None
    try:
        if args.resume:
            config, resume = resumable_run(args.resume, None, overrides)
        else:
            config = load_config(CONFIGS[args.arm], overrides)
        device = resolve_device(config.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(machine_line(device))
    arm = "vampprior" if config.prior.name == "vampprior" else "gaussian"  # a resumed run says which
    print(f"{CONFIGS[arm].relative_to(RUNS.parents[1])} {' '.join(overrides)}".rstrip()
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
    for name, published in PUBLISHED.items():
        print(f"published     {published['nll']:.2f} ± {published['std']:.2f}  ({published['source']})"
              + ("   <- this arm" if name == arm else ""))
    print(f"difference    {nll - PUBLISHED[arm]['nll']:+.2f} nats from this arm's figure"
          + ("" if protocol else "   (not the full protocol: overrides changed epochs or patience)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
