"""Trials of different sizes padded into one pass, against one size at a time (issue 22 part 3).

    python benchmarks/padding.py            # fit the step-cost model, then seed 000's study
    python benchmarks/padding.py --quick    # one round, fewer widths

Seed 000's LinearVAE sizes (hidden h, latent h/8 for h = 32..512) on mnist5k, batch 128,
3 epochs, tracking and evaluation off, after an untimed warm-up; each figure is the last epoch's
`train/epoch_seconds` (the training pass), divided by its steps:

1. the step-cost model of `vae_lab.training.padding.STEP_COST`: each width alone (c0 + c1·f)
   and K = 2 and 4 seeds of it stacked (s0 + K·(s2 + s1·f)), f = one step's forward FLOPs,
   least squares over the widths, best of two each;
2. seed 000's five sizes: one by one, all five padded into one pass, and the batches
   `plan_batches` chooses, side by side, with the modelled seconds beside the measured ones;
3. a latent-size grid (2..64 at hidden 256): one by one against the batches chosen.

Figures and the CPU go to benchmarks/RESULTS.md §0l.
"""

from __future__ import annotations

import sys

from _common import machine_line

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vae_lab.config import load_config  # noqa: E402
from vae_lab.data.datasets import load_data  # noqa: E402
from vae_lab.training import padding  # noqa: E402
from vae_lab.training.batching import forward_flops, plan_batches  # noqa: E402
from vae_lab.training.run import run_trials  # noqa: E402
from vae_lab.training.trial import TrialSpec  # noqa: E402

COMMON = ["data.name=mnist5k", "model.name=linear_vae", "train.epochs=3", "train.batch_size=128", "train.lr=1e-3",
          "device=cpu", "tracking.enabled=false", "eval.enabled=false", "train.progress=false"]


def config_of(hidden: int, seed: int = 0):
    return load_config(None, [*COMMON, f"model.hidden_dims=[{hidden}]", f"model.latent_dim={hidden // 8}",
                              f"train.seed={seed}"])


def step_seconds(configs, data, stacked=None) -> float:
    """Seconds per training step of `configs` in one pass (the last epoch's training pass)."""
    outcomes = run_trials([TrialSpec(config) for config in configs], data=data, stacked=stacked)
    steps = data.num_batches("train", configs[0].train.batch_size)
    return outcomes[0].metrics["train/epoch_seconds"] / steps


def best_of_two(configs, data) -> float:
    return min(step_seconds(configs, data), step_seconds(configs, data))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    widths = [32, 128, 512] if quick else [32, 64, 128, 256, 512]
    print(machine_line(torch.device("cpu")))
    data = load_data(config_of(32).data, "cpu", 128)
    step_flops = {width: forward_flops(config_of(width)) * 128 for width in widths}
    run_trials([TrialSpec(config_of(64))], data=data)  # warm-ups
    run_trials([TrialSpec(config_of(64, seed)) for seed in range(4)], data=data)

    alone = {width: best_of_two([config_of(width)], data) for width in widths}
    stacked = {(width, count): best_of_two([config_of(width, seed) for seed in range(count)], data)
               for width in widths for count in (2, 4)}
    flops = np.array([step_flops[width] for width in widths])
    c1, c0 = np.polyfit(flops, [alone[width] for width in widths], 1)
    rows = [(1.0, count, count * step_flops[width]) for width, count in stacked]
    s0, s2, s1 = np.linalg.lstsq(np.array(rows), np.array(list(stacked.values())), rcond=None)[0]
    print("width  step GFLOP  alone ms/step  2 stacked ms/step  4 stacked ms/step")
    for width in widths:
        print(f"{width:5d}  {step_flops[width] / 1e9:10.4f}  {alone[width] * 1e3:13.2f}  "
              f"{stacked[width, 2] * 1e3:17.2f}  {stacked[width, 4] * 1e3:17.2f}")
    print(f"fit: alone c0={c0:.2e} s + c1={c1:.2e} s/FLOP · f; "
          f"K stacked s0={s0:.2e} s + K · (s2={s2:.2e} s + s1={s1:.2e} s/FLOP · f)")
    print(f"in use (vae_lab.training.padding.STEP_COST): {padding.STEP_COST['cpu']}")

    configs = [config_of(width, seed=0) for width in widths]
    one_by_one = sum(best_of_two([config], data) for config in configs)
    all_padded = min(step_seconds(configs, data, stacked=True), step_seconds(configs, data, stacked=True))
    planned_batches = plan_batches(configs, "auto")
    planned = sum(best_of_two([configs[index] for index in batch], data) for batch in planned_batches)
    modelled = {name: value for name, value in (
        ("one by one", sum(padding.step_seconds(1, step_flops[width], "cpu") for width in widths)),
        ("all padded", padding.step_seconds(len(widths), max(step_flops.values()), "cpu", padded=True)),
        ("planned", sum(padding.step_seconds(len(batch), max(step_flops[widths[index]] for index in batch), "cpu",
                                             padded=len(batch) > 1) for batch in planned_batches)))}
    print(f"seed 000's sizes {widths}, ms per step (modelled):")
    for name, value in (("one by one", one_by_one), ("all padded", all_padded), ("planned", planned)):
        print(f"  {name:10s} {value * 1e3:7.2f}  ({modelled[name] * 1e3:.2f})")
    print(f"planned batches: {[[widths[index] for index in batch] for batch in planned_batches]}; "
          f"one by one / all padded = {one_by_one / all_padded:.2f}x, one by one / planned = {one_by_one / planned:.2f}x")

    latents = [2, 4, 8, 16, 32, 64]  # a latent-size grid at one hidden width
    grid = [load_config(None, [*COMMON, "model.hidden_dims=[256]", f"model.latent_dim={latent}"]) for latent in latents]
    grid_batches = plan_batches(grid, "auto")
    one_by_one = sum(best_of_two([config], data) for config in grid)
    planned = sum(best_of_two([grid[index] for index in batch], data) for batch in grid_batches)
    print(f"latent-size grid {latents} at hidden 256: batches {[[latents[i] for i in b] for b in grid_batches]}; "
          f"ms per step one by one {one_by_one * 1e3:.2f}, planned {planned * 1e3:.2f} "
          f"({one_by_one / planned:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
