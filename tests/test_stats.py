"""Intervals and paired differences (analysis.stats) against SciPy and Student's t directly."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis import stats


def scipy_interval(*samples, statistic, paired=False):
    result = scipy_stats.bootstrap(samples, statistic, n_resamples=stats.RESAMPLES, method="percentile",
                                   paired=paired, rng=np.random.default_rng(stats.GENERATOR_SEED))
    return result.confidence_interval.low, result.confidence_interval.high


def test_mean_interval_is_scipys_percentile_bootstrap():
    values = [101.3, 99.2, 104.8, 100.1, 98.7]
    interval = stats.mean_interval(values)
    low, high = scipy_interval(np.array(values), statistic=np.mean)
    assert (interval.estimate, interval.n) == (pytest.approx(np.mean(values)), 5)
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    assert interval.low < np.mean(values) < interval.high
    assert stats.mean_interval(values) == interval  # a fixed generator: the same report twice


def test_one_value_has_no_interval_and_equal_values_a_point():
    single = stats.mean_interval([3.0, math.nan])
    assert (single.estimate, single.low, single.high, single.n) == (3.0, None, None, 1)
    assert not single.has_interval and not single.excludes_zero
    assert stats.interval_text(single) == "3.00 (one seed: no interval)"
    same = stats.mean_interval([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)
    assert math.isnan(stats.mean_interval([]).estimate)


def test_paired_difference_cancels_the_seeds_luck():
    # the seed moves both configurations by up to 10 nats; B is 1 nat worse at every seed
    luck = [0.0, 10.0, -8.0, 4.0]
    first = {seed: 100.0 + value for seed, value in enumerate(luck)}
    second = {seed: 101.0 + value + 0.1 * seed for seed, value in enumerate(luck)}
    paired = stats.difference(first, second, "val/recon", lower_is_better=True)
    deltas = np.array([first[seed] - second[seed] for seed in first])
    low, high = scipy_interval(deltas, statistic=np.mean)
    assert paired.paired and paired.interval.n == 4
    assert (paired.interval.low, paired.interval.high) == (pytest.approx(low), pytest.approx(high))
    assert paired.resolved and paired.first_better and paired.probability_first_better == 1.0
    assert paired.seeds_to_settle is None
    assert stats.call(paired, "A", "B") == "A better"
    # the same numbers without shared seeds: the luck no longer cancels and the interval spans zero
    unpaired = stats.difference(first, {seed + 10: value for seed, value in second.items()}, "val/recon", True)
    low, high = scipy_interval(np.array(list(first.values())), np.array(list(second.values())),
                               statistic=lambda a, b, axis=-1: np.mean(a, axis=axis) - np.mean(b, axis=axis))
    assert not unpaired.paired and not unpaired.resolved
    assert (unpaired.interval.low, unpaired.interval.high) == (pytest.approx(low), pytest.approx(high))
    assert "seeds per side would be needed for the interval to exclude zero" in stats.call(unpaired, "A", "B")


def test_higher_is_better_flips_the_winner_and_the_probability():
    found = stats.difference({0: -90.0, 1: -91.0, 2: -92.5}, {0: -95.0, 1: -95.5, 2: -96.0}, "val/elbo",
                             lower_is_better=False)
    assert found.resolved and found.first_better and found.probability_first_better == 1.0
    assert stats.call(found, "conv", "mlp") == "conv better"


def test_one_seed_each_calls_nothing():
    found = stats.difference({0: 90.0}, {0: 99.0}, "val/recon", True)
    assert not found.interval.has_interval and not found.resolved
    assert stats.call(found, "A", "B") == "no interval (one seed each)"
    assert stats.evidence(found, "A") == "one seed each: no interval is possible"


def test_one_shared_seed_of_three_falls_back_to_all_seeds_unpaired():
    found = stats.difference({0: 10.0, 1: 11.0, 2: 12.0}, {2: 20.0, 3: 21.0, 4: 22.0}, "val/recon", True)
    assert not found.paired and found.seeds == (3, 3) and found.resolved and found.first_better
    assert found.interval.estimate == pytest.approx(-10.0)
    assert stats.how_paired(found) == "unpaired, 3 and 3 seeds"


def test_runs_without_a_seed_pair_with_nothing():
    import pandas as pd

    runs = pd.DataFrame({"run_id": ["r1", "r2", "r3", "r4", "r5"], "label": ["a", "a", "a", "b", "b"],
                         "params.train.seed": ["0", None, None, "0", "1"],
                         "metrics.val/recon": [10.0, 11.0, 12.0, 10.5, 11.5]})
    first, second = stats.seed_values(runs, "a", "val/recon"), stats.seed_values(runs, "b", "val/recon")
    assert first == {"0": 10.0, "r2": 11.0, "r3": 12.0} and second == {"0": 10.5, "1": 11.5}
    no_seeds = runs.drop(columns="params.train.seed")
    found = stats.difference(stats.seed_values(no_seeds, "a", "val/recon"), stats.seed_values(no_seeds, "b", "val/recon"),
                             "val/recon", True)
    assert not found.paired


def test_seeds_to_settle_is_the_first_n_whose_t_interval_excludes_zero():
    mean, std = 0.5, 1.5
    n = stats.seeds_to_settle(mean, std)
    half_width = lambda k: scipy_stats.t.ppf(0.975, k - 1) * std / math.sqrt(k)  # noqa: E731
    assert half_width(n) < mean <= half_width(n - 1)
    assert stats.seeds_to_settle(0.0, 1.0) is None
    assert stats.seeds_to_settle(1e-6, 10.0) is None  # more than MAX_SEEDS_TO_SETTLE
    unresolved = stats.difference({0: 100.0, 1: 101.0, 2: 99.0}, {0: 100.5, 1: 100.0, 2: 99.2}, "val/recon", True)
    deltas = np.array([-0.5, 1.0, -0.2])
    assert not unresolved.resolved
    assert unresolved.seeds_to_settle == stats.seeds_to_settle(deltas.mean(), deltas.std(ddof=1))


def test_numbers_are_rounded_to_what_their_interval_supports():
    from analysis.stats import Interval, interval_text, supported_decimals

    assert [supported_decimals(spread) for spread in (26.0, 2.7, 0.0061, 1e-12, 0.0, None)] == [0, 1, 4, 6, None, None]
    assert interval_text(Interval(-13.3312, -25.618, -1.034, 2)) == "-13 [-26, -1]"
    assert interval_text(Interval(1882.7213, 1881.351, 1884.092, 2)) == "1882.7 [1881.4, 1884.1]"
    assert interval_text(Interval(0.04061, 0.04012, 0.04136, 3)) == "0.0406 [0.0401, 0.0414]"
