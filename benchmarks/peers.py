"""Whole-process speed of vae_lab beside its peers: the pytorch/examples VAE loop and pythae.

    python benchmarks/peers.py                          # 10 epochs, each tool twice, best-of wall time
    python benchmarks/peers.py --epochs 1 --repeats 1   # a quick check
    python benchmarks/peers.py --only example,vae_lab --threads 1

One 784-400-20 MLP VAE (Bernoulli/BCE likelihood summed over pixels + KL, Adam 1e-3, batch 128,
fp32, torch's default CPU threads) on full Fashion-MNIST (60,000 train, 10,000 test images in
[0, 1]), trained by three tools, each as its own `python` process, so that imports, data loading,
per-epoch test passes and whatever each tool writes at the end are all paid inside the timing:

  example   a rewrite of the training loop of pytorch/examples `vae/main.py` (not the fetched
            file): torchvision.datasets.FashionMNIST + transforms.ToTensor + DataLoader(batch 128,
            shuffle=True), the example's model (sigmoid decoder, F.binary_cross_entropy summed
            over the batch + KL), `.item()` on every step, a status line every 10 batches, a test
            pass after every epoch with its `save_image` of 8 reconstructions and of 64 prior
            samples. Seed 1, as in the example. The data is read from a temporary torchvision
            root (FashionMNIST/raw, unpacked from Debian's IDX files before any timing: the state
            the example's own download leaves behind).
  pythae    pythae's `VAE` (PyPI; `pip install -e '.[bench]'`) with a custom Encoder (784->400 ReLU
            -> mean, log_var 20) and Decoder (20->400 ReLU->784 sigmoid), reconstruction_loss="bce",
            trained by `TrainingPipeline` / `BaseTrainer` (Adam 1e-3, batch 128 train and eval,
            pythae's default seed 8, here also seeding the weights) on the same images
            (torchvision's `.data / 255`, as pythae's own examples load them), with the test set
            as eval set. Off: checkpoints
            (steps_saving=None), prediction steps (steps_predict=None), the training log file (no
            log_output_dir), extra callbacks (none given), its tqdm bars (TQDM_DISABLE=1: the
            ProgressBarCallback is hard-wired). Still done, because pythae always does it: the
            NaN scan and float copy of the data, a sanity forward pass, the per-epoch eval pass,
            a deepcopy of the model whenever the eval loss improves, and saving the final model
            (weights, configs, cloudpickled encoder/decoder). The script then scores the final
            model once more on the test set to print the loss per image (pythae's eval loss is a
            mean of batch means); that extra pass (~0.2 s) is inside pythae's time.
  vae_lab   `python -m vae_lab.train --config experiments/runs/pytorch_example_vae.yaml
            data.name=fashion-mnist train.epochs=N train.progress=false tracking.uri=sqlite:///...`
            into a fresh temporary MLflow store each run (store creation included), plus
            `data.val_size=0` when this checkout accepts that key (probed once, untimed), so that
            all three train on all 60,000 images. Everything else as configured: per-epoch test
            metrics, end-of-run evaluation, images, latents and the logged model. Its test loss is
            `test/loss` read back from the store after the process exited.

Wall time is from launching the process to its exit; each tool runs `--repeats` times
(round-robin, so drifting load hits all tools alike) and the best (lowest) counts. The test loss
is BCE summed over pixels + KL in nats per image (a loss: the pixels are grey, not binary, so
not an ELBO) from one posterior sample after the last epoch. Goals:
example / vae_lab >= 2.0x, pythae / vae_lab >= 1.5x (issue 22; issue 9 asked 1.3x), test losses within 1%.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, ratio, set_threads, temporary_store

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "experiments" / "runs" / "pytorch_example_vae.yaml"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TOOLS = ("example", "pythae", "vae_lab")
LOSS_MARK = "peers: final test loss"
GOALS = {"example": 2.0, "pythae": 1.5}

# A rewrite of the pytorch/examples vae/main.py loop (same model, loss, data pipeline, logging,
# per-epoch test pass and image saving), pointed at Fashion-MNIST.
EXAMPLE_SCRIPT = r'''
import argparse
import os

import torch
import torch.utils.data
from torch import nn, optim
from torch.nn import functional as F
from torchvision import datasets, transforms
from torchvision.utils import save_image

parser = argparse.ArgumentParser(description="pytorch/examples VAE loop on Fashion-MNIST")
parser.add_argument("--root", required=True)
parser.add_argument("--results", required=True)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--log-interval", type=int, default=10)
args = parser.parse_args()

use_accel = torch.accelerator.is_available()
device = torch.accelerator.current_accelerator() if use_accel else torch.device("cpu")
print(f"Using device: {device}")
torch.manual_seed(args.seed)
os.makedirs(args.results, exist_ok=True)

loader_options = {"num_workers": 1, "pin_memory": True} if use_accel else {}
train_set = datasets.FashionMNIST(args.root, train=True, download=False, transform=transforms.ToTensor())
test_set = datasets.FashionMNIST(args.root, train=False, download=False, transform=transforms.ToTensor())
train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, **loader_options)
test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, shuffle=False, **loader_options)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        hidden = F.relu(self.fc1(x))
        return self.fc21(hidden), self.fc22(hidden)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)

    def decode(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


model = VAE().to(device)
optimizer = optim.Adam(model.parameters(), lr=1e-3)


def loss_function(recon_x, x, mu, logvar):
    """BCE summed over pixels and batch + KL(q(z|x) || N(0, I)) summed over the batch."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def train(epoch):
    model.train()
    total = 0.0
    for batch_idx, (data, _) in enumerate(train_loader):
        data = data.to(device)
        optimizer.zero_grad()
        recon, mu, logvar = model(data)
        loss = loss_function(recon, data, mu, logvar)
        loss.backward()
        total += loss.item()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item() / len(data):.6f}")
    print(f"====> Epoch: {epoch} Average loss: {total / len(train_loader.dataset):.4f}")


