"""One 784-400-20 MLP VAE on full Fashion-MNIST, trained five ways in one process.

    python benchmarks/single_run.py                 # 5 epochs, device=auto, AMP check on
    python benchmarks/single_run.py --epochs 2 --threads 1 --no-amp-check

The pytorch/examples setup (batch 128, Adam 1e-3, Bernoulli likelihood, no binarization):
  1. dataloader   torchvision FashionMNIST + ToTensor + DataLoader, like the classic example
                  (per-item PIL decode, `.item()` on every step, the batch-summed loss)
  2. bare         a plain fp32 loop over tensors already in memory, the same arithmetic as
                  vae_lab (batch-mean loss, no host sync per step)
  3. vae_lab      `vae_lab.train.train` with MLflow on (a temporary store)
  4. vae_lab-off  the same with tracking.enabled=false (what tracking costs)
  5. vae_lab-amp  the same with train.amp=true (bf16 autocast) and tracking off
Every variant evaluates the test loss (BCE + KL in nats per image on grey pixels: a loss, not
an ELBO; one posterior sample), outside the timed epochs.

Then the fixed cost of one whole run (issue 9: under 5 s outside training), in fresh processes
with a fresh store: `python -m vae_lab.train` timed from launch to exit, minus its training
epochs; and the same run taken apart stage by stage (import, data, store, training,
evaluation, artifacts, model). Seconds per epoch: the fastest epoch
(best-of, the usual estimator on a shared machine; ratios use it) and the median. Goals (issues 2 and 5): vae_lab within
1.3x of the bare loop, at least 2x faster than the DataLoader loop with a test loss within 1%
of it, tracking under 10% of the wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, ratio, set_threads, temporary_store

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from torch import nn  # noqa: E402

from vae_lab.config import DataConfig, load_config  # noqa: E402
from vae_lab.data.datasets import ImageData, load_data  # noqa: E402
from vae_lab.data.sources import DEBIAN_FASHION_MNIST  # noqa: E402
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store  # noqa: E402
from vae_lab.training.device import resolve_device  # noqa: E402
from vae_lab.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "experiments" / "runs" / "pytorch_example_vae.yaml"
BATCH_SIZE, LR, SEED, PIXELS = 128, 1e-3, 0, 784


class ExampleVAE(nn.Module):
    """pytorch/examples vae/main.py's model (the decoder returns logits; the loss takes them)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, PIXELS)

    def forward(self, x, generator=None):
        hidden = F.relu(self.fc1(x.view(-1, PIXELS)))
        mean, logvar = self.fc21(hidden), self.fc22(hidden)
        std = torch.exp(0.5 * logvar)
        noise = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return self.fc4(F.relu(self.fc3(mean + noise * std))), mean, logvar


def negative_elbo(logits, mean, logvar, images):
    """Per image: BCE summed over pixels + KL to N(0, I); shape [B]."""
    recon = F.binary_cross_entropy_with_logits(logits, images.view(-1, PIXELS), reduction="none").sum(1)
    kl = -0.5 * (1 + logvar - mean.square() - logvar.exp()).sum(1)
    return recon + kl


@torch.no_grad()
def test_loss(model, batches, device) -> float:
    generator = torch.Generator(device=device).manual_seed(SEED + 1)
    total, count = 0.0, 0
    for images in batches:
        images = images.to(device)
        total += negative_elbo(*model(images, generator), images).sum().item()
        count += images.shape[0]
    return total / count


def dataloader_loop(epochs: int, device: torch.device, root: Path) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(SEED)
    train_set = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    test_set = datasets.FashionMNIST(root, train=False, download=False, transform=transforms.ToTensor())
    loader_options = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, **loader_options)
    test_loader = DataLoader(test_set, batch_size=BATCH_SIZE, shuffle=False, **loader_options)
    model = ExampleVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    seconds, losses = [], []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        train_loss = 0.0
        for images, _ in train_loader:
            images = images.to(device)
            optimizer.zero_grad()
            loss = negative_elbo(*model(images), images).sum()  # the example's batch sum
            loss.backward()
            train_loss += loss.item()  # the example's host sync on every step
            optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(test_loss(model.eval(), (images for images, _ in test_loader), device))
    return {"seconds": seconds, "test_loss": losses[-1]}


def bare_loop(epochs: int, device: torch.device, data: ImageData) -> dict:
    torch.manual_seed(SEED)
    model = ExampleVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    order_generator = torch.Generator().manual_seed(SEED)
    noise_generator = torch.Generator(device=device).manual_seed(SEED + 1)
    count = data.train_images.shape[0]
    seconds, losses = [], []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(count, generator=order_generator).to(device)
        for start in range(0, count, BATCH_SIZE):
            images = data.train_images[order[start:start + BATCH_SIZE]].float().div_(255.0)
            loss = negative_elbo(*model(images, noise_generator), images).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
        test_images = data.test_images.float().div(255.0)
        losses.append(test_loss(model.eval(), test_images.split(1000), device))
    return {"seconds": seconds, "test_loss": losses[-1]}


