"""The KL decomposition's cost (eval/mutual_info, eval/total_correlation, eval/dimwise_kl):
chunks sized to stay in the CPU's cache against the former 256 rows a chunk, side by side.

    python benchmarks/kl_decomposition.py            # 1000 and 2000 points, 16 dimensions, best of 5

Random posteriors (means N(0, 1), log-variances around -1). Both ways give the same numbers;
the script checks that and prints milliseconds and their ratio.
"""

from __future__ import annotations

import time

import torch
from _common import machine_line

from vae_lab.evaluation import metrics


def best_seconds(function, repeats: int = 5) -> tuple[float, dict]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    print(machine_line(torch.device("cpu")))
    generator = torch.Generator().manual_seed(0)
    cached = metrics.DECOMPOSITION_CHUNK_ENTRIES
    for points in (1000, metrics.DECOMPOSITION_POINTS):
        means = torch.randn(points, 16, generator=generator)
        logvars = torch.randn(points, 16, generator=generator) * 0.3 - 1.0

        def decompose():
            return metrics.kl_decomposition(means, logvars, torch.Generator().manual_seed(1))

        metrics.DECOMPOSITION_CHUNK_ENTRIES = 256 * means.numel()  # 256 rows a chunk, as before
        before, old = best_seconds(decompose)
        metrics.DECOMPOSITION_CHUNK_ENTRIES = cached
        now, new = best_seconds(decompose)
        assert old == new, (old, new)
        print(f"{points} points x 16: 256 rows a chunk {before * 1000:.0f} ms, "
              f"{cached} entries a chunk {now * 1000:.0f} ms: {before / now:.2f}x")


if __name__ == "__main__":
    main()