def test(epoch):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i, (data, _) in enumerate(test_loader):
            data = data.to(device)
            recon, mu, logvar = model(data)
            total += loss_function(recon, data, mu, logvar).item()
            if i == 0:
                n = min(data.size(0), 8)
                comparison = torch.cat([data[:n], recon.view(args.batch_size, 1, 28, 28)[:n]])
                save_image(comparison.cpu(), os.path.join(args.results, f"reconstruction_{epoch}.png"), nrow=n)
    total /= len(test_loader.dataset)
    print(f"====> Test set loss: {total:.4f}")
    return total


if __name__ == "__main__":
    for epoch in range(1, args.epochs + 1):
        train(epoch)
        test_loss = test(epoch)
        with torch.no_grad():
            sample = model.decode(torch.randn(64, 20).to(device)).cpu()
            save_image(sample.view(64, 1, 28, 28), os.path.join(args.results, f"sample_{epoch}.png"))
    print(f"LOSS_MARK {test_loss:.6f}")
'''.replace("LOSS_MARK", LOSS_MARK)

PYTHAE_SCRIPT = r'''
import argparse

import torch
from torch import nn
from torchvision import datasets

from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

parser = argparse.ArgumentParser(description="pythae VAE on Fashion-MNIST")
parser.add_argument("--root", required=True)
parser.add_argument("--output", required=True)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=128)
args = parser.parse_args()


def images(train):
    return datasets.FashionMNIST(args.root, train=train, download=False).data.reshape(-1, 1, 28, 28) / 255.0


class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU())
        self.mean = nn.Linear(400, 20)
        self.log_var = nn.Linear(400, 20)

    def forward(self, x):
        hidden = self.hidden(x)
        return ModelOutput(embedding=self.mean(hidden), log_covariance=self.log_var(hidden))


class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(20, 400), nn.ReLU(), nn.Linear(400, 784), nn.Sigmoid())

    def forward(self, z):
        return ModelOutput(reconstruction=self.layers(z).reshape(-1, 1, 28, 28))


train_images, test_images = images(True), images(False)
torch.manual_seed(8)  # pythae seeds training (BaseTrainerConfig.seed=8), not the weights built before it
model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=20, reconstruction_loss="bce"),
            encoder=Encoder(), decoder=Decoder())
training = BaseTrainerConfig(
    output_dir=args.output, num_epochs=args.epochs, learning_rate=1e-3, optimizer_cls="Adam",
    per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
    steps_saving=None, steps_predict=None, amp=False)
