"""The Optuna side of a study's search space: sampler and pruner from the study file, and
the swept values of a trial (its grid point, or what the sampler suggests)."""

from __future__ import annotations

import json
from typing import Any

import optuna

from vae_lab.study import storage as store
from vae_lab.study.spec import SEED_PARAM, Choices, StudySpec


def encode(value: Any) -> Any:
    """Optuna params hold None/bool/int/float/str: lists become their JSON text."""
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    options = dict(spec.sampler_options)
    if spec.sampler == "grid":  # every trial is enqueued with fixed params; nothing is sampled
        return optuna.samplers.RandomSampler(seed=0)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(**options)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(**options)
    return optuna.samplers.RandomSampler(**options)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**spec.pruner_options)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**spec.pruner_options)
    return optuna.pruners.NopPruner()


def grid_choices(spec: StudySpec) -> dict[str, list]:
    """Each swept key's distinct values over the grid, as Optuna categorical choices, in the
    order the grid first meets them (a stored study's choices must not change)."""
    if spec.n_trials is not None:  # a grid cut short holds only the values of its first points
        assignments = spec.iter_grid_points()
    else:  # every point's, every axis value, every seed: without listing the product
        axes = spec.grid_axes()
        assignments = [{key: value for key, value in point.items() if key not in axes} for point in spec.points]
        assignments += [{key: value} for key, values in axes.items() for value in values]
        assignments += [{SEED_PARAM: seed} for seed in spec.seeds]
    choices: dict[str, list] = {}
    for assignment in assignments:
        for key, value in assignment.items():
            encoded = encode(list(value) if isinstance(value, tuple) else value)
            if encoded not in choices.setdefault(key, []):
                choices[key].append(encoded)
    return choices


def suggest_assignment(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """The trial's swept values: from its grid point, or suggested by the sampler."""
    if spec.is_grid:
        assignment = json.loads(trial.user_attrs[store.ASSIGNMENT_ATTR])
        for key, choices in grid_choices(spec).items():  # recorded as Optuna params too
            if key in assignment:
                trial.suggest_categorical(key, choices)
        return assignment
    assignment: dict[str, Any] = {}
    for key, param in spec.space.items():
        if isinstance(param, Choices):
            encoded = [encode(value) for value in param.values]
            assignment[key] = plain(param.values[encoded.index(trial.suggest_categorical(key, encoded))])
        elif param.type == "int":
            assignment[key] = trial.suggest_int(key, low=int(param.low), high=int(param.high),
                                                step=int(param.step or 1), log=param.log)
        else:
            assignment[key] = trial.suggest_float(key, low=float(param.low), high=float(param.high),
                                                  step=param.step, log=param.log)
    if spec.points:
        index = trial.suggest_categorical("points", list(range(len(spec.points))))
        assignment.update(spec.points[index])
    trial.set_user_attr(store.ASSIGNMENT_ATTR, json.dumps(assignment))
    return assignment