def vae_lab_run(epochs: int, device: torch.device, data: ImageData, uri: str, overrides: list[str],
                progress: bool) -> dict:
    config = load_config(EXAMPLE_CONFIG, [
        "data.name=fashion-mnist", f"train.epochs={epochs}", f"device={device.type}", f"train.seed={SEED}",
        f"tracking.uri={uri}", "tracking.experiment=single_run_benchmark", f"train.progress={str(progress).lower()}",
        *overrides])
    seconds = []
    started = time.perf_counter()
    result = train(config, data=data, on_epoch_end=lambda epoch, metrics: seconds.append(metrics["train/epoch_seconds"]))
    return {"seconds": seconds, "test_loss": result.metrics["test/loss"], "wall": time.perf_counter() - started}


# One run taken apart: the steps of `python -m vae_lab.train` (vae_lab.training.run.run_trials), each timed.
STAGES_SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
marks = {}
def mark(name):
    global started
    now = time.perf_counter()
    marks[name] = now - started
    started = now
import torch, mlflow, vae_lab.train, vae_lab.training.run, vae_lab.tracking.tracker
mark("import (torch, mlflow, vae_lab)")
from vae_lab.config import load_config
from vae_lab.data.datasets import load_data
from vae_lab.models.components import build_model
from vae_lab.training.device import effective_amp, resolve_device, seed_everything
from vae_lab.training.loop import Engine
from vae_lab.training.trial import Trial, TrialSpec
from vae_lab.tracking.tracker import RunTracker
config = load_config(sys.argv[1], sys.argv[2:])
device = resolve_device(config.device)
data = load_data(config.data, device, config.train.batch_size)
mark("data")
tracker = RunTracker.start(config, device)
mark("store and run")
seed_everything(config.train.seed)
trial = Trial(0, TrialSpec(config), model=build_model(config.model, data.image_shape, config.prior).to(device), tracker=tracker)
engine = Engine([trial], data, device, stacked=False, amp=effective_amp(config.train.amp, device))
engine._finish = lambda done: None  # stop after the epochs; the stages below finish the run
engine.run()
mark("training (epochs, val/*, first-step imports)")
from vae_lab.training.scoring import evaluate_split
from vae_lab.training.steps import plain_forward
from vae_lab.evaluation.metrics import evaluate_model
model = engine.step_impl.model(0)
evaluate_split(plain_forward(model, engine.amp, device), data, "test", [config], model.variational,
               [model.latent_dim], device)
evaluation = evaluate_model(model, data, config, device)
mark("evaluation (test/*, eval/*)")
import tempfile
from pathlib import Path
from vae_lab.evaluation.artifacts import write_run_artifacts
with tempfile.TemporaryDirectory() as folder:
    write_run_artifacts(model, data, config, Path(folder), evaluation)
    tracker.log_artifacts(Path(folder))
mark("artifacts (images, latents)")
tracker.finish_with_model(model)
tracker.end("FINISHED")
mark("model")
print("STAGES " + json.dumps(marks))
"""


def fixed_cost(epochs: int, overrides: list[str]) -> dict:
    """Seconds of a whole `python -m vae_lab.train` process outside its training epochs, and the
    stages of the same run; each in a fresh process with a fresh store."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    common = ["data.name=fashion-mnist", "data.val_size=0", f"train.epochs={epochs}", "train.progress=false",
              *overrides]
    with temporary_store() as uri:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vae_lab.train", "--config", str(EXAMPLE_CONFIG), *common,
                               f"tracking.uri={uri}"], capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - started
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("vae_lab").experiment_id])[0]
        training = sum(metric.value for metric in client.get_metric_history(run.info.run_id, "train/epoch_seconds"))
    with temporary_store() as uri:
        started = time.perf_counter()
        staged = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, str(EXAMPLE_CONFIG), *common,
                                 f"tracking.uri={uri}"], capture_output=True, text=True, env=env, check=True)
        stages_wall = time.perf_counter() - started
    stages = json.loads(next(line for line in staged.stdout.splitlines() if line.startswith("STAGES "))[7:])
    return {"wall": wall, "training": training, "stages": stages, "stages_wall": stages_wall}