pipeline = TrainingPipeline(model=model, training_config=training)
pipeline(train_data=train_images, eval_data=test_images)

# the last epoch's model, scored per image (pythae's eval loss is a mean of batch means)
trained = pipeline.trainer.model.eval()
total = 0.0
with torch.no_grad():
    for batch in test_images.split(1000):
        output = trained({"data": batch.to(trained.device)})
        total += output.loss.item() * batch.shape[0]
print(f"LOSS_MARK {total / test_images.shape[0]:.6f}")
'''.replace("LOSS_MARK", LOSS_MARK)


class ToolFailed(RuntimeError):
    pass


def torchvision_root(folder: Path) -> Path:
    """torchvision's FashionMNIST/raw layout (unpacked IDX files), filled from Debian's files."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in IDX_STEMS:
        packed, plain = DEBIAN_FASHION_MNIST / f"{stem}.gz", DEBIAN_FASHION_MNIST / stem
        if plain.is_file():
            (raw / stem).symlink_to(plain)
        else:
            with gzip.open(packed) as source, open(raw / stem, "wb") as target:
                shutil.copyfileobj(source, target)
    return folder


def fashion_mnist_present() -> bool:
    return all((DEBIAN_FASHION_MNIST / stem).is_file() or (DEBIAN_FASHION_MNIST / f"{stem}.gz").is_file()
               for stem in IDX_STEMS)


def avx512_flags() -> str:
    try:
        flags = sorted(set(re.findall(r"avx512[a-z_0-9]*", Path("/proc/cpuinfo").read_text())))
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return " ".join(flags) if flags else "none"


def child_env(threads: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **extra)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def vae_lab_accepts_val_size(env: dict[str, str]) -> bool:
    """Try `python -m vae_lab.train data.val_size=0` with an invalid model.latent_dim=0, so that
    nothing can run: an unknown key is reported first, a known one leaves only the latent_dim error."""
    with tempfile.TemporaryDirectory(prefix="peers_probe_") as folder:
        probe = subprocess.run(
            [sys.executable, "-m", "vae_lab.train", "--config", str(EXAMPLE_CONFIG), "data.val_size=0",
             "model.latent_dim=0", "tracking.enabled=false", f"tracking.uri=sqlite:///{folder}/mlflow.db",
             "train.epochs=1", "train.progress=false"],
            cwd=REPO, env=env, capture_output=True, text=True)
    return "val_size" not in probe.stderr


def timed_process(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> float:
    """Seconds from launching `command` to its exit; its stdout and stderr go to `log`."""
    with open(log, "w") as output:
        started = time.perf_counter()
        process = subprocess.run(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ToolFailed(f"{' '.join(command[:3])} ... exited {process.returncode}; its last lines:\n{tail}")
    return wall


def printed_loss(log: Path) -> float:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(LOSS_MARK):
            return float(line.split()[-1])
    raise ToolFailed(f"{log.name}: no line starting with {LOSS_MARK!r}")


def run_example(work: Path, root: Path, epochs: int, threads: int, attempt: int) -> tuple[float, float]:
    log = work / f"example_{attempt}.log"
    command = [sys.executable, str(work / "example_vae.py"), "--root", str(root),
               "--results", str(work / f"example_results_{attempt}"), "--epochs", str(epochs)]
    wall = timed_process(command, child_env(threads), log, work)
    return wall, printed_loss(log)


def run_pythae(work: Path, root: Path, epochs: int, threads: int, attempt: int) -> tuple[float, float]:
    log = work / f"pythae_{attempt}.log"
    command = [sys.executable, str(work / "pythae_vae.py"), "--root", str(root),
               "--output", str(work / f"pythae_output_{attempt}"), "--epochs", str(epochs)]
    wall = timed_process(command, child_env(threads, TQDM_DISABLE="1"), log, work)
    return wall, printed_loss(log)


def run_vae_lab(work: Path, epochs: int, threads: int, attempt: int, val_size: bool) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    log = work / f"vae_lab_{attempt}.log"
    with temporary_store() as uri:
        command = [sys.executable, "-m", "vae_lab.train", "--config", str(EXAMPLE_CONFIG),
                   "data.name=fashion-mnist", f"train.epochs={epochs}", f"tracking.uri={uri}",
                   "train.progress=false", *(["data.val_size=0"] if val_size else [])]
        wall = timed_process(command, child_env(threads), log, REPO)
        client = MlflowClient(uri)
        runs = [run for experiment in client.search_experiments()
                for run in client.search_runs([experiment.experiment_id])]
        if len(runs) != 1 or runs[0].info.status != "FINISHED" or "test/loss" not in runs[0].data.metrics:
            raise ToolFailed(f"vae_lab: expected one FINISHED run with test/loss in {uri}, found "
                             f"{[(run.info.run_id, run.info.status) for run in runs]}")
        return wall, runs[0].data.metrics["test/loss"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool; the fastest counts")
    parser.add_argument("--only", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every process (OMP_NUM_THREADS); 0 = torch's default")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (scripts, logs, outputs)")
    args = parser.parse_args(argv)
    tools = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown or not tools:
        parser.error(f"--only: unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    tools = [name for name in TOOLS if name in tools]
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be at least 1")
    if not fashion_mnist_present():
        print(f"error: Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}; get it with "
              "`sudo apt-get install dataset-fashion-mnist`", file=sys.stderr)
        return 2
    if "pythae" in tools and importlib.util.find_spec("pythae") is None:
        print(f"error: pythae is not installed in {sys.prefix}; get it with `pip install -e '.[bench]'` "
              "(or leave it out: --only example,vae_lab)", file=sys.stderr)
        return 2
    set_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(machine_line(device))
    print(f"AVX-512: {avx512_flags()}")
    print(f"784-400-20 MLP VAE, full Fashion-MNIST, batch 128, Adam 1e-3, fp32, {args.epochs} epochs; "
          f"whole-process wall time, best of {args.repeats}")
    val_size = "vae_lab" in tools and vae_lab_accepts_val_size(child_env(args.threads))
    if "vae_lab" in tools:
        print("vae_lab: data.val_size=0 " + ("accepted and used" if val_size else
                                            "not a key in this checkout; its default split is used"))
    print()

    walls: dict[str, list[float]] = {name: [] for name in tools}
    losses: dict[str, list[float]] = {name: [] for name in tools}
    started = time.perf_counter()
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="vae_lab_peers_"))
        if args.keep:
            print(f"keeping {work}")
        else:
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        (work / "example_vae.py").write_text(EXAMPLE_SCRIPT)
        (work / "pythae_vae.py").write_text(PYTHAE_SCRIPT)
        root = torchvision_root(work / "torchvision")
        try:
            for attempt in range(1, args.repeats + 1):  # round-robin: load drift hits every tool alike
                for name in tools:
                    if name == "example":
                        wall, loss = run_example(work, root, args.epochs, args.threads, attempt)
                    elif name == "pythae":
                        wall, loss = run_pythae(work, root, args.epochs, args.threads, attempt)
                    else:
                        wall, loss = run_vae_lab(work, args.epochs, args.threads, attempt, val_size)
                    walls[name].append(wall)
                    losses[name].append(loss)
                    print(f"  {name:8s} run {attempt}: {wall:7.1f} s, test loss {loss:.3f}", flush=True)
        except ToolFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    best = {name: min(walls[name]) for name in tools}
    loss = {name: losses[name][walls[name].index(best[name])] for name in tools}
    print(f"\n{'tool':8s} {'best s':>8s}   {'wall times (s)':24s} {'test loss':>10s}   (nats/image)")
    for name in tools:
        times = ", ".join(f"{value:.1f}" for value in walls[name])
        print(f"{name:8s} {best[name]:8.1f}   {times:24s} {loss[name]:10.3f}")
    if "vae_lab" in tools and len(tools) > 1:
        print("\nratios of best wall times, and test-loss gaps (vae_lab vs the other)")
        lab = "vae_lab"
        for name in ("example", "pythae"):
            if name not in tools:
                continue
            speed = best[name] / best[lab]
            gap = (loss[lab] - loss[name]) / loss[name]
            print(f"  {name + ' / vae_lab':17s} {ratio(best[name], best[lab]):>6s}   goal >= {GOALS[name]:.1f}x "
                  f"{'met' if speed >= GOALS[name] else 'NOT met'};   test loss {gap:+.2%}   goal within 1% "
                  f"{'met' if abs(gap) <= 0.01 else 'NOT met'}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
