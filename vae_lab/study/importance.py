"""Which swept params the objectives depend on: Optuna's fANOVA over a study's COMPLETE trials.

fANOVA (`optuna.importance.FanovaImportanceEvaluator`, seed 0 for the same numbers every time)
fits a random forest to the objective and splits its variance over the params, which works on a
grid and on a few dozen trials. Optuna's default, PED-ANOVA, asks which params the best 10% of
the trials share and wants at least 5 trials there: some 50 trials, more than most studies here.

Importance is computed once per objective (`target=trial.values[i]`) over the params that take
at least two values among the complete trials. The seed (`train.seed`) stays in when it is
swept: its share is what the seed alone moves, a yardstick for the other params (a rough one:
fANOVA puts the rest of the seed-to-seed noise in its residual and interactions). Optuna names params by
their dotted config keys; a sampled study with `search_space.points` has one more, `points`,
the index of the entry it took.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from vae_lab.study.spec import POINTS_KEY, SEED_PARAM, StudySpec

EVALUATOR = "fANOVA (optuna.importance.FanovaImportanceEvaluator, seed 0)"


def make_evaluator() -> optuna.importance.FanovaImportanceEvaluator:
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


class Computed(optuna.importance.BaseImportanceEvaluator):
    """Importances already computed (`param_importances`), for Optuna's importance chart, which
    would otherwise fit fANOVA's forest again: the chart shows what importances.json holds."""

    def __init__(self, importances: dict[str, float]):
        self.importances = importances

    def evaluate(self, study, params=None, *, target=None) -> dict[str, float]:
        return dict(self.importances)


def objective_value(index: int) -> Callable[[FrozenTrial], float]:
    """Optuna's `target` for one objective of the study."""
    return lambda trial: trial.values[index]


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def varying_params(study: optuna.Study) -> list[str]:
    """The params every complete trial has that take at least two values among them."""
    trials = complete_trials(study)
    if not trials:
        return []
    shared = [name for name in trials[0].params if all(name in trial.params for trial in trials)]
    return [name for name in shared if len({trial.params[name] for trial in trials}) > 1]


def param_notes(spec: StudySpec, params: list[str]) -> dict[str, str]:
    """What a reader must know to read some params' importances."""
    notes = {}
    if SEED_PARAM in params:
        notes[SEED_PARAM] = ("the random seed: its share is the part of the variation the seed alone explains; "
                             "a param near it moves the objective about as much as rerunning with another seed")
    paired = list(dict.fromkeys(key for point in spec.points for key in point))
    if POINTS_KEY in params:
        notes[POINTS_KEY] = f"which entry of search_space.points, each setting {', '.join(paired)} together"
    for key in paired:  # a grid records each key of its points as a param of its own
        if key in params:
            others = ", ".join(other for other in paired if other != key)
            notes[key] = f"set together with {others} by search_space.points: they share the credit"
    return notes


def skip_reason(study: optuna.Study, spec: StudySpec, params: list[str]) -> str | None:
    """Why the complete trials cannot rank the params, or None when they can."""
    trials = complete_trials(study)
    if len(trials) < 2:
        return f"needs at least 2 complete trials, the study has {len(trials)}"
    if not params:
        return f"no swept param takes more than one value over the {len(trials)} complete trials"
    for index, objective in enumerate(spec.objectives):
        if len({trial.values[index] for trial in trials}) < 2:
            return f"{objective.metric} has the same value in all {len(trials)} complete trials"
    return None


def param_importances(study: optuna.Study, spec: StudySpec, params: list[str]) -> dict:
    """The content of study/importances.json, or {"skipped": why} when it cannot be computed:
    {"evaluator", "trials", "objectives": {metric: {param: importance}}, "notes": {param: text}}.
    Each objective's importances are sorted, largest first, and sum to 1."""
    reason = skip_reason(study, spec, params)
    if reason:
        return {"skipped": reason}
    by_objective = {}
    for index, objective in enumerate(spec.objectives):
        importances = optuna.importance.get_param_importances(
            study, evaluator=make_evaluator(), params=params, target=objective_value(index))
        by_objective[objective.metric] = {name: float(value) for name, value in importances.items()}
    return {"evaluator": EVALUATOR, "trials": len(complete_trials(study)), "objectives": by_objective,
            "notes": param_notes(spec, params)}
