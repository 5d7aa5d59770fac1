"""Seaborn plots of a study: learning curves, rate–distortion, latent size, heatmaps.

Each function writes one PNG and returns a `Figure`; when the runs cannot support the
plot it writes nothing and returns a `Figure` whose `skipped` says why. Plots that mark a
best point or a front draw the validation split (what a study selects on); every axis names
its split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vae_lab import names  # noqa: E402

from .runs import SEED_PARAM, display_param, metric_history, numeric_column  # noqa: E402
from .tables import pareto_front  # noqa: E402

MAX_LEGEND_ENTRIES = 14
DPI = 110
EPOCH_CURVE = f"{names.VAL_LOSS} by epoch"
STEP_CURVE = f"{names.TRAIN_LOSS} by step"


@dataclass
class Figure:
    title: str
    path: Path | None = None
    skipped: str | None = None  # why the data cannot support this figure
    caption: str = ""


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _legend(ax, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > MAX_LEGEND_ENTRIES:  # a legend that long hides the plot; the table names them
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        return
    ax.legend(handles, [_short_number(label) for label in labels], title=title, fontsize=7, title_fontsize=8,
              frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _short_number(label: str) -> str:
    """A legend entry that is a number, to 3 significant digits (seaborn lists a few hue values
    as they are: 0.49740235767797003); any other entry as it is."""
    try:
        return f"{float(label):.3g}"
    except ValueError:
        return label


# ----------------------------------------------------------------------------- learning curves

def learning_histories(client, runs: pd.DataFrame) -> pd.DataFrame:
    """Long table of curves: run_id, label, status, curve (EPOCH_CURVE | STEP_CURVE), x, value."""
    parts = []
    for _, run in tqdm(list(runs.iterrows()), desc="metric histories", leave=False, unit="run"):
        run_id = run["run_id"]
        # an early-stopped run logs its kept weights' val/loss again at its last step: the curve
        # keeps each epoch's own value, the first one logged at that step
        val = metric_history(client, run_id, names.VAL_LOSS).drop_duplicates("step", keep="first")
        epochs = metric_history(client, run_id, names.EPOCH).drop_duplicates("step", keep="first")
        if len(val):
            val = val.merge(epochs[["step", "value"]].rename(columns={"value": "epoch"}), on="step", how="left")
            # an epoch's val/loss shares its step with the `epoch` metric; fall back to the order
            val["x"] = val["epoch"].fillna(pd.Series(np.arange(1, len(val) + 1), index=val.index))
            parts.append(val.assign(curve=EPOCH_CURVE)[["x", "value", "curve"]]
                         .assign(run_id=run_id, label=run["label"], status=run["status"]))
        train = metric_history(client, run_id, names.TRAIN_LOSS)
        if len(train):
            parts.append(train.rename(columns={"step": "x"}).assign(curve=STEP_CURVE)[["x", "value", "curve"]]
                         .assign(run_id=run_id, label=run["label"], status=run["status"]))
    if not parts:
        return pd.DataFrame(columns=["x", "value", "curve", "run_id", "label", "status"])
    return pd.concat(parts, ignore_index=True)


def learning_curves(histories: pd.DataFrame, path: Path) -> Figure:
    title = "Learning curves"
    curves = [curve for curve in (EPOCH_CURVE, STEP_CURVE)
              if (histories[histories["curve"] == curve].groupby("run_id").size() >= 2).any()]
    if not curves:
        return Figure(title, skipped=f"no run logged more than one point of {names.VAL_LOSS} or "
                                     f"{names.TRAIN_LOSS} (one epoch, one logging step)")
    figure, axes = plt.subplots(1, len(curves), figsize=(6.2 * len(curves), 4.2), squeeze=False)
    for ax, curve in zip(axes[0], curves):
        data = histories[histories["curve"] == curve]
        sns.lineplot(data=data, x="x", y="value", hue="label", units="run_id", estimator=None,
                     style="status" if data["status"].nunique() > 1 else None, marker="o", markersize=3,
                     linewidth=1.2, ax=ax)
        metric, _, axis = curve.partition(" by ")
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{metric} (nats per image)")
        ax.set_title(curve)
        _legend(ax)
    return Figure(title, _save(figure, path),
                  caption="One line per run (seeds share a colour); val/loss on the validation split at the "
                          "end of each epoch, train/loss averaged over each logging interval.")


# ----------------------------------------------------------------------------- rate–distortion

def rate_distortion(finished: pd.DataFrame, path: Path) -> Figure:
    title = "Rate–distortion (validation)"
    rate, distortion = f"metrics.{names.VAL_KL}", f"metrics.{names.VAL_RECON}"
    if not all(column in finished for column in (rate, distortion)):
        return Figure(title, skipped=f"no finished run logged {names.VAL_KL} and {names.VAL_RECON} "
                                     "(only VAEs have a KL term)")
    points = finished.dropna(subset=[rate, distortion]).copy()
    if len(points) < 2:
        return Figure(title, skipped=f"needs at least two finished VAE runs, found {len(points)}")
    weights = numeric_column(points, "params.loss.kl_weight")
    points["kl_weight"] = weights if weights is not None else 1.0
    figure, ax = plt.subplots(figsize=(7.2, 4.8))
    positive = points["kl_weight"] > 0
    varied = points["kl_weight"].nunique() > 1
    norm = (LogNorm() if positive.all() and points["kl_weight"].max() / points["kl_weight"].min() >= 10
            else Normalize())
    sns.scatterplot(data=points, x=rate, y=distortion,
                    hue="kl_weight" if varied else None, hue_norm=norm if varied else None,
                    palette="viridis" if varied else None, style="family", s=60, ax=ax)
    front = pareto_front(points, rate, distortion)
    ax.plot(front[rate], front[distortion], drawstyle="steps-post", color="crimson",
            linewidth=1.2, label="Pareto front", zorder=0)
    ax.set_xlabel(f"rate: {names.VAL_KL} (nats per image)")
    ax.set_ylabel(f"distortion: {names.VAL_RECON} (nats per image)")
    _legend(ax)
    return Figure(title, _save(figure, path),
                  caption=f"Each finished VAE run is a point on the validation split, "
                          + ("coloured by loss.kl_weight; " if varied else
                             f"all with loss.kl_weight = {points['kl_weight'].iloc[0]:g}; ")
                          + f"the red line joins the {len(front)} runs no other run beats on both val/kl and "
                          f"val/recon.")


# ----------------------------------------------------------------------------- latent size

def _group_without(finished: pd.DataFrame, config_params: list[str], left_out: str) -> pd.Series:
    others = [key for key in config_params if key not in (left_out, "model.name")]
    labels = finished["family"].astype(str)
    for key in others:
        if f"params.{key}" in finished:
            labels = labels + ", " + key.split(".")[-1] + "=" + finished[f"params.{key}"].map(display_param)
    return labels


def metric_vs_latent(finished: pd.DataFrame, config_params: list[str], path: Path) -> Figure:
    title = "Metrics against latent size"
    if finished.empty:
        return Figure(title, skipped="no finished run")
    latent = numeric_column(finished, "params.model.latent_dim")
    if latent is None or latent.nunique() < 2:
        return Figure(title, skipped="all finished runs share one latent size")
    data = finished.assign(latent_dim=latent, group=_group_without(finished, config_params, "model.latent_dim"))
    panels = [metric for metric in (names.VAL_RECON, names.EVAL_MSE, names.EVAL_PROBE)
              if f"metrics.{metric}" in data and data[f"metrics.{metric}"].notna().any()]
    if not panels:
        return Figure(title, skipped=f"no finished run logged {names.VAL_RECON} or eval/*")
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    sizes = sorted(data["latent_dim"].unique())
    for index, (ax, metric) in enumerate(zip(axes[0], panels)):
        sns.lineplot(data=data, x="latent_dim", y=f"metrics.{metric}", hue="group", marker="o",
                     errorbar="sd", ax=ax)
        if metric == names.EVAL_MSE and f"metrics.{names.EVAL_PCA_MSE}" in data:
            baseline = data.groupby("latent_dim")[f"metrics.{names.EVAL_PCA_MSE}"].mean()
            ax.plot(baseline.index, baseline.values, linestyle="--", color="grey", label="PCA baseline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{size:g}" for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel("model.latent_dim")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        if index == len(panels) - 1:
            _legend(ax)
        elif ax.get_legend() is not None:
            ax.get_legend().remove()
    return Figure(title, _save(figure, path),
                  caption="Mean over seeds (band: ±1 std where there are replicates), one line per model "
                          "family and setting of the other swept parameters; val/recon on the validation split, "
                          "eval/* on the test split; dashed: PCA with as many components.")


# ----------------------------------------------------------------------------- heatmaps

MIN_HEATMAP_FILL = 0.5  # a heatmap is drawn only where at least half its cells hold runs


def numeric_swept(finished: pd.DataFrame, config_params: list[str]) -> list[str]:
    """Swept keys (not the seed) whose values are numbers and take at least two values."""
    keys = []
    for key in config_params:
        values = numeric_column(finished, f"params.{key}")
        if key != SEED_PARAM and values is not None and values.nunique() >= 2:
            keys.append(key)
    return keys


def heatmap(finished: pd.DataFrame, config_params: list[str], metric: str, path: Path,
            pair: tuple[str, str] | None = None) -> Figure:
    numeric = numeric_swept(finished, config_params)
    if pair is None and len(numeric) < 2:
        return Figure("Heatmap", skipped=f"needs two swept numeric parameters besides the seed; "
                                          f"this study has {len(numeric)} ({', '.join(numeric) or 'none'})")
    x_key, y_key = pair or (numeric[0], numeric[1])
    title = f"Heatmap: {metric} over {x_key} × {y_key}"
    column = f"metrics.{metric}"
    if column not in finished:
        return Figure(title, skipped=f"no finished run has {metric}")
    data = finished.assign(x=numeric_column(finished, f"params.{x_key}"),
                           y=numeric_column(finished, f"params.{y_key}")).dropna(subset=[column])
    families = [family for family, group in data.groupby("family") if group["x"].nunique() * group["y"].nunique() > 1]
    if not families:
        return Figure(title, skipped=f"no model family has runs at more than one ({x_key}, {y_key}) cell")
    grids = {family: data[data["family"] == family].pivot_table(index="y", columns="x", values=column, aggfunc="mean")
             for family in families}
    filled = max(grid.notna().to_numpy().mean() for grid in grids.values())
    if filled < MIN_HEATMAP_FILL:  # sampled values (TPE, random): every run in a cell of its own
        return Figure(title, skipped=f"the values of {x_key} and {y_key} are not on a grid (at most "
                                     f"{filled:.0%} of the cells have a run): the slice plot shows each run")
    figure, axes = plt.subplots(1, len(families), figsize=(4.8 * len(families) + 0.6, 4.0), squeeze=False)
    for ax, family in zip(axes[0], families):
        grid = grids[family].sort_index(ascending=False)
        grid.index = [f"{value:.3g}" for value in grid.index]  # axis labels, not 0.49740235767797003
        grid.columns = [f"{value:.3g}" for value in grid.columns]
        sns.heatmap(grid, annot=True, fmt=".3g", cmap="mako_r", ax=ax, cbar_kws={"label": metric})
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.set_title(family)
    others = [key for key in numeric if key not in (x_key, y_key)]
    caption = f"Mean {metric} per cell over seeds"
    caption += f" and over {', '.join(others)}." if others else "."
    return Figure(title, _save(figure, path), caption=caption)
