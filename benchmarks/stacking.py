"""Stacked (one vmapped step for K trials) against one by one, for one model family.

    python benchmarks/stacking.py conv_vae 3     # the default study's conv VAE, 3 seeds
    python benchmarks/stacking.py linear_vae 8

The default study's shapes (latent 16, hidden [256], conv channels [16, 32, 32]) on mnist5k, 3
epochs, batch 128, Adam 2e-3, tracking and evaluation off, after an untimed warm-up of each
mode: `run_trials` on the K seeds at once (stacked) and on each seed alone, one after another.
Prints seconds per epoch of the training pass (`train/epoch_seconds` of the last epoch) and the
ratio: what `vae_lab.training.batching.stacking_pays` decides on (benchmarks/RESULTS.md §0k).
"""

from __future__ import annotations

import sys

from _common import machine_line

import torch  # noqa: E402

from vae_lab.config import load_config  # noqa: E402
from vae_lab.data.datasets import load_data  # noqa: E402
from vae_lab.training.run import run_trials  # noqa: E402
from vae_lab.training.trial import TrialSpec  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, count = (argv + ["conv_vae", "3"][len(argv):])[:2]
    print(machine_line(torch.device("cpu")))
    common = [f"model.name={name}", "model.latent_dim=16", "model.hidden_dims=[256]", "model.conv_channels=[16,32,32]",
              "train.epochs=3", "train.batch_size=128", "train.lr=2e-3", "device=cpu", "tracking.enabled=false",
              "eval.enabled=false", "train.progress=false"]
    configs = [load_config(None, [*common, f"train.seed={seed}"]) for seed in range(int(count))]
    data = load_data(configs[0].data, "cpu", 128)
    run_trials([TrialSpec(configs[0])], data=data)  # warm-ups
    run_trials([TrialSpec(config) for config in configs], data=data, stacked=True)
    alone = sum(run_trials([TrialSpec(config)], data=data)[0].metrics["train/epoch_seconds"] for config in configs)
    stacked = run_trials([TrialSpec(config) for config in configs], data=data, stacked=True)[0].metrics[
        "train/epoch_seconds"]
    verdict = "faster" if stacked < alone else "slower"
    print(f"{name}, K={count}: one by one {alone:.2f} s/epoch, stacked {stacked:.2f} s/epoch "
          f"({max(alone, stacked) / min(alone, stacked):.2f}x {verdict} stacked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
