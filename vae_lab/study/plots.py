"""Optuna's own matplotlib plots of a study (`optuna.visualization.matplotlib`), saved as PNG.

Each is drawn only where it applies:

    optimization_history.png  one objective: every complete trial's value, and the best so far
    pareto_front.png          two or three objectives: every complete trial, the front marked
    param_importances.png     the fANOVA importances (vae_lab.study.importance), when computed
    slice.png                 the objective against each param that varies
    contour.png               the objective over the two params that vary, when both are numbers

With several objectives the last three are drawn once per objective and named after it:
param_importances_val_recon.png, slice_val_kl.png, ... (`plot_file`). One importance chart per
objective also because Optuna 5.0, given several objectives in one chart, labels every
objective's bars with the last objective's param order: wrong names where they rank differently.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.distributions import FloatDistribution, IntDistribution  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from vae_lab.study.spec import StudySpec  # noqa: E402
from vae_lab.study.importance import Computed, complete_trials, objective_value  # noqa: E402

# in the order a reader wants them
KINDS = ("optimization_history", "pareto_front", "param_importances", "contour", "slice")
DPI = 100


def plot_file(kind: str, metric: str | None = None) -> str:
    """The PNG's name: `slice.png`, or `slice_val_recon.png` for one objective of several."""
    return f"{kind}_{metric.replace('/', '_')}.png" if metric else f"{kind}.png"


def _numeric(study: optuna.Study, param: str) -> bool:
    distribution = complete_trials(study)[0].distributions[param]
    return isinstance(distribution, (FloatDistribution, IntDistribution))


def applicable_plots(study: optuna.Study, spec: StudySpec, params: list[str],
                     importances: dict | None) -> dict[str, partial]:
    """File name -> the Optuna call that draws it, for the plots this study can support.
    `params` are the params that vary (importance.varying_params); `importances` is what
    `importance.param_importances` computed (None: no importance charts)."""
    if not complete_trials(study):
        return {}
    metrics = [objective.metric for objective in spec.objectives]
    plots = {}
    if len(metrics) == 1:
        plots[plot_file("optimization_history")] = partial(
            optuna_plots.plot_optimization_history, study, target_name=metrics[0])
    elif len(metrics) in (2, 3):  # what Optuna can draw
        plots[plot_file("pareto_front")] = partial(optuna_plots.plot_pareto_front, study, target_names=metrics)
    if not params:
        return plots
    two_numbers = len(params) == 2 and all(_numeric(study, param) for param in params)
    for index, metric in enumerate(metrics):
        named = metric if len(metrics) > 1 else None
        per_objective = {"params": params, "target": objective_value(index), "target_name": metric}
        if importances is not None:
            plots[plot_file("param_importances", named)] = partial(
                optuna_plots.plot_param_importances, study, Computed(importances["objectives"][metric]),
                **per_objective)
        if two_numbers:
            plots[plot_file("contour", named)] = partial(optuna_plots.plot_contour, study, **per_objective)
        plots[plot_file("slice", named)] = partial(optuna_plots.plot_slice, study, **per_objective)
    return plots


def plain_log_ticks(figure) -> None:
    """Log axes labelled with plain numbers (20, 30, 40): over a range under a decade matplotlib
    labels the minor ticks as 2×10¹, 3×10¹, 4×10¹, which run together. Minor ticks keep their
    labels only where the axis spans less than a decade (no major tick may be in view)."""
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax in figure.axes:
        for axis, limits, scale in ((ax.xaxis, ax.get_xlim(), ax.get_xscale()),
                                    (ax.yaxis, ax.get_ylim(), ax.get_yscale())):
            if scale != "log" or min(limits) <= 0:
                continue
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain if max(limits) / min(limits) < 10 else NullFormatter())


def save_plots(study: optuna.Study, spec: StudySpec, params: list[str], importances: dict | None,
               folder: Path) -> dict[str, str]:
    """Draw the applicable plots into `folder`; returns {file: error} for any Optuna could not
    draw, so that a plot never costs a finished study its summary."""
    errors = {}
    for name, draw in applicable_plots(study, spec, params, importances).items():
        # the plots are experimental in Optuna; each sets the ggplot style, which rc_context undoes
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            open_before = set(plt.get_fignums())
            try:
                axes = draw()
            except Exception as error:  # whatever Optuna raises, the study keeps its summary
                errors[name] = f"{type(error).__name__}: {error}"
                for number in set(plt.get_fignums()) - open_before:
                    plt.close(number)
                continue
            figure = axes.flat[0].figure if isinstance(axes, np.ndarray) else axes.figure
            plain_log_ticks(figure)
            figure.savefig(folder / name, dpi=DPI, bbox_inches="tight")
            plt.close(figure)
    return errors
