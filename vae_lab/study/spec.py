"""Study files: parsing, validation and search-space expansion (no Optuna, no MLflow here).

A study file has three sections:

    study:        name, sampler, pruner, objectives, n_trials, timeout,
                  batch_trials (auto | off | N: train trials of one shape, or of sizes padded to one, together)
    base:         a run config applied to every trial (sections data, model, loss, ...)
    search_space: dotted config keys -> a list of values, or {low, high, log, step, type};
                  plus `points:` (whole assignments, for paired values) and `seeds:`

`load_study_spec(path, overrides)` reads and validates it all; any problem raises
`ConfigError` with one line, before anything is created anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from vae_lab import names
from vae_lab.components import short_name
from vae_lab.models.components import check as check_components, is_variational
from vae_lab.tracking.uris import redact
from vae_lab.config import (
    Config,
    ConfigError,
    allowed_keys,
    anchor_references,
    apply_mapping,
    build_config,
    flatten,
    is_config_key,
    load_yaml_mapping,
    parse_override,
    validate,
)

SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
SECTIONS = ("study", "base", "search_space")
STUDY_KEYS = ("name", "sampler", "pruner", "objectives", "n_trials", "timeout", "batch_trials", "max_grid_points")
MAX_GRID_POINTS = 10_000  # a larger grid is refused unless study.max_grid_points says so
CHECK_EACH_POINT_UP_TO = 2_000  # larger grids: each value of each axis checked, combinations as they run
RANGE_KEYS = ("low", "high", "log", "step", "type")
POINTS_KEY, SEEDS_KEY = "points", "seeds"
SEED_PARAM = "train.seed"
# a killed trial continues from its last epoch; each trial records what it used of the machine
STUDY_DEFAULTS = {"train.checkpoint_every": 1, "tracking.system_metrics_every": 5.0}

DEFAULT_OBJECTIVE = names.VAL_LOSS


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str = "minimize"

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


@dataclass(frozen=True)
class Choices:
    """A list of values: a grid axis, or a categorical for Optuna."""
    values: tuple


@dataclass(frozen=True)
class Range:
    """A numeric range for Optuna's suggest_int / suggest_float."""
    low: float
    high: float
    type: str = "float"  # "int" or "float"
    log: bool = False
    step: float | None = None

    def grid_values(self) -> list[int]:
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))


