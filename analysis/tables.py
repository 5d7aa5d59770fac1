"""The numbers behind the report: one row per configuration, best rows, the Pareto front.

Works on the runs DataFrame of `analysis.runs.Study` (mlflow.search_runs columns plus
`family` and `label`); pure pandas, no plotting.

Select on validation, report on test: the best row of each family is chosen on a val/*
metric (mean over seeds); test/* and eval/* are shown for every row and never choose.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vae_lab import names

from . import stats
from .runs import SEED_PARAM, display_param, is_vae_family, parse_param

VAL_METRICS = [*names.split_metrics(names.VAL, variational=True), names.VAL_RECON_PLUS_KL]
TEST_METRICS = list(names.split_metrics(names.TEST, variational=True))
EVAL_ORDER = [names.EVAL_NLL_IWAE, names.EVAL_MSE, names.EVAL_PCA_MSE, names.EVAL_PROBE, names.EVAL_KNN,
              names.EVAL_ACTIVE_UNITS, names.EVAL_ACTIVE_FRACTION,
              *(metric for space in (names.FD_CLASSIFIER, names.FD_AUTOENCODER) for metric in space[1:])]
# how far prior samples are from the test images, beside distortion (test/recon) and rate (test/kl):
# the third side of the trade-off (Blau & Michaeli 2019)
SAMPLE_FD = [names.FD_CLASSIFIER.fd, names.FD_AUTOENCODER.fd]
_AFTER_RATE = TEST_METRICS.index(names.TEST_KL) + 1
REPORTED_ORDER = [*TEST_METRICS[:_AFTER_RATE], *SAMPLE_FD, *TEST_METRICS[_AFTER_RATE:], *EVAL_ORDER]


def metric_names(runs: pd.DataFrame) -> list[str]:
    """The val/, test/ and eval/ metrics some run has, in reading order."""
    present = {column[len("metrics."):] for column in runs.columns
               if column.startswith("metrics.") and runs[column].notna().any()}
    ordered = [name for name in VAL_METRICS + REPORTED_ORDER if name in present]
    extra = sorted(name for name in present if name.startswith(f"{names.EVAL}/") and name not in ordered)
    return ordered + extra


def configuration_summary(runs: pd.DataFrame, config_params: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per configuration (runs grouped by the swept params other than the seed).

    Columns: label, family, the swept params (parsed to numbers), runs, seeds, and for each
    metric `<metric> mean` and `<metric> std` (std is NaN for a single run).
    """
    rows = []
    for label, group in runs.groupby("label", sort=False):
        row = {"label": label, "family": group["family"].iloc[0]}
        for key in config_params:
            row[key] = parse_param(group[f"params.{key}"].iloc[0]) if f"params.{key}" in group else None
        row["runs"] = len(group)
        seeds = group.get(f"params.{SEED_PARAM}")
        row["seeds"] = ",".join(sorted(seeds.dropna().astype(str).unique())) if seeds is not None else ""
        for metric in metrics:
            values = group.get(f"metrics.{metric}", pd.Series(dtype=float)).dropna()
            row[f"{metric} mean"] = values.mean() if len(values) else np.nan
            row[f"{metric} std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    sort_keys = [key for key in ["family", *config_params] if key in summary]
    if len(summary) and sort_keys:
        summary = summary.sort_values(sort_keys, key=_sortable, kind="stable").reset_index(drop=True)
    return summary


def _sortable(column: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().all() else column.astype(str)


def ranking_metric(variational: bool, objectives: list[tuple[str, str]], available: set[str]) -> tuple[str, str] | None:
    """The metric and direction that picks a family's best configuration, or None.

    A single-objective study ranks by its objective. Otherwise (several objectives, or none):
    VAEs by validation ELBO, which every KL weight shares (or, where the likelihood is not
    normalized and there is no ELBO, by val/recon + val/kl, the same KL-weight-1 objective
    as a loss), and AEs by validation reconstruction. Only what `names.is_selectable` allows may choose: a study whose objective
    was a test/* metric falls back to the default, and runs without val/* get no best row.
    """
    if len(objectives) == 1 and names.is_selectable(objectives[0][0]) and objectives[0][0] in available:
        return objectives[0]
    if variational and names.VAL_ELBO in available:
        return names.VAL_ELBO, "maximize"
    if variational and names.VAL_RECON_PLUS_KL in available:
        return names.VAL_RECON_PLUS_KL, "minimize"
    if names.VAL_RECON in available:
        return names.VAL_RECON, "minimize"
    return None


def mark_best(summary: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Adds `best` (True on the best row of each family, by the mean over its seeds),
    `ranked_metric` ('val/elbo') and `ranked_by` ('val/elbo (max)')."""
    summary = summary.copy()
    summary["best"] = False
    summary["ranked_metric"] = ""
    summary["ranked_by"] = ""
    if summary.empty:
        return summary
    for family, group in summary.groupby("family", sort=False):
        available = {column[:-len(" mean")] for column in group.columns
                     if column.endswith(" mean") and group[column].notna().any()}
        ranking = ranking_metric(is_vae_family(str(family), names.VAL_KL in available), objectives, available)
        if ranking is None:
            continue
        metric, direction = ranking
        means = group[f"{metric} mean"]
        best_index = means.idxmax() if direction == "maximize" else means.idxmin()
        summary.loc[best_index, "best"] = True
        summary.loc[group.index, "ranked_metric"] = metric
        summary.loc[group.index, "ranked_by"] = f"{metric} ({direction[:3]})"
    return summary


def table_metrics(summary: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The comparison table's metric columns: every reported (test/, eval/) metric, and each
    val/* metric that chose a best row just before its test/* counterpart."""
    chosen_by = [metric for metric in dict.fromkeys(summary.get("ranked_metric", [])) if metric]
    columns = [metric for metric in chosen_by if names.held_out_counterpart(metric) not in metrics]
    for metric in metrics:
        if names.is_selectable(metric):
            continue
        columns += [chooser for chooser in chosen_by if names.held_out_counterpart(chooser) == metric]
        columns.append(metric)
    return columns


def format_value(mean: float, std: float) -> str:
    if mean is None or np.isnan(mean):
        return "–"
    digits = 4 if abs(mean) < 1 else 2
    if std is None or np.isnan(std):
        return f"{mean:.{digits}f}"
    digits = stats.supported_decimals(std) if std > 0 else digits  # what the seeds' spread supports
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def display_table(summary: pd.DataFrame, config_params: list[str], metrics: list[str]) -> pd.DataFrame:
    """The comparison table as strings: 'mean ± std' cells, a ★ on each family's best row."""
    table = pd.DataFrame({"": np.where(summary["best"], "★", "") if "best" in summary else ""})
    table["family"] = summary["family"]
    for key in config_params:
        if key != "model.name" and key in summary:
            table[key] = summary[key].map(display_param)
    table["runs"] = summary["runs"].astype(str)
    for metric in metrics:
        table[metric] = [format_value(mean, std) for mean, std
                         in zip(summary[f"{metric} mean"], summary[f"{metric} std"])]
    return table


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated when minimizing both x and y, sorted by x."""
    ordered = frame.dropna(subset=[x, y]).sort_values([x, y])
    keep, best_y = [], np.inf
    for index, row in ordered.iterrows():
        if row[y] < best_y:
            keep.append(index)
            best_y = row[y]
    return ordered.loc[keep]


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs an extra package)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(column) for column in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ----------------------------------------------------------------------------- intervals

ALL_PAIRS_UP_TO = 6  # configurations; beyond, each is compared with its family's best only


def interval_metrics(summary: pd.DataFrame) -> list[str]:
    """The metrics worth an interval: each one that chose a ★ row, val/recon, and their test/* counterparts."""
    chosen = [metric for metric in dict.fromkeys(summary.get("ranked_metric", [])) if metric]
    selecting = list(dict.fromkeys([*chosen, names.VAL_RECON]))
    reported = [names.held_out_counterpart(metric) for metric in selecting]
    return [metric for metric in [*selecting, *reported]
            if metric and f"{metric} mean" in summary and summary[f"{metric} mean"].notna().any()]


def interval_table(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: its seeds and 'mean [95% interval]' of each `interval_metrics`."""
    metrics = interval_metrics(summary)
    seeds = [len(stats.seed_values(runs, label, metrics[0])) if metrics else 0 for label in summary["label"]]
    table = pd.DataFrame({"": np.where(summary["best"], "★", "") if "best" in summary else "",
                          "configuration": summary["label"], "seeds": [str(count) for count in seeds]})
    for metric in metrics:
        table[metric] = [stats.interval_text(stats.mean_interval(stats.seed_values(runs, label, metric).values()))
                         if not np.isnan(mean) else "–"
                         for label, mean in zip(summary["label"], summary[f"{metric} mean"])]
    return table


def compared_pairs(summary: pd.DataFrame) -> list[tuple[pd.Series, pd.Series]]:
    """Which configurations are set against each other: every pair when there are few; otherwise
    each configuration against its family's ★ row, and the ★ rows against each other."""
    rows = [row for _, row in summary.iterrows()]
    if len(rows) <= ALL_PAIRS_UP_TO:
        return [(first, second) for index, first in enumerate(rows) for second in rows[index + 1:]]
    stars = [row for row in rows if row.get("best", False)]
    pairs = [(first, second) for index, first in enumerate(stars) for second in stars[index + 1:]]
    for star in stars:
        pairs += [(star, row) for row in rows if row["family"] == star["family"] and row["label"] != star["label"]]
    return pairs


def lower_is_better(metric: str) -> bool:
    """Every loss here falls as it improves; an ELBO rises."""
    return not metric.endswith("/elbo")


def _shared_metric(first: pd.Series, second: pd.Series) -> str | None:
    """What two configurations are compared on: the metric that ranks both (the same family's), else
    val/elbo between VAEs, else val/recon."""
    candidates = [first.get("ranked_metric")] if first.get("ranked_metric") == second.get("ranked_metric") else []
    candidates += [names.VAL_ELBO, names.VAL_RECON]
    for metric in candidates:
        if metric and all(not np.isnan(row.get(f"{metric} mean", np.nan)) for row in (first, second)):
            return metric
    return None


# the call first, next to what is compared: a wide table scrolls, and the verdict stays in view
DIFFERENCE_COLUMNS = ["call", "seeds", "A − B [95% interval]", "P(A better)", "reported: test A − B"]


def difference_cells(runs_a: pd.DataFrame, label_a: str, runs_b: pd.DataFrame, label_b: str,
                     metric: str) -> tuple[dict, stats.Difference]:
    """A − B on `metric` over the two configurations' runs (paired by seed where they share seeds),
    as table cells, with the test/* counterpart's difference beside it, reported."""
    lower = lower_is_better(metric)
    found = stats.difference(stats.seed_values(runs_a, label_a, metric), stats.seed_values(runs_b, label_b, metric),
                             metric, lower)
    reported = names.held_out_counterpart(metric)
    test_a = stats.seed_values(runs_a, label_a, reported) if reported else {}
    test_b = stats.seed_values(runs_b, label_b, reported) if reported else {}
    test = stats.difference(test_a, test_b, reported, lower) if test_a and test_b else None
    cells = {
        "call": stats.call(found, "A", "B"),
        "seeds": stats.how_paired(found),
        "A − B [95% interval]": stats.interval_text(found.interval),
        "P(A better)": "–" if found.probability_first_better is None else f"{found.probability_first_better:.0%}",
        "reported: test A − B": "–" if test is None else f"{reported}: {stats.interval_text(test.interval)}",
    }
    return cells, found


def difference_table(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Pairs of configurations (`compared_pairs`): A − B on the validation metric that compares them,
    paired by seed, its 95% interval, P(A better), the call, and the test counterpart's difference."""
    rows = []
    for first, second in compared_pairs(summary):
        metric = _shared_metric(first, second)
        if metric is not None:
            cells, _ = difference_cells(runs, first["label"], runs, second["label"], metric)
            rows.append({"A": first["label"], "B": second["label"], "compared on": metric, **cells})
    return pd.DataFrame(rows, columns=["A", "B", "compared on", *DIFFERENCE_COLUMNS])
