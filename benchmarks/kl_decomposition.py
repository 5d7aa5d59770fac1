"""The KL decomposition's cost (eval/mutual_info, eval/total_correlation, eval/dimwise_kl):
`vae_lab.evaluation.metrics.kl_decomposition` against its former all-float64 form (every
(n, j, m) term in float64, the aggregate summed from them), side by side.

    python benchmarks/kl_decomposition.py            # 1000 and 2000 points, 16 dimensions, best of 7

Random posteriors (means N(0, 1) scaled per dimension, log-variances around -1). Prints
milliseconds, their ratio, and how far apart the two ways' three numbers are.
"""

from __future__ import annotations

import math
import time

import torch
from _common import machine_line

from vae_lab import names
from vae_lab.evaluation import metrics
from vae_lab.models.priors import gaussian_log_density


@torch.no_grad()
def all_float64(means, logvars, generator, chunk_entries: int = 2 ** 20) -> dict[str, float]:
    """The former way, kept here as the reference."""
    means, logvars = means.double(), logvars.double()
    count = means.shape[0]
    z = means + torch.randn(means.shape, generator=generator).to(means) * torch.exp(0.5 * logvars)
    log_conditional = gaussian_log_density(z, means, logvars)
    means_t, inverse_std_t = means.T.contiguous(), torch.exp(-0.5 * logvars).T.contiguous()
    offset_t = (-0.5 * (math.log(2 * math.pi) + logvars)).T.contiguous()
    log_aggregate, log_marginals = [], []
    chunk = max(1, chunk_entries // means.numel())
    for start in range(0, count, chunk):
        rows = z[start:start + chunk].unsqueeze(2)
        per_dim = offset_t - 0.5 * ((rows - means_t) * inverse_std_t).square()
        log_aggregate.append(torch.logsumexp(per_dim.sum(1), dim=1) - math.log(count))
        log_marginals.append(torch.logsumexp(per_dim, dim=2) - math.log(count))
    log_aggregate, log_marginals = torch.cat(log_aggregate), torch.cat(log_marginals)
    log_prior_marginals = -0.5 * (math.log(2 * math.pi) + z.square())
    return {names.EVAL_MUTUAL_INFO: float((log_conditional - log_aggregate).mean()),
            names.EVAL_TOTAL_CORRELATION: float((log_aggregate - log_marginals.sum(-1)).mean()),
            names.EVAL_DIMWISE_KL: float((log_marginals - log_prior_marginals).sum(-1).mean())}


def best_seconds(function, repeats: int = 7) -> tuple[float, dict]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    print(machine_line(torch.device("cpu")))
    generator = torch.Generator().manual_seed(0)
    for points in (1000, metrics.DECOMPOSITION_POINTS):
        means = torch.randn(points, 16, generator=generator) * torch.linspace(0.05, 2.0, 16)
        logvars = torch.randn(points, 16, generator=generator) * 0.3 - 1.0
        before, old = best_seconds(lambda: all_float64(means, logvars, torch.Generator().manual_seed(1)))
        now, new = best_seconds(lambda: metrics.kl_decomposition(means, logvars, torch.Generator().manual_seed(1)))
        gap = max(abs(new[key] - old[key]) / abs(old[key]) for key in old)
        print(f"{points} points x 16: all float64 {before * 1000:.0f} ms, now {now * 1000:.0f} ms: "
              f"{before / now:.2f}x; largest relative difference of the three terms {gap:.1e}")


if __name__ == "__main__":
    main()