@dataclass
class StudySpec:
    name: str
    sampler: str
    sampler_options: dict
    pruner: str
    pruner_options: dict
    objectives: list[Objective]
    n_trials: int | None
    timeout: float | None
    batch_trials: str | int  # "auto", "off" or a cap; how trials run, not what they are
    max_grid_points: int
    base: dict  # the `base` mapping as written (plus overrides); configs are built from it
    space: dict[str, Choices | Range]
    points: list[dict[str, Any]]
    seeds: list[int]
    document: dict = field(repr=False)  # the whole file after overrides (logged as study.yaml)

    @property
    def is_grid(self) -> bool:
        return self.sampler == "grid"

    @property
    def batches_trials(self) -> bool:
        """Do its trials train in batches? Not with `off`; `auto` leaves pruned studies unbatched:
        a pruner compares a trial with trials that finished before it, and trials trained side by
        side never have any."""
        return self.batch_trials != "off" and not (self.batch_trials == "auto" and self.pruner != "none")

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    def swept_keys(self) -> list[str]:
        """Dotted config keys that vary across trials (train.seed when seeds replicate)."""
        keys = list(self.space)
        for point in self.points:
            keys.extend(key for key in point if key not in keys)
        if self.seeds:
            keys.append(SEED_PARAM)
        return keys

    def base_config(self) -> Config:
        return build_config(self.base)

    def trial_config(self, assignment: dict[str, Any], extra: list[str] | None = None) -> Config:
        """The base config with one trial's assignment (dotted keys) applied, validated.
        Trials checkpoint every epoch unless the file says otherwise (STUDY_DEFAULTS)."""
        given = flatten(self.base)
        defaults = {key: value for key, value in STUDY_DEFAULTS.items() if key not in given}
        config = apply_mapping(build_config(self.base), {**defaults, **assignment})
        if extra:
            apply_mapping(config, dict(parse_override(text) for text in extra))
        validate(config)
        check_components(config)
        return config

    def grid_axes(self) -> dict[str, tuple]:
        return {key: (spec.values if isinstance(spec, Choices) else tuple(spec.grid_values()))
                for key, spec in self.space.items()}

    def grid_size(self) -> int:
        """How many grid points there are, without listing them."""
        size = max(len(self.points), 1) * math.prod(len(values) for values in self.grid_axes().values())
        size *= max(len(self.seeds), 1)
        return size if self.n_trials is None else min(size, self.n_trials)

    def iter_grid_points(self) -> Iterator[dict[str, Any]]:
        """Every grid assignment, one at a time: points x product of the listed axes, each
        replicated per seed (the first study.n_trials of them, when given)."""
        axes = self.grid_axes()
        assignments = ({**point, **dict(zip(axes, values))} for point in (self.points or [{}])
                       for values in itertools.product(*axes.values()))
        if self.seeds:
            assignments = ({**assignment, SEED_PARAM: seed} for assignment in assignments for seed in self.seeds)
        for assignment in itertools.islice(assignments, self.n_trials):
            yield {key: list(value) if isinstance(value, tuple) else value for key, value in assignment.items()}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid assignment (`iter_grid_points`), listed."""
        return list(self.iter_grid_points())

    def fingerprint(self) -> dict:
        """What must stay the same for a stored study to be resumed with this file."""
        base = {key: value for key, value in self.base_config().flat().items()
                if not key.startswith("tracking.") and key not in ("train.progress", "train.checkpoint_every", "device", "threads")}
        return {
            "sampler": self.sampler,
            "objectives": [str(objective) for objective in self.objectives],
            "search_space": {key: _jsonable(spec) for key, spec in self.space.items()},
            "points": self.points,
            "seeds": self.seeds,
            "base": base,
        }

    def to_yaml(self) -> str:
        """The study file as run (after overrides), as it is recorded: any password in a URI masked."""
        return redact(yaml.safe_dump(self.document, sort_keys=False))


def point_key(assignment: dict[str, Any]) -> str:
    """A stable text key of one grid assignment (used to claim it in the Optuna storage)."""
    text = json.dumps(assignment, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def value_label(key: str, value: Any) -> str:
    """One swept value as a run list shows it: conv_vae, seed 0, latent_dim 8, kl_weight 0.5, prior mog."""
    if key == "model.name":
        return short_name(str(value))
    if key == SEED_PARAM:
        return f"seed {value}"
    section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if leaf == "name":  # a component other than the model: named by its section
        return f"{section.rsplit('.', 1)[-1]} {short_name(str(value))}"
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{leaf} {shown}"


def point_label(values: dict[str, Any]) -> str:
    """A trial's swept values, as its child run is named: `conv_vae · seed 0`."""
    return " · ".join(value_label(key, value) for key, value in values.items())