def fashion_mnist_root(folder: Path) -> Path:
    """torchvision's FashionMNIST folder layout, filled from Debian's gzipped IDX files."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for source in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        with gzip.open(source) as packed, open(raw / source.name.removesuffix(".gz"), "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--no-amp-check", action="store_true", help="skip the train.amp=true run")
    parser.add_argument("--no-dataloader", action="store_true", help="skip the DataLoader loop")
    parser.add_argument("--progress", action="store_true", help="show vae_lab's tqdm bars")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the fixed-cost breakdown")
    parser.add_argument("--breakdown-only", action="store_true", help="only the fixed-cost breakdown")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    if not DEBIAN_FASHION_MNIST.is_dir():
        print(f"error: {DEBIAN_FASHION_MNIST} is missing; install Debian's dataset-fashion-mnist", file=sys.stderr)
        return 2
    print(machine_line(device))
    print(f"784-400-20 MLP VAE, full Fashion-MNIST, batch {BATCH_SIZE}, Adam {LR}, {args.epochs} epochs\n")
    if not args.no_breakdown:
        print_fixed_cost(args.epochs, [f"device={device.type}"])
    if args.breakdown_only:
        return 0
    data = load_data(DataConfig(name="fashion-mnist"), device)
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, temporary_store() as uri:
        # create the store's tables before timing: a one-off cost of a new store, not of tracking
        prepare_store(uri)
        get_or_create_experiment(MlflowClient(uri), "single_run_benchmark", uri)
        # and pay the process's first-use costs (imports of mlflow.pytorch, matplotlib, pyarrow;
        # sklearn's first fit) once, so neither timed vae_lab run carries them
        warm_up = load_data(DataConfig(name="fashion-mnist", train_limit=512, test_limit=256), device)
        vae_lab_run(1, device, warm_up, uri, [], False)
        if not args.no_dataloader:
            results["dataloader"] = dataloader_loop(args.epochs, device, fashion_mnist_root(Path(folder)))
        results["bare"] = bare_loop(args.epochs, device, data)
        results["vae_lab"] = vae_lab_run(args.epochs, device, data, uri, [], args.progress)
        results["vae_lab-off"] = vae_lab_run(args.epochs, device, data, uri, ["tracking.enabled=false"],
                                             args.progress)
        if not args.no_amp_check:
            results["vae_lab-amp"] = vae_lab_run(args.epochs, device, data, uri,
                                                 ["tracking.enabled=false", "train.amp=true"], args.progress)

    images = data.train_images.shape[0]
    print(f"{'variant':12s} {'best s/ep':>9s} {'median':>7s} {'images/s':>9s} {'test loss':>10s} {'wall s':>7s}"
          "   epochs (s)")
    for name, result in results.items():
        per_epoch = min(result["seconds"])
        result["per_epoch"] = per_epoch
        wall = f"{result['wall']:7.1f}" if "wall" in result else f"{'':7s}"
        print(f"{name:12s} {per_epoch:9.2f} {statistics.median(result['seconds']):7.2f} {images / per_epoch:9.0f} "
              f"{result['test_loss']:10.2f} {wall}   "
              + " ".join(f"{value:.2f}" for value in result["seconds"]))

    lab, bare, off = results["vae_lab"], results["bare"], results["vae_lab-off"]
    print("\nratios (best seconds per epoch unless said otherwise)")
    print(f"  vae_lab / bare loop           {ratio(lab['per_epoch'], bare['per_epoch'])}   goal <= 1.30x (issue 2)")
    if "dataloader" in results:
        loader = results["dataloader"]
        gap = abs(lab["test_loss"] - loader["test_loss"]) / loader["test_loss"]
        print(f"  dataloader / vae_lab          {ratio(loader['per_epoch'], lab['per_epoch'])}   goal >= 2x (issue 5)")
        print(f"  test loss vae_lab vs loader   {gap:.2%}   goal <= 1%")
    overhead_wall = lab["wall"] / off["wall"] - 1
    overhead_epoch = lab["per_epoch"] / off["per_epoch"] - 1
    print(f"  tracking on vs off, wall      {overhead_wall:+.1%}   goal < 10% ({lab['wall']:.1f} s vs {off['wall']:.1f} s)")
    print(f"  tracking on vs off, s/epoch   {overhead_epoch:+.1%}")
    if "vae_lab-amp" in results:
        amp = results["vae_lab-amp"]
        gap = abs(amp["test_loss"] - off["test_loss"]) / off["test_loss"]
        print(f"  bf16 autocast speed-up        {ratio(off['per_epoch'], amp['per_epoch'])}   "
              f"test loss {amp['test_loss']:.2f} vs {off['test_loss']:.2f} ({gap:.2%}; keep it only if <= 1%)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def print_fixed_cost(epochs: int, overrides: list[str]) -> None:
    cost = fixed_cost(epochs, overrides)
    outside = cost["wall"] - cost["training"]
    print(f"one whole run, fresh process and store: python -m vae_lab.train ({epochs} epochs, data.val_size=0)")
    print(f"  wall {cost['wall']:.2f} s = training epochs {cost['training']:.2f} s + outside training "
          f"{outside:.2f} s   goal < 5 s (issue 9)")
    print(f"  the same run in stages ({cost['stages_wall']:.2f} s from launch, of which "
          f"{cost['stages_wall'] - sum(cost['stages'].values()):.2f} s interpreter start and exit):")
    for name, seconds in cost["stages"].items():
        print(f"    {name:46s} {seconds:6.2f} s")
    print()


if __name__ == "__main__":
    sys.exit(main())
