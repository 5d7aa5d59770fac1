"""What a prior or an objective costs: training epochs of the Fashion-MNIST protocol's VAE, side by side.

    python benchmarks/epoch_cost.py                # 2 epochs each on Fashion-MNIST (mnist5k if absent)
    python benchmarks/epoch_cost.py --epochs 1 --device cuda

The model and batch of experiments/runs/fashion_mnist_nll.yaml (gated MLP 300-300, latent 40,
batch 100, dynamic binarization) trained for a few epochs as the ELBO with the standard normal
prior, then with `prior.name` mog (500 components) and vampprior (500 pseudo-inputs: each step
also encodes the 500 pseudo-inputs and evaluates a 500-component mixture per image), and with
the IWAE objective of 5 samples (`loss.objective=iwae loss.iwae_samples=5`: 5 decoder passes
per image); tracking and evaluation off. Prints each arm's median epoch time, its images per
second, and its ratio to the standard ELBO's, measured in one process, one after the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import machine_line, ratio, set_threads

from vae_lab.config import load_config  # noqa: E402
from vae_lab.data.datasets import load_data  # noqa: E402
from vae_lab.data.sources import DEBIAN_FASHION_MNIST  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import train  # noqa: E402

PROTOCOL = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "fashion_mnist_nll.yaml"
ARMS = {"elbo, standard normal": ["prior.name=standard_normal"],
        "elbo, mog 500": ["prior.name=mog", "prior.components=500"],
        "elbo, vampprior 500": ["prior.name=vampprior", "prior.components=500"],
        "iwae k=5": ["loss.objective=iwae", "loss.iwae_samples=5"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line(device))
    dataset = "fashion-mnist" if DEBIAN_FASHION_MNIST.is_dir() else "mnist5k"
    common = [f"data.name={dataset}", f"device={args.device}", f"train.epochs={args.epochs}",
              "train.early_stopping_patience=0", "train.checkpoint_every=0", "train.progress=false",
              "tracking.enabled=false", "eval.enabled=false"]
    configs = {arm: load_config(PROTOCOL, [*common, *overrides]) for arm, overrides in ARMS.items()}
    first = next(iter(configs.values()))
    data = load_data(first.data, device, first.train.batch_size)
    print(f"{dataset}: {data.train_images.shape[0]} training images, batch {first.train.batch_size}, "
          f"{args.epochs} epochs per arm\n")
    train(load_config(PROTOCOL, [*common, "train.epochs=1", "data.train_limit=2000", "data.val_size=0.1"]))  # warm-up
    seconds = {}
    for arm, config in configs.items():
        history = []
        train(config, data=data, on_epoch_end=lambda epoch, metrics: history.append(metrics["train/epoch_seconds"]))
        seconds[arm] = statistics.median(history)
    base = seconds["elbo, standard normal"]
    print(f"{'arm':>22s} {'epoch s':>8s} {'images/s':>9s} {'vs standard ELBO':>17s}")
    for arm, value in seconds.items():
        print(f"{arm:>22s} {value:8.2f} {data.train_images.shape[0] / value:9.0f} {ratio(value, base):>17s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