def configuration_label(values: dict[str, Any]) -> str:
    """Every swept value but the seed: what seed replicates share (the UI groups runs by it)."""
    return point_label({key: value for key, value in values.items() if key != SEED_PARAM}) or "the base config"


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Names of the parts of a fingerprint that differ (base keys are named one by one)."""
    changed = [part for part in ("sampler", "objectives", "search_space", "points", "seeds")
               if json.dumps(old.get(part), sort_keys=True, default=str)
               != json.dumps(new.get(part), sort_keys=True, default=str)]
    old_base, new_base = old.get("base", {}), new.get("base", {})
    changed += [f"base.{key}" for key in sorted(set(old_base) | set(new_base))
                if json.dumps(old_base.get(key), default=str) != json.dumps(new_base.get(key), default=str)]
    return changed


def _jsonable(spec: Choices | Range) -> Any:
    if isinstance(spec, Choices):
        return list(spec.values)
    return {"low": spec.low, "high": spec.high, "type": spec.type, "log": spec.log, "step": spec.step}


# ----------------------------------------------------------------------------- parsing

def _set_dotted(mapping: dict, key: str, value: Any) -> None:
    """study.n_trials=40 -> mapping['study']['n_trials']; base.train.epochs=2 ->
    mapping['base']['train']['epochs']; search_space.* keeps the rest of the key dotted
    (a config key)."""
    section, _, rest = key.partition(".")
    if section not in SECTIONS or not rest:
        raise ConfigError(f"override {key!r} must start with one of: "
                          + ", ".join(f"{name}." for name in SECTIONS))
    target = mapping.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"section {section!r} must be a mapping")
    if section == "base":  # nest, so the logged study.yaml shows one value per key
        *parents, rest = rest.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {parent!r} is a value, not a section")
    target[rest] = value


def _batch_trials(value: Any) -> str | int:
    if value is False or value == "off":
        return "off"
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"study.batch_trials={value!r} is not allowed; choose auto, off or a positive integer")


def load_study_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """The study file at `path` with `overrides`; a component's file named in the study file is
    relative to it, one named in an override relative to the working folder."""
    document = anchor_study_references(load_yaml_mapping(path), Path(path).parent)
    for text in overrides or []:
        _set_dotted(document, *parse_override(text))
    return parse_study(anchor_study_references(document, Path.cwd()), default_name=Path(path).stem)


def anchor_study_references(document: dict, base_dir: Path) -> dict:
    """The document with every component file it names (in base, search_space and its points)
    made absolute against `base_dir` (`vae_lab.config.anchor_references`)."""
    anchored = dict(document)
    if isinstance(document.get("base"), dict):
        anchored["base"] = anchor_references(document["base"], base_dir)
    space = document.get("search_space")
    if isinstance(space, dict):
        space = anchor_references(space, base_dir)
        if isinstance(space.get(POINTS_KEY), list):
            space[POINTS_KEY] = [anchor_references(point, base_dir) if isinstance(point, dict) else point
                                 for point in space[POINTS_KEY]]
        anchored["search_space"] = space
    return anchored


def parse_study(document: dict, default_name: str = "study") -> StudySpec:
    document = copy.deepcopy(document)
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in the study file; allowed: {', '.join(SECTIONS)}")
    study = _mapping(document.get("study") or {}, "study")
    base = _mapping(document.get("base") or {}, "base")
    space_doc = _mapping(document.get("search_space") or {}, "search_space")
    for key in study:
        if key not in STUDY_KEYS:
            raise ConfigError(f"unknown key 'study.{key}'; allowed: {', '.join(STUDY_KEYS)}")

    base_config = build_config(base)  # an unknown key or bad value in base fails here
    if base_config.tracking.enabled is False:
        raise ConfigError("base.tracking.enabled=false: a study records every trial in MLflow; remove it")
    if base_config.data.val_size == 0:
        raise ConfigError("base.data.val_size=0: a study selects trials on a validation split; "
                          "give data.val_size a fraction in (0, 1) or a count (default 0.1)")

    name = str(study.get("name") or default_name)
    sampler, sampler_options = _named_option(study.get("sampler", "tpe"), "study.sampler", SAMPLERS)
    pruner, pruner_options = _named_option(study.get("pruner", "none"), "study.pruner", PRUNERS)
    objectives = _objectives(study.get("objectives", [DEFAULT_OBJECTIVE]))
    n_trials = _positive_number(study.get("n_trials"), "study.n_trials", int)
    timeout = _positive_number(study.get("timeout"), "study.timeout", float)
    batch_trials = _batch_trials(study.get("batch_trials", "auto"))
    max_grid_points = _positive_number(study.get("max_grid_points", MAX_GRID_POINTS), "study.max_grid_points", int)

    space, points, seeds = _search_space(space_doc, sampler)
    if not space and not points and not seeds:
        raise ConfigError("search_space is empty: give at least one key with a list of values "
                          "(e.g. model.latent_dim: [2, 8]), points: or seeds:")
    if sampler != "grid" and n_trials is None:
        raise ConfigError(f"study.n_trials is required with sampler {sampler} (only a grid knows its size)")
    if sampler != "grid" and seeds:
        raise ConfigError(f"search_space.seeds replicates grid points; with sampler {sampler} "
                          "put train.seed in search_space instead (e.g. train.seed: [0, 1, 2])")
    if pruner != "none" and len(objectives) > 1:
        raise ConfigError(f"study.pruner={pruner} needs a single objective (Optuna cannot prune "
                          "multi-objective studies); use pruner: none")
    _check_sampler_options(sampler, sampler_options)
    _check_pruner_options(pruner, pruner_options)

    spec = StudySpec(name=name, sampler=sampler, sampler_options=sampler_options, pruner=pruner,
                     pruner_options=pruner_options, objectives=objectives, n_trials=n_trials,
                     timeout=timeout, batch_trials=batch_trials, max_grid_points=max_grid_points, base=base,
                     space=space, points=points, seeds=seeds, document=document)
    if spec.is_grid and spec.grid_size() > max_grid_points:
        raise ConfigError(f"the grid has {spec.grid_size():,} points, more than study.max_grid_points="
                          f"{max_grid_points:,}; narrow search_space, or set study.max_grid_points to run it all")
    _check_trial_configs(spec)
    return spec


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def _positive_number(value: Any, key: str, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def _named_option(value: Any, key: str, allowed: tuple[str, ...]) -> tuple[str, dict]:
    """`tpe` or `{name: tpe, seed: 0, ...}` -> ('tpe', {'seed': 0, ...})."""
    options: dict = {}
    if isinstance(value, dict):
        options = dict(value)
        value = options.pop("name", None)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value, options


def _objectives(value: Any) -> list[Objective]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError("study.objectives must be a list such as [{metric: val/recon, direction: minimize}]")
    objectives = []
    for item in value:
        if isinstance(item, str):
            metric, _, direction = item.partition(":")
            item = {"metric": metric, "direction": direction or "minimize"}
        if not isinstance(item, dict) or set(item) - {"metric", "direction"}:
            raise ConfigError(f"study.objectives: each entry is {{metric, direction}}, got {item!r}")
        metric, direction = item.get("metric"), item.get("direction", "minimize")
        if isinstance(metric, str) and metric.startswith(names.HELD_OUT_PREFIXES):
            instead = f"{names.VAL}/{metric.split('/', 1)[1]}"
            suggestion = f"use {instead}" if instead in names.KNOWN_METRICS else "use a val/* metric such as val/loss"
            raise ConfigError(f"study.objectives: {metric} is scored on the test split, which reports and never "
                              f"selects (choosing on it biases the reported number); {suggestion}")
        if metric not in names.KNOWN_METRICS:
            raise ConfigError(f"study.objectives: unknown metric {metric!r}; choose from: {', '.join(names.KNOWN_METRICS)}")
        if direction not in DIRECTIONS:
            raise ConfigError(f"study.objectives: direction of {metric} must be minimize or maximize, got {direction!r}")
        objectives.append(Objective(metric, direction))
    if len({objective.metric for objective in objectives}) < len(objectives):
        raise ConfigError("study.objectives names the same metric twice")
    return objectives


def _search_space(document: dict, sampler: str) -> tuple[dict, list, list]:
    config_keys = set(allowed_keys())
    space: dict[str, Choices | Range] = {}
    points: list[dict] = []
    seeds: list[int] = []
    for key, value in document.items():
        key = str(key)
        if key == POINTS_KEY:
            points = _points(value)
        elif key == SEEDS_KEY:
            if not isinstance(value, list) or not value or not all(
                    isinstance(seed, int) and not isinstance(seed, bool) for seed in value):
                raise ConfigError(f"search_space.seeds must be a non-empty list of integers, got {value!r}")
            if len(set(value)) < len(value):
                raise ConfigError(f"search_space.seeds lists a seed twice: {value}")
            seeds = list(value)
        elif not is_config_key(key):
            raise ConfigError(f"unknown key 'search_space.{key}'; allowed: points, seeds, or a config key "
                              f"such as model.latent_dim or model.options.<name> (all: "
                              f"{', '.join(sorted(config_keys))})")
        else:
            space[key] = _param_spec(key, value, sampler)
    for point in points:
        for key in point:
            if key in space:
                raise ConfigError(f"search_space: {key} is both a search_space key and set in points:")
    if seeds and (SEED_PARAM in space or any(SEED_PARAM in point for point in points)):
        raise ConfigError("search_space: train.seed is swept and seeds: is given; use one of them")
    return space, points, seeds


def _points(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ConfigError("search_space.points must be a non-empty list of assignments, "
                          "e.g. [{model.hidden_dims: [32], model.latent_dim: 4}, ...]")
    points = []
    for index, point in enumerate(value):
        if not isinstance(point, dict) or not point:
            raise ConfigError(f"search_space.points[{index}] must be a mapping of config keys to values, got {point!r}")
        for key in point:
            if not is_config_key(str(key)):
                raise ConfigError(f"unknown key {key!r} in search_space.points[{index}]; "
                                  f"allowed: {', '.join(sorted(allowed_keys()))}, or a component's "
                                  "model.options.<name>")
        points.append({str(key): item for key, item in point.items()})
    if len({json.dumps(point, sort_keys=True) for point in points}) < len(points):
        raise ConfigError("search_space.points lists the same point twice")
    return points


def _param_spec(key: str, value: Any, sampler: str) -> Choices | Range:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"search_space.{key} is an empty list; give at least one value")
        if len({json.dumps(item, sort_keys=True) for item in value}) < len(value):
            raise ConfigError(f"search_space.{key} lists a value twice: {value}")
        return Choices(tuple(tuple(item) if isinstance(item, list) else item for item in value))
    if not isinstance(value, dict):
        raise ConfigError(f"search_space.{key} must be a list of values or {{low, high, log, step, type}}, "
                          f"got {value!r}")
    extra = set(value) - set(RANGE_KEYS)
    if extra or "low" not in value or "high" not in value:
        raise ConfigError(f"search_space.{key}: a range takes low and high (and optional log, step, type); "
                          f"got keys {sorted(value)}")
    low, high = value["low"], value["high"]
    if not all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in (low, high)):
        raise ConfigError(f"search_space.{key}: low and high must be numbers, got {low!r} and {high!r}")
    if not all(math.isfinite(bound) for bound in (low, high)):
        raise ConfigError(f"search_space.{key}: low and high must be finite numbers, got {low!r} and {high!r}")
    step, log = value.get("step"), value.get("log", False)
    kind = value.get("type") or ("int" if all(isinstance(x, int) for x in (low, high))
                                 and (step is None or isinstance(step, int)) else "float")
    if kind not in ("int", "float"):
        raise ConfigError(f"search_space.{key}.type must be int or float, got {kind!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"search_space.{key}.log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"search_space.{key}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"search_space.{key}: a log range needs low > 0, got {low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf):
        raise ConfigError(f"search_space.{key}.step must be a positive number, got {step!r}")
    if log and step is not None:
        raise ConfigError(f"search_space.{key}: log and step cannot be combined")
    if kind == "int" and not all(float(x).is_integer() for x in (low, high, step or 1)):
        raise ConfigError(f"search_space.{key}: an int range needs integer low, high and step")
    spec = Range(low=low, high=high, type=kind, log=log, step=step)
    if sampler == "grid" and (kind == "float" or log):
        raise ConfigError(f"search_space.{key}: a continuous range cannot be a grid; list the values "
                          f"(e.g. [{low}, {high}]) or use sampler tpe, random or nsga2")
    return spec


def _check_trial_configs(spec: StudySpec) -> None:
    """Every trial config must be valid and log every objective metric: each grid point of a
    grid up to CHECK_EACH_POINT_UP_TO points; otherwise each listed value once (every other key
    as in base), range ends, and each point: a larger grid's combinations are checked as they run."""
    if spec.is_grid and spec.grid_size() <= CHECK_EACH_POINT_UP_TO:
        candidates = spec.grid_points()
    else:
        candidates = [{}] + [dict(point) for point in spec.points]
        for key, param in spec.space.items():
            values = param.values if isinstance(param, Choices) else (param.low, param.high)
            candidates += [{key: int(v) if isinstance(param, Range) and param.type == "int" else v}
                           for v in values]
    for assignment in candidates:
        assignment = {key: list(value) if isinstance(value, tuple) else value
                      for key, value in assignment.items()}
        try:
            config = spec.trial_config(assignment)
        except ConfigError as error:
            where = ", ".join(f"{key}={value}" for key, value in assignment.items()) or "base"
            raise ConfigError(f"search_space ({where}): {error}") from None
        missing = [str(o.metric) for o in spec.objectives
                   if o.metric not in names.metrics_logged(config, is_variational(config))]
        if missing:
            raise ConfigError(
                f"objective {missing[0]} is not logged by model.name={config.model.name} "
                f"(data.val_size={config.data.val_size:g}); val/kl needs a VAE, val/elbo a VAE with a "
                "normalized likelihood (binarized pixels or loss.likelihood=gaussian), val/* a validation split")


