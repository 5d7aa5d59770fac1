"""Intervals a reader can defend: bootstrap means, and differences paired by seed.

Every interval is SciPy's percentile bootstrap (`scipy.stats.bootstrap`, 95%, 9999 resamples,
a fixed generator so the same runs give the same report). A difference between two
configurations pairs their runs by `train.seed` where they share seeds (the same data order
and initial noise on both sides, so the seed's luck cancels); without shared seeds it falls
back to an unpaired two-sample bootstrap. A difference is *resolved* only when its interval
excludes zero. With one value there is no interval, and the functions say so (None). Values that
do not vary give a zero-width interval: that is what the bootstrap says, and all it can say.

With very few seeds a bootstrap interval is optimistic (three seeds admit only ten distinct
resamples); `seeds_to_settle` uses Student's t, which is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999
GENERATOR_SEED = 0
MAX_SEEDS_TO_SETTLE = 1000
MAX_DECIMALS = 6  # however narrow an interval, no more decimals than this
METHOD = f"{CONFIDENCE:.0%} percentile bootstrap (scipy.stats.bootstrap, {RESAMPLES} resamples)"


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values and its 95% interval; low/high are None when n < 2."""

    estimate: float
    low: float | None
    high: float | None
    n: int

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Difference:
    """first − second on one metric: the interval of the mean difference and what it supports."""

    metric: str
    interval: Interval
    paired: bool  # paired by seed (interval.n shared seeds), or unpaired means
    lower_is_better: bool
    probability_first_better: float | None  # share of bootstrap resamples in which first wins
    seeds_to_settle: int | None  # seeds per side for a t interval to exclude zero at this spread
    seeds: tuple[int, int] = (0, 0)  # how many seeds each side has in all

    @property
    def resolved(self) -> bool:
        return self.interval.excludes_zero

    @property
    def advantage(self) -> Interval:
        """How much better first is than second: first − second where higher is better, second −
        first where lower is, so that a gap said as "better by" and its interval share a sign."""
        if not self.lower_is_better:
            return self.interval
        flipped = self.interval
        return Interval(-flipped.estimate, None if flipped.high is None else -flipped.high,
                        None if flipped.low is None else -flipped.low, flipped.n)

    @property
    def first_better(self) -> bool:
        return (self.interval.estimate < 0) == self.lower_is_better


def _finite(values) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


def _bootstrap(samples: tuple[np.ndarray, ...], statistic):
    return stats.bootstrap(samples, statistic, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                           method="percentile", vectorized=True,
                           rng=np.random.default_rng(GENERATOR_SEED))


def _mean(sample, axis=-1):
    return np.mean(sample, axis=axis)


def _mean_difference(first, second, axis=-1):
    return np.mean(first, axis=axis) - np.mean(second, axis=axis)


def mean_interval(values) -> Interval:
    """The mean of the finite `values` with its 95% bootstrap interval (None below two values)."""
    values = _finite(values)
    if len(values) == 0:
        return Interval(math.nan, None, None, 0)
    mean = float(values.mean())
    if len(values) == 1:
        return Interval(mean, None, None, 1)
    if np.ptp(values) == 0:  # every resample has the same mean
        return Interval(mean, mean, mean, len(values))
    result = _bootstrap((values,), _mean)
    return Interval(mean, float(result.confidence_interval.low), float(result.confidence_interval.high),
                    len(values))


def seeds_to_settle(mean: float, std: float, two_samples: bool = False) -> int | None:
    """The fewest seeds (per side) for which a 95% t interval of a mean difference `mean` with
    per-seed spread `std` would exclude zero, were the mean and spread to stay as observed (so
    about an even chance, not a promise); None when no number would (mean 0) or it exceeds
    MAX_SEEDS_TO_SETTLE. Two independent samples add their variances (`std` is then each side's)."""
    if not (np.isfinite(mean) and np.isfinite(std)) or mean == 0:
        return None
    seeds = np.arange(2, MAX_SEEDS_TO_SETTLE + 1)
    degrees = 2 * seeds - 2 if two_samples else seeds - 1
    spread = std * (math.sqrt(2) if two_samples else 1.0)
    enough = stats.t.ppf(0.5 + CONFIDENCE / 2, degrees) * spread / np.sqrt(seeds) < abs(mean)
    return int(seeds[enough.argmax()]) if enough.any() else None


def _share_better(resampled: np.ndarray, lower_is_better: bool) -> float:
    wins = (resampled < 0) if lower_is_better else (resampled > 0)
    return float(wins.mean() + 0.5 * (resampled == 0).mean())


def difference(first: dict, second: dict, metric: str, lower_is_better: bool) -> Difference:
    """first − second, each a {seed: value} map: paired over their shared seeds where at least two
    are shared, else the unpaired difference of their means over all their seeds."""
    first = {seed: value for seed, value in first.items() if np.isfinite(value)}
    second = {seed: value for seed, value in second.items() if np.isfinite(value)}
    seeds = (len(first), len(second))
    shared = sorted(first.keys() & second.keys())
    if len(shared) >= 2:
        deltas = np.array([first[seed] - second[seed] for seed in shared], dtype=float)
        mean = float(deltas.mean())
        if np.ptp(deltas) == 0:
            return Difference(metric, Interval(mean, mean, mean, len(deltas)), True, lower_is_better,
                              _share_better(deltas, lower_is_better), None, seeds)
        result = _bootstrap((deltas,), _mean)
        interval = Interval(mean, float(result.confidence_interval.low), float(result.confidence_interval.high),
                            len(deltas))
        return Difference(metric, interval, True, lower_is_better,
                          _share_better(result.bootstrap_distribution, lower_is_better),
                          None if interval.excludes_zero else seeds_to_settle(mean, float(deltas.std(ddof=1))),
                          seeds)
    a, b = np.array(list(first.values())), np.array(list(second.values()))
    mean = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Difference(metric, Interval(mean, None, None, min(seeds)), False, lower_is_better, None, None, seeds)
    result = _bootstrap((a, b), _mean_difference)
    interval = Interval(mean, float(result.confidence_interval.low), float(result.confidence_interval.high),
                        min(seeds))
    spread = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return Difference(metric, interval, False, lower_is_better,
                      _share_better(result.bootstrap_distribution, lower_is_better),
                      None if interval.excludes_zero else seeds_to_settle(mean, spread, two_samples=True), seeds)


