"""Many workers on one PostgreSQL: directly, and through the storage proxy (issue 21).

    python benchmarks/storage_proxy.py                       # 32 worker processes, a 64-point grid
    python benchmarks/storage_proxy.py --commands 4 --workers 8 --points 64

Both sides run the same grid study (tiny trials: digits, 1 epoch, eval off, no model, no images)
as `--commands` sweep commands with `--workers` processes each, on one throwaway PostgreSQL
(tests/servers.py; MLflow on an `mlflow server` over its `mlflow` database):

  direct   every command on `--storage postgresql://.../optuna`
  proxy    `python -m vae_lab.storage_proxy --storage postgresql://.../optuna` and every command
           on `--storage grpc://...`

Prints, per side: the peak of PostgreSQL connections to the `optuna` database (pg_stat_activity,
sampled every 0.2 s while the side runs), the wall time, trials per minute (from the first
trial's start to the last one's end), and whether every grid point finished exactly once with
one parent run. Needs PostgreSQL (`make postgres`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _common import CHECKOUT, machine_line, ratio

import optuna  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

sys.path.insert(0, str(Path(CHECKOUT) / "tests"))
from servers import free_port, mlflow_server, postgres_cluster  # noqa: E402

BASE = {
    "data.name": "digits", "data.train_limit": 256, "data.test_limit": 128,
    "model.hidden_dims": [32], "model.conv_channels": [8, 16, 16], "model.latent_dim": 4,
    "train.epochs": 1, "train.batch_size": 64, "train.progress": False,
    "eval.enabled": False, "tracking.log_model": False, "tracking.log_images": False,
}


class ConnectionSampler:
    """The peak number of backends connected to the `optuna` database, sampled in a thread."""

    def __init__(self, cluster):
        self.cluster, self.peak, self.samples = cluster, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with self.cluster._connect("postgres") as connection:
            while not self._stop.wait(0.2):
                count = connection.execute(
                    "select count(*) from pg_stat_activity where datname = 'optuna'").fetchone()[0]
                self.samples.append(count)
                self.peak = max(self.peak, count)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def study_file(folder: Path, name: str, points: int) -> Path:
    seeds = max(1, points // 8)
    latents = list(range(2, 2 + points // seeds))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"study": {"name": name, "sampler": "grid", "batch_trials": "off"},
                                    "base": BASE, "search_space": {"model.latent_dim": latents,
                                                                   "seeds": list(range(seeds))}}))
    return path


def run_side(name: str, storage: str, database: str, tracking_uri: str, cluster, folder: Path,
             commands: int, workers: int, points: int) -> dict:
    path = study_file(folder, name, points)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    logs = [folder / f"{name}-{index}.log" for index in range(commands)]
    with ConnectionSampler(cluster) as sampler:
        started = time.monotonic()
        processes = []
        for log in logs:
            with log.open("w") as stream:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "vae_lab.sweep", str(path), "--storage", storage,
                     "--tracking-uri", tracking_uri, "--workers", str(workers)],
                    cwd=folder, env=env, stdout=stream, stderr=subprocess.STDOUT))
        codes = [process.wait() for process in processes]
        wall = time.monotonic() - started
    for code, log in zip(codes, logs):
        if code != 0:
            print(f"  {name}: a command exited {code}; its log {log}:\n" + log.read_text()[-3000:])

    trials = [t for t in optuna.load_study(study_name=name, storage=database).get_trials()
              if not t.user_attrs.get("vae_lab.skipped")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    finished = Counter((t.params["model.latent_dim"], t.params.get("train.seed")) for t in complete)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vae_lab")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`vae_lab.role` = 'study' and tags.`vae_lab.study_name` = '{name}'")
    first = min(t.datetime_start for t in complete)
    last = max(t.datetime_complete for t in complete)
    return {
        "peak": sampler.peak, "wall": wall, "codes": codes, "complete": len(complete),
        "per_minute": len(complete) / max((last - first).total_seconds(), 1e-9) * 60,
        "exactly_once": len(finished) == points and set(finished.values()) == {1} and len(complete) == len(trials),
        "parents": len(parents),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=4, help="sweep commands per side (default 4)")
    parser.add_argument("--workers", type=int, default=8, help="--workers of each command (default 8)")
    parser.add_argument("--points", type=int, default=64, help="grid points, a multiple of 8 (default 64)")
    args = parser.parse_args()
    print(machine_line(torch.device("cpu")))
    print(f"{args.commands} commands x --workers {args.workers} = {args.commands * args.workers} worker "
          f"processes per side, a {args.points}-point grid of tiny trials")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vae_lab_bench_proxy_") as temporary:
        folder = Path(temporary)
        with postgres_cluster(folder / "postgres") as cluster, \
                mlflow_server(f"{cluster.url}/mlflow", folder / "artifacts") as tracking_uri:
            database = f"{cluster.url}/optuna"
            results["direct"] = run_side("direct", database, database, tracking_uri, cluster, folder,
                                         args.commands, args.workers, args.points)
            port = free_port()
            proxy = subprocess.Popen([sys.executable, "-m", "vae_lab.storage_proxy", "--storage", database,
                                      "--port", str(port)], cwd=folder, stdout=subprocess.PIPE, text=True)
            try:
                print("  " + proxy.stdout.readline().strip())
                results["proxy"] = run_side("proxy", f"grpc://127.0.0.1:{port}", database, tracking_uri, cluster,
                                            folder, args.commands, args.workers, args.points)
            finally:
                proxy.terminate()
                proxy.wait(timeout=30)
    print(f"\n| side | peak PostgreSQL connections (optuna) | wall | trials/min | complete | "
          f"each point once | parent runs | exit codes |")
    print("|---|---|---|---|---|---|---|---|")
    for side, result in results.items():
        print(f"| {side} | {result['peak']} | {result['wall']:.0f} s | {result['per_minute']:.1f} | "
              f"{result['complete']}/{args.points} | {'yes' if result['exactly_once'] else 'NO'} | "
              f"{result['parents']} | {','.join(map(str, result['codes']))} |")
    direct, proxied = results["direct"], results["proxy"]
    print(f"\nconnections: direct / proxy = {ratio(direct['peak'], max(proxied['peak'], 1))}; "
          f"trials per minute: proxy / direct = {ratio(proxied['per_minute'], direct['per_minute'])}")
    return 0 if direct["exactly_once"] and proxied["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
