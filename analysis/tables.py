"""The numbers behind the report: one row per configuration, best rows, the Pareto front.

Works on the runs DataFrame of `analysis.runs.Study` (mlflow.search_runs columns plus
`family` and `label`); pure pandas, no plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .runs import SEED_PARAM, display_param, parse_param

TEST_METRICS = ["test/loss", "test/recon", "test/kl", "test/elbo", "test/mse_per_pixel"]
EVAL_ORDER = ["eval/nll_iwae", "eval/mse_per_pixel", "eval/pca_mse_per_pixel", "eval/probe_accuracy",
              "eval/knn_accuracy", "eval/active_units", "eval/active_fraction"]
HIGHER_IS_BETTER = {"test/elbo", "eval/probe_accuracy", "eval/knn_accuracy", "eval/active_units",
                    "eval/active_fraction"}
VAE_FAMILIES = ("linear_vae", "conv_vae")


def metric_names(runs: pd.DataFrame) -> list[str]:
    """The test/ and eval/ metrics some run has, in reading order."""
    present = {column[len("metrics."):] for column in runs.columns
               if column.startswith("metrics.") and runs[column].notna().any()}
    ordered = [name for name in TEST_METRICS + EVAL_ORDER if name in present]
    extra = sorted(name for name in present if name.startswith("eval/") and name not in ordered)
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


def ranking_metric(family: str, objectives: list[tuple[str, str]], available: set[str]) -> tuple[str, str] | None:
    """The metric and direction that picks a family's best configuration.

    A single-objective study ranks by its objective. Otherwise (several objectives, or none):
    VAEs by test ELBO, which every KL weight shares, and AEs by test reconstruction.
    """
    if len(objectives) == 1 and objectives[0][0] in available:
        return objectives[0]
    if family in VAE_FAMILIES and "test/elbo" in available:
        return "test/elbo", "maximize"
    if "test/recon" in available:
        return "test/recon", "minimize"
    return None


def mark_best(summary: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """Adds `best` (True on the best row of each family) and `ranked_by` ('test/elbo (max)')."""
    summary = summary.copy()
    summary["best"] = False
    summary["ranked_by"] = ""
    if summary.empty:
        return summary
    for family, group in summary.groupby("family", sort=False):
        available = {column[:-len(" mean")] for column in group.columns
                     if column.endswith(" mean") and group[column].notna().any()}
        ranking = ranking_metric(family, objectives, available)
        if ranking is None:
            continue
        metric, direction = ranking
        values = group[f"{metric} mean"]
        best_index = values.idxmax() if direction == "maximize" else values.idxmin()
        summary.loc[best_index, "best"] = True
        summary.loc[group.index, "ranked_by"] = f"{metric} ({direction[:3]})"
    return summary


def format_value(mean: float, std: float) -> str:
    if mean is None or np.isnan(mean):
        return "–"
    digits = 4 if abs(mean) < 1 else 2
    if std is None or np.isnan(std):
        return f"{mean:.{digits}f}"
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