def seed_values(runs: pd.DataFrame, label: str, metric: str, seed_column: str = "params.train.seed") -> dict:
    """{seed: value} of one configuration's finished runs (a seed run twice: its mean). A run
    without a seed is keyed by its run id, so it pairs with nothing."""
    column = f"metrics.{metric}"
    if column not in runs:
        return {}
    rows = runs[(runs["label"] == label) & runs[column].notna()]
    if rows.empty:
        return {}
    ids = rows["run_id"].astype(str) if "run_id" in rows else pd.Series(rows.index, index=rows.index).map("run {}".format)
    seeds = rows[seed_column].astype("string").fillna(ids) if seed_column in rows else ids
    return {str(seed): float(value) for seed, value in rows.groupby(seeds.astype(str))[column].mean().items()}


# ----------------------------------------------------------------------------- words

def supported_decimals(spread: float | None) -> int | None:
    """The decimals that a value with this uncertainty (an interval's width, a std) supports: two
    significant digits of the spread (width 2.7 → 1 decimal, 26 → none, 0.0061 → 4); None when
    there is no spread to go by."""
    if spread is None or not np.isfinite(spread) or spread <= 0:
        return None
    return int(min(MAX_DECIMALS, max(0, 1 - math.floor(math.log10(spread)))))


def number(value: float | None, *alongside: float | None, spread: float | None = None) -> str:
    """A value rounded to what its `spread` supports (`supported_decimals`); without one, 4
    decimals below 1, else 2, and the values shown `alongside` it share its decimals."""
    if value is None or not np.isfinite(value):
        return "n/a"
    digits = supported_decimals(spread)
    if digits is not None:
        return f"{value:.{digits}f}"
    magnitudes = [abs(other) for other in (value, *alongside) if other is not None and np.isfinite(other)]
    return f"{value:.4f}" if max(magnitudes) < 1 else f"{value:.2f}"


def _numbers(interval: Interval) -> tuple[str, str, str]:
    values = (interval.estimate, interval.low, interval.high)
    return tuple(number(value, *values, spread=interval.high - interval.low) for value in values)


def interval_text(interval: Interval) -> str:
    """'-91.30 [-92.10, -90.60]', or '-91.30 (one seed: no interval)'."""
    if not interval.has_interval:
        return f"{number(interval.estimate)} (one seed: no interval)" if interval.n == 1 else number(interval.estimate)
    estimate, low, high = _numbers(interval)
    return f"{estimate} [{low}, {high}]"


def how_paired(found: Difference) -> str:
    n, (first, second) = found.interval.n, found.seeds
    if found.paired:
        left_out = "" if first == second == n else f" of {first} and {second}"
        return f"paired over {n} shared seed{'s' * (n != 1)}{left_out}"
    return "one seed each" if first == second == 1 else f"unpaired, {first} and {second} seeds"


def support(found: Difference, first: str) -> str:
    """'paired over 3 shared seeds; conv_vae better in 100% of resamples'."""
    text = how_paired(found)
    if found.probability_first_better is not None:
        text += f"; {first} better in {found.probability_first_better:.0%} of resamples"
    return text


def bounds(interval: Interval) -> str:
    """'[2.00, 8.00]'."""
    _, low, high = _numbers(interval)
    return f"[{low}, {high}]"


def evidence(found: Difference, first: str, interval: Interval | None = None) -> str:
    """'95% interval [2.00, 8.00], paired over 3 shared seeds; conv_vae better in 100% of resamples'
    (of `interval`, by default the difference first − second)."""
    if not found.interval.has_interval:
        return f"{how_paired(found)}: no interval is possible"
    return f"95% interval {bounds(interval or found.interval)}, {support(found, first)}"


def settle(found: Difference) -> str:
    """For a difference not resolved: how many seeds would resolve it at the observed spread."""
    if not found.interval.has_interval:
        return "a second seed would give an interval"
    if found.seeds_to_settle:
        per_side = "" if found.paired else " per side"
        return (f"about {found.seeds_to_settle} seeds{per_side} would be needed for the interval to exclude zero "
                "if the observed difference and spread held")
    if found.interval.estimate == 0:
        return "the observed mean difference is 0"
    return f"more than {MAX_SEEDS_TO_SETTLE} seeds would be needed at the observed difference and spread"


def call(found: Difference, first: str, second: str) -> str:
    """The table's verdict: who is better, or why no difference is called."""
    if not found.interval.has_interval:
        return f"no interval ({how_paired(found)})"
    if found.resolved:
        return f"{first if found.first_better else second} better"
    return f"not resolved: {settle(found)}"
