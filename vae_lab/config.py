"""Typed run configuration: defaults, YAML loading, dotted overrides, validation.

A run is described by one `Config`. It is built from defaults, then a YAML file,
then `section.key=value` overrides, and validated before anything runs: a bad key
or value raises `ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class _NumberSafeLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_NumberSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789.")
)


MAX_YAML_DEPTH = 32  # configs and study files nest 4 levels; far deeper is a mistake or an attack


def parse_yaml(text: str) -> Any:
    """Parse YAML safely, reading scientific notation such as 1e-4 as numbers; ConfigError for
    a document nested deeper than MAX_YAML_DEPTH (PyYAML would recurse until Python gives up)."""
    depth = deepest = 0
    for event in yaml.parse(text, Loader=_NumberSafeLoader):  # events: no recursion, no objects built
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_YAML_DEPTH:
                raise ConfigError(f"the YAML nests more than {MAX_YAML_DEPTH} levels deep (allowed: "
                                  f"{MAX_YAML_DEPTH}; a config nests 4)")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.load(text, Loader=_NumberSafeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_mapping(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        content = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first_line})") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(content).__name__}"
        )
    return content


# ----------------------------------------------------------------------------- sections

# Keys that name a component (`vae_lab.components`): a registered name, package.module:Class, or
# path/to/file.py:Class, a relative path being relative to the file that names it (`anchor_references`).
COMPONENT_KEYS = ("model.name", "prior.name", "loss.objective", "data.name")
OPTIONS_KEYS = ("model.options", "prior.options", "loss.options", "data.options")
PATH_KEYS = ("data.path",)  # made absolute where they are read: relative to the file that names them, or the working folder  # a component's own constructor arguments


@dataclass
class DataConfig:
    """The dataset (`vae_lab.data.sources`: mnist5k, digits, mnist, fashion-mnist, kmnist, cifar10,
    svhn, celeba, folder, arrays, or your own function) and how its images are prepared."""
    name: str = "mnist5k"
    path: str = ""  # the folder or file of folder/arrays (and of cifar10/svhn/celeba when not under root)
    root: str = ""  # "" = ~/.cache/vae_lab
    resize: int = 0  # 0 keeps the native size
    channels: int = 0  # 0 as the images are; 1 makes colour grey; 3 repeats a grey channel
    binarize: str = "none"
    download: bool = True
    train_limit: int = 0  # keep only the first N training images; 0 = all
    test_limit: int = 0  # likewise for the test split
    val_size: float = 0.1  # validation images carved from train: a fraction in (0, 1) or a count; 0 = none

    options: dict[str, Any] = field(default_factory=dict)  # your own dataset function's arguments

    choices = {"binarize": ("none", "dynamic", "static"), "channels": (0, 1, 3)}


@dataclass
class ModelConfig:
    """The model family (`vae_lab.models.components`: ae, linear_vae, conv_ae, conv_vae, or your
    own class) and its constructor's arguments: the keys below that its signature names, and
    `options` for the rest."""
    name: str = "linear_vae"
    latent_dim: int = 20
    hidden_dims: list[int] = field(default_factory=lambda: [400])  # MLP models
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # conv models
    latent_layout: str = "vector"  # conv models: "cube" keeps a C x H x W latent
    activation: str = "relu"  # MLP hidden layers: relu, or gated (h = (W x + b) * sigmoid(V x + c))
    options: dict[str, Any] = field(default_factory=dict)  # a family's own arguments, e.g. model.options.blocks=2

    choices = {"latent_layout": ("vector", "cube"), "activation": ("relu", "gated")}


@dataclass
class PriorConfig:
    """p(z) of a VAE (`vae_lab.models.priors`)."""
    name: str = "standard_normal"  # standard_normal | mog (K learned Gaussians) | vampprior (K pseudo-inputs)
    components: int = 0  # K; 0 = the prior's default (mog 10, vampprior 500)
    # vampprior: pseudo-inputs start as hardtanh_[0,1](N(init_mean, init_std)): 0.05 and 0.01, what the
    # reference code's data loaders set (its command-line default of -0.05 would start every pseudo-input
    # at 0, where hardtanh passes no gradient)
    init_mean: float = 0.05
    init_std: float = 0.01
    options: dict[str, Any] = field(default_factory=dict)  # a prior's own arguments


DEFAULT_GAUSSIAN_STD = 1 / math.sqrt(2)  # keeps the summed squared error as the data term


@dataclass
class LossConfig:
    likelihood: str = "bernoulli"
    objective: str = "elbo"  # elbo | iwae (Burda et al. 2016: the bound of iwae_samples importance samples) | yours
    iwae_samples: int = 1  # k of the iwae objective; k = 1 is the ELBO with a one-sample KL
    kl_weight: float = 1.0  # β: the KL's weight once the schedule has ramped up
    kl_schedule: str = "constant"  # constant | linear (over kl_warmup_steps) | cyclical (kl_cycles, kl_cycle_ratio)
    kl_warmup_steps: int = 0  # linear: steps from β=0 to kl_weight (a config that sets only this is linear)
    kl_cycles: int = 4  # cyclical: ramps over the whole training run (Fu et al. 2019)
    kl_cycle_ratio: float = 0.5  # cyclical: the part of each cycle spent ramping up, then β=kl_weight
    free_bits: float = 0.0  # nats per latent dimension below which its KL is not pushed down (Kingma et al. 2016)
    tc_weight: float = 1.0  # β-TCVAE (Chen et al. 2018): the total correlation's weight; 1 = the plain ELBO
    gaussian_std: float = DEFAULT_GAUSSIAN_STD  # sigma of the gaussian likelihood
    options: dict[str, Any] = field(default_factory=dict)  # your objective's own arguments

    choices = {"likelihood": ("bernoulli", "gaussian"), "kl_schedule": ("constant", "linear", "cyclical")}


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    amp: bool = False  # bf16 autocast
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    early_stopping_patience: int = 0  # stop after this many epochs without a better val/loss; 0 = off
    checkpoint_every: int = 0  # save the whole training state every N epochs (and at the last); 0 = off
    progress: bool = True


@dataclass
class EvalConfig:
    enabled: bool = True
    iwae_samples: int = 100  # 5000 to compare with the literature
    iwae_points: int = 1000  # test images the IWAE estimate uses
    max_points: int = 10000  # cap on train/test points for probes, PCA and latents
    fd_samples: int = 1000  # prior samples (and at most as many test images) of eval/fd_* and precision/recall


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else an SQLite file in mlruns/
    experiment: str = "vae_lab"
    run_name: str = ""
    log_every_steps: int = 50
    log_model: bool = True
    log_images: bool = True
    # CPU, memory, disk, network (and GPU) as system/* metrics, sampled every this many seconds by
    # MLflow's system-metrics monitor; 0 = off (studies turn it on)
    system_metrics_every: float = 0.0
    # a frame of latents/evolution.gif (test images' posterior means) every this many steps; 0 = none
    latent_frames_every: int = 10


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    device: str = "auto"
    # torch's CPU threads in each process; 0 = its share of the CPUs it may use (the affinity mask or
    # SLURM_CPUS_PER_TASK, divided among this machine's --workers), unless OMP_NUM_THREADS says
    threads: int = 0

    choices = {"device": ("auto", "cpu", "cuda")}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. {'model.latent_dim': 20, ...}."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def likelihood_is_normalized(self) -> bool:
        """Is the reconstruction term a log-likelihood (so that recon + KL is an ELBO)? Gaussian
        (with its constant) always; Bernoulli only on binary pixels."""
        return self.loss.likelihood == "gaussian" or self.data.binarize != "none"


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


# ----------------------------------------------------------------------------- building

def _section_fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def allowed_keys() -> list[str]:
    """Every dotted key a config accepts, besides a component's options (`is_config_key`)."""
    return list(Config().flat().keys())