def _check_sampler_options(sampler: str, options: dict) -> None:
    import optuna

    if sampler == "grid":
        if options:
            raise ConfigError(f"study.sampler grid takes no options, got {sorted(options)}")
        return
    sampler_class = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                     "nsga2": optuna.samplers.NSGAIISampler}[sampler]
    _check_options(sampler_class, options, f"study.sampler ({sampler})")


def _check_pruner_options(pruner: str, options: dict) -> None:
    import optuna

    if pruner == "none":
        if options:
            raise ConfigError(f"study.pruner none takes no options, got {sorted(options)}")
        return
    pruner_class = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}[pruner]
    _check_options(pruner_class, options, f"study.pruner ({pruner})")


SIMPLE_OPTION_TYPES = (int, float, str, bool, type(None))


def _check_options(target: type, options: dict, where: str) -> None:
    parameters = inspect.signature(target.__init__).parameters
    allowed = [name for name, parameter in parameters.items() if name != "self"
               and (parameter.default is None or isinstance(parameter.default, SIMPLE_OPTION_TYPES))]
    for key, value in options.items():
        if key not in allowed or not isinstance(value, SIMPLE_OPTION_TYPES):
            raise ConfigError(f"{where}: unknown or unsupported option {key!r}; allowed: {', '.join(allowed)}")
