"""Training images/s of each model family, with bf16 autocast (AMP) off and on.

    python benchmarks/gpu_throughput.py                       # device=auto: CUDA when present
    python benchmarks/gpu_throughput.py --amp off --epochs 2 --data fashion-mnist
    python benchmarks/sweep.py --device cuda                  # the study benchmark on the GPU

Meant for a CUDA machine (it says so when it runs on a CPU instead). Each family trains with
its default config (MLP 784-400-20; conv [32, 64, 64] with a 20-d latent) through
`vae_lab.train.train` with tracking and end-of-run evaluation off; images/s is the median of
the epochs after the first (the first pays cuDNN/kernel warm-up). Also checks that AMP keeps
the test loss within 1% of fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import machine_line, set_threads

from vae_lab.config import build_config  # noqa: E402
from vae_lab.data.datasets import load_data  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import train  # noqa: E402


def measure(family: str, amp: bool, args, data) -> tuple[float, float]:
    config = build_config(None, [
        f"model.name={family}", f"data.name={args.data}", f"device={args.device}", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}", f"train.amp={str(amp).lower()}", "train.progress=false",
        "tracking.enabled=false", "eval.enabled=false"])
    rates: list[float] = []
    result = train(config, data=data, on_epoch_end=lambda epoch, metrics: rates.append(metrics["train/images_per_sec"]))
    return statistics.median(rates[1:] or rates), result.metrics["test/loss"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="both", choices=("off", "on", "both"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data", default="mnist5k", help="a data.name (fashion-mnist for 60,000 images)")
    parser.add_argument("--families", default="ae,linear_vae,conv_ae,conv_vae", help="comma-separated model names")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU; 0 = default")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line(device))
    if device.type != "cuda":
        print("NOTE: no CUDA device here; these are CPU numbers, not GPU ones")
    data = load_data(build_config(None, [f"data.name={args.data}"]).data, device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    print(f"{args.data}: {data.train_images.shape[0]} train images, batch {args.batch_size}, {args.epochs} epochs\n")
    print(f"{'family':12s} {'amp':>4s} {'images/s':>10s} {'test/loss':>10s}")
    for family in args.families.split(","):
        baseline = None
        for amp in modes:
            rate, loss = measure(family, amp, args, data)
            note = ""
            if amp and baseline is not None:
                note = f"  {rate / baseline[0]:.2f}x, loss {abs(loss - baseline[1]) / baseline[1]:.2%} from fp32"
            if not amp:
                baseline = (rate, loss)
            print(f"{family:12s} {'on' if amp else 'off':>4s} {rate:10.0f} {loss:10.2f}{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