def is_config_key(key: str) -> bool:
    """Is `key` a dotted key a config accepts (`allowed_keys`, or `model.options.<name>` and the like)?"""
    return key in allowed_keys() or any(
        key.startswith(prefix + ".") and len(key) > len(prefix) + 1 for prefix in OPTIONS_KEYS)


# ----------------------------------------------------------------------------- component references

_FILE_REFERENCE = re.compile(r"^(?P<path>.+\.py):(?P<attribute>[A-Za-z_][A-Za-z0-9_.]*)$")


def file_reference(name: str) -> tuple[Path, str] | None:
    """(path, attribute) of a `path/to/file.py:Class` reference, else None."""
    match = _FILE_REFERENCE.match(name) if isinstance(name, str) else None
    return (Path(match["path"]).expanduser(), match["attribute"]) if match else None


def anchor_file_reference(name: Any, base_dir: str | Path) -> Any:
    """A `file.py:Class` reference with a relative path, made absolute against `base_dir`;
    anything else unchanged."""
    found = file_reference(name)
    if found is None or found[0].is_absolute():
        return name
    return f"{(Path(base_dir) / found[0]).resolve()}:{found[1]}"


def anchor_path(value: Any, base_dir: str | Path) -> Any:
    """A non-empty relative path, made absolute against `base_dir`; anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    return str((Path(base_dir) / Path(value).expanduser()).resolve())


def anchor_references(mapping: dict, base_dir: str | Path) -> dict:
    """`mapping` (nested sections or dotted keys) with its component file references anchored at
    `base_dir`, the folder of the config or study file it came from."""
    anchored = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and f"{key}.name" in COMPONENT_KEYS:
            value = {**value, "name": anchor_file_reference(value.get("name"), base_dir)} if "name" in value else value
            value = {name: anchor_path(item, base_dir) if f"{key}.{name}" in PATH_KEYS else item
                     for name, item in value.items()}
        elif key in PATH_KEYS:
            value = [anchor_path(item, base_dir) for item in value] if isinstance(value, list) else anchor_path(value, base_dir)
        elif key in COMPONENT_KEYS:
            value = ([anchor_file_reference(item, base_dir) for item in value] if isinstance(value, list)
                     else anchor_file_reference(value, base_dir))
        anchored[key] = value
    return anchored


def _coerce(value: Any, expected: Any, key: str) -> Any:
    """Check `value` against the annotated type; return it converted (int -> float)."""
    origin = typing.get_origin(expected)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of names to values, got {value!r}")
        return {str(name): item for name, item in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # hidden_dims=400 means [400]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(item, item_type, key) for item in value]
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {expected!r} for {key}")


def _set(target, key_path: list[str], value: Any, full_key: str) -> None:
    name = key_path[0]
    fields = _section_fields(target)
    if name not in fields:
        where = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
        raise ConfigError(
            f"unknown key {full_key!r}; allowed in {where}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(type(target))
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        if len(key_path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{full_key} must be a mapping of keys, got {value!r}")
            for sub_key, sub_value in value.items():
                _set(current, [str(sub_key)], sub_value, f"{full_key}.{sub_key}")
            return
        _set(current, key_path[1:], value, full_key)
        return
    if len(key_path) > 1:
        if typing.get_origin(hints[name]) is not dict:
            raise ConfigError(f"unknown key {full_key!r}: {name!r} is a value, not a section")
        mapping = current
        for part in key_path[1:-1]:  # model.options.a.b=1 sets options["a"]["b"]
            if not isinstance(mapping.setdefault(part, {}), dict):
                raise ConfigError(f"{full_key}: {part!r} already holds a value, not a mapping")
            mapping = mapping[part]
        mapping[key_path[-1]] = value
        return
    value = _coerce(value, hints[name], full_key)
    allowed = getattr(target, "choices", {}).get(name)
    if allowed is not None and value not in allowed:
        raise ConfigError(
            f"{full_key}={value!r} is not allowed; choose one of: "
            + ", ".join(str(choice) for choice in allowed)
        )
    setattr(target, name, value)


def apply_mapping(config: Config, mapping: dict, prefix: str = "") -> Config:
    for key, value in mapping.items():
        full_key = f"{prefix}{key}"
        _set(config, full_key.split("."), value, full_key)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """'model.latent_dim=16' -> ('model.latent_dim', 16); values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` texts; a component file named here is relative to the working folder."""
    for text in overrides:
        key, value = parse_override(text)
        if key in COMPONENT_KEYS:
            value = anchor_file_reference(value, Path.cwd())
        elif key in PATH_KEYS:
            value = anchor_path(value, Path.cwd())
        _set(config, key.split("."), value, key)
    return config


def validate(config: Config) -> Config:
    """Cross-field and range checks that a type alone does not express."""
    positive = {
        "model.latent_dim": config.model.latent_dim,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.lr": config.train.lr,
        "tracking.log_every_steps": config.tracking.log_every_steps,
        "eval.iwae_samples": config.eval.iwae_samples,
        "eval.iwae_points": config.eval.iwae_points,
        "eval.max_points": config.eval.max_points,
        "eval.fd_samples": config.eval.fd_samples,
        "loss.gaussian_std": config.loss.gaussian_std,
    }
    for key, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, sizes in (("model.hidden_dims", config.model.hidden_dims),
                       ("model.conv_channels", config.model.conv_channels)):
        if any(size <= 0 for size in sizes):
            raise ConfigError(f"{key} must hold positive sizes, got {sizes}")
    if not config.model.conv_channels:
        raise ConfigError("model.conv_channels must hold at least one layer width")
    non_negative = {
        "loss.kl_weight": config.loss.kl_weight,
        "loss.kl_warmup_steps": config.loss.kl_warmup_steps,
        "loss.free_bits": config.loss.free_bits,
        "loss.tc_weight": config.loss.tc_weight,
        "train.grad_clip": config.train.grad_clip,
        "data.resize": config.data.resize,
        "data.train_limit": config.data.train_limit,
        "data.test_limit": config.data.test_limit,
        "train.checkpoint_every": config.train.checkpoint_every,
        "tracking.system_metrics_every": config.tracking.system_metrics_every,
        "tracking.latent_frames_every": config.tracking.latent_frames_every,
        "threads": config.threads,
    }
    for key, value in non_negative.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be zero or positive, got {value}")
    _check_kl_schedule(config)
    val_size = config.data.val_size
    if not (val_size == 0 or 0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())):
        raise ConfigError(f"data.val_size must be a fraction in (0, 1), a whole count of images, "
                          f"or 0 for no validation split; got {val_size:g}")
    patience = config.train.early_stopping_patience
    if patience < 0:
        raise ConfigError(f"train.early_stopping_patience must be 0 (off) or a number of epochs, got {patience}")
    if patience > 0 and val_size == 0:
        raise ConfigError(f"train.early_stopping_patience={patience} watches val/loss, but data.val_size=0 "
                          "leaves no validation split; set data.val_size (e.g. 0.1) or the patience to 0")
    if config.data.resize and config.data.resize < 8:
        raise ConfigError(f"data.resize must be 0 (native size) or at least 8, got {config.data.resize}")
    return config


def _check_kl_schedule(config: Config) -> None:
    """The schedule's and the objective's own keys (what needs a VAE or a prior with a closed-form KL
    is `vae_lab.models.components.check`'s business). A config from before
    `loss.kl_schedule` that sets `loss.kl_warmup_steps` is read as the linear schedule it meant."""
    loss = config.loss
    if loss.kl_schedule == "constant" and loss.kl_warmup_steps > 0:
        loss.kl_schedule = "linear"
    if loss.kl_schedule == "linear" and loss.kl_warmup_steps < 1:
        raise ConfigError("loss.kl_schedule=linear ramps β over loss.kl_warmup_steps: give it 1 or more steps")
    if loss.kl_schedule == "cyclical":
        if loss.kl_cycles < 1:
            raise ConfigError(f"loss.kl_schedule=cyclical needs loss.kl_cycles of 1 or more, got {loss.kl_cycles}")
        if not 0 < loss.kl_cycle_ratio <= 1:
            raise ConfigError(f"loss.kl_cycle_ratio is the part of each cycle spent ramping up: in (0, 1], "
                              f"got {loss.kl_cycle_ratio}")
    if loss.iwae_samples < 1:
        raise ConfigError(f"loss.iwae_samples must be 1 or more, got {loss.iwae_samples}")
    prior = config.prior
    if prior.components < 0:
        raise ConfigError(f"prior.components must be 1 or more (0 = the prior's default), got {prior.components}")
    if not (math.isfinite(prior.init_mean) and math.isfinite(prior.init_std) and prior.init_std >= 0):
        raise ConfigError("prior.init_mean must be a finite number and prior.init_std a finite number >= 0")


def build_config(
    mapping: dict | None = None, overrides: list[str] | None = None
) -> Config:
    config = Config()
    if mapping:
        apply_mapping(config, mapping)
    if overrides:
        apply_overrides(config, overrides)
    return validate(config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides; validated."""
    mapping = anchor_references(load_yaml_mapping(path), Path(path).parent) if path else {}
    return build_config(mapping, overrides)


def config_from_flat(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from dotted keys (as stored in a run's config.yaml or params)."""
    config = Config()
    for key, value in flat.items():
        _set(config, key.split("."), value, key)
    return validate(config)
