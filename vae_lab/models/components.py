"""A config's model family, prior and objective: found (`vae_lab.models.registry`), checked, built.

    check(config)                       # ConfigError (one line) for anything a run would trip on
    model = build_model(config.model, image_shape, config.prior)
    objective = build_objective(config.loss)

A family is constructed with keyword arguments: `image_shape` (C, H, W) and `latent_dim`,
each other `model.*` key its constructor names (hidden_dims, conv_channels, latent_layout,
activation), and `model.options`. A prior likewise, from `latent_dim`, `image_shape`, the
`prior.*` keys it names (components, init_mean, init_std) and `prior.options`; an objective
from the `loss.*` keys it names (iwae_samples) and `loss.options`. `check` holds
both against the signatures, then builds the model on the meta device (no memory, no
arithmetic) and runs it on two images to see that what comes back has the interface's
shapes, so a mistake in a user's class is one line before anything is created.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from vae_lab.components import check_options, constructor_parameters, short_name
from vae_lab.config import Config, ConfigError, LossConfig, ModelConfig, PriorConfig
from vae_lab.data.datasets import image_shape_of
from vae_lab.models.autoencoders import Autoencoder
from vae_lab.models.objectives import Objective
from vae_lab.models.priors import Prior, StandardNormal
from vae_lab.models.registry import MODEL_FAMILIES, OBJECTIVES, PRIORS

SUPPLIED = ("image_shape", "latent_dim")  # what vae_lab itself gives every family and prior
# model.* keys a study may set once for several families (seed000/default.yaml sweep model.name):
# a family that does not take them ignores them. Any other model.* key at a value other than its
# default is refused by a family that does not take it (model.latent_layout=cube for an MLP).
# prior.* keys (components, init_mean, init_std) are likewise ignored by a prior that does not take
# them: prior.name: [standard_normal, mog] with prior.components: 100 is one study.
SHARED_BY_SOME = ("hidden_dims", "conv_channels")
STANDARD_PRIOR = "standard_normal"


def _component(registry, name: str, base: type, what: str) -> type:
    """The class `name` names in `registry`, which must subclass `base`."""
    component = registry.resolve(name)
    if not (inspect.isclass(component) and issubclass(component, base)):
        raise ConfigError(f"{registry.key}={name!r} is {_what(component)}, not {what}: a subclass of "
                          f"vae_lab.models.{base.__name__} (the README's 'Your own components')")
    return component


def model_family(name: str) -> type[Autoencoder]:
    return _component(MODEL_FAMILIES, name, Autoencoder, "a model family")


def prior_class(name: str) -> type[Prior]:
    return _component(PRIORS, name, Prior, "a prior")


def objective_class(name: str) -> type[Objective]:
    return _component(OBJECTIVES, name, Objective, "an objective")


def build_objective(config: LossConfig) -> Objective:
    objective = objective_class(config.objective)
    return objective(**arguments(config, objective))


def _what(thing) -> str:
    return f"the class {thing.__name__}" if inspect.isclass(thing) else f"a {type(thing).__name__}"


def is_variational(config: Config) -> bool:
    """Has the config's model a posterior with a variance, a prior and a KL?"""
    return bool(model_family(config.model.name).variational)


def arguments(section, component) -> dict:
    """What `component` is built with from its config section (model, prior or loss): the
    section's keys its constructor names (not `name`, `options`, nor the `SUPPLIED` ones), then
    the section's `options`."""
    parameters, _ = constructor_parameters(component)
    named = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
             if f.name not in ("name", "options", *SUPPLIED) and f.name in parameters}
    return {**named, **section.options}


def _refuse_unused(section, component, label: str, prefix: str, exempt: tuple[str, ...]) -> None:
    parameters, takes_any = constructor_parameters(component)
    defaults = type(section)()
    for f in dataclasses.fields(section):
        if (f.name in ("name", "options", *SUPPLIED, *exempt) or f.name in parameters or takes_any
                or getattr(section, f.name) == getattr(defaults, f.name)):
            continue
        raise ConfigError(f"{prefix}.{f.name}={getattr(section, f.name)!r} is not used by {prefix}.name={label}, "
                          f"whose constructor does not take {f.name}")


def build_prior(config: PriorConfig, image_shape: tuple[int, int, int], latent_dim: int) -> Prior:
    prior = prior_class(config.name)
    parameters, takes_any = constructor_parameters(prior)
    supplied = {key: value for key, value in (("image_shape", tuple(image_shape)), ("latent_dim", latent_dim))
                if key in parameters or takes_any}
    return prior(**supplied, **arguments(config, prior))


def build_model(config: ModelConfig, image_shape: tuple[int, int, int],
                prior: PriorConfig | None = None) -> Autoencoder:
    """The model `config` names, with the prior `prior` names (N(0, I) when None). The prior is
    built after the networks, so a standard-normal model's weights are those of earlier vae_labs."""
    family = model_family(config.name)
    model = family(image_shape=tuple(image_shape), latent_dim=config.latent_dim, **arguments(config, family))
    if prior is not None and family.variational:
        model.prior = build_prior(prior, tuple(image_shape), config.latent_dim)
    return model


_PASSED: set[str] = set()  # what `check` has passed in this process (a study checks each grid point)


def _what_check_reads(config: Config) -> str:
    loss = config.loss
    return repr((dataclasses.astuple(config.model), dataclasses.astuple(config.prior), image_shape_of(config.data),
                 loss.objective, loss.iwae_samples, loss.options, loss.free_bits > 0, loss.tc_weight != 1))


def check(config: Config) -> None:
    """Everything about the config's components that a run would otherwise find out late."""
    key = _what_check_reads(config)
    if key not in _PASSED:
        _check(config)
        _PASSED.add(key)


def _check(config: Config) -> None:
    family = model_family(config.model.name)
    label = short_name(config.model.name)
    check_options(family, label, "model", (*SUPPLIED, *arguments(config.model, family).keys()
                                           - config.model.options.keys()), config.model.options)
    _refuse_unused(config.model, family, config.model.name, "model", SHARED_BY_SOME)
    loss, variational = config.loss, bool(family.variational)
    objective = objective_class(loss.objective)
    objective_label = short_name(loss.objective)
    check_options(objective, objective_label, "loss", arguments(loss, objective).keys()
                  - loss.options.keys(), loss.options)
    if loss.iwae_samples != 1 and "iwae_samples" not in constructor_parameters(objective)[0]:
        raise ConfigError(f"loss.iwae_samples={loss.iwae_samples} is for loss.objective=iwae (an objective that takes "
                          f"iwae_samples); the objective is {objective_label}")
    if not objective.shapes_the_elbo and (loss.free_bits > 0 or loss.tc_weight != 1):
        raise ConfigError(f"loss.objective={objective_label} weighs whole samples: it takes neither loss.free_bits nor "
                          "loss.tc_weight (allowed with the elbo objective)")
    if not variational:
        needs_kl = [text for text, applies in (
            (f"prior.name={config.prior.name}", config.prior.name != STANDARD_PRIOR),
            ("loss.free_bits", loss.free_bits > 0), (f"loss.objective={objective_label}", objective.needs_a_kl),
            ("loss.tc_weight", loss.tc_weight != 1)) if applies]
        if needs_kl:
            raise ConfigError(f"{needs_kl[0]} needs a VAE (a family with a prior and a KL): model.name={label} "
                              f"is an autoencoder (an AE has no prior); VAEs registered: {', '.join(_registered_vaes())}")
    else:
        prior = prior_class(config.prior.name)
        check_options(prior, short_name(config.prior.name), "prior",
                      (*SUPPLIED, *arguments(config.prior, prior).keys() - config.prior.options.keys()),
                      config.prior.options)
        if not objective.shapes_the_elbo and prior.analytic_kl and not issubclass(prior, StandardNormal):
            raise ConfigError(f"loss.objective={objective_label} weighs each sample by log q(z|x) - log p(z); prior.name="
                              f"{config.prior.name} gives its KL in closed form (analytic_kl), which the bound cannot "
                              f"use; allowed: {STANDARD_PRIOR} or a prior with analytic_kl = False")
        if loss.free_bits > 0 and not prior.analytic_kl:
            raise ConfigError(f"loss.free_bits clamps the KL of each latent dimension, which a prior has only in closed "
                              f"form (analytic_kl); prior.name={config.prior.name} has none (use {STANDARD_PRIOR})")
    try:
        build_objective(loss)
    except Exception as error:  # the objective's own check of its options
        raise ConfigError(f"loss.objective={objective_label} could not be built ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    _try_a_batch(config.model, config.prior, image_shape_of(config.data))


def _registered_vaes() -> list[str]:
    return [name for name in MODEL_FAMILIES.names()
            if getattr(MODEL_FAMILIES.resolve(name), "variational", False)]


SMALL_MODEL_PARAMETERS = 5_000_000


def probe_device(model_config: ModelConfig, prior_config: PriorConfig, image_shape: tuple[int, ...]) -> str:
    """Where to run a model's few probing images (the interface check, size and cost estimates):
    "cpu" for a model of at most SMALL_MODEL_PARAMETERS (milliseconds of arithmetic; a process's
    first operation on the meta device imports about a second of torch), else "meta" (sizes
    only). Probing on the CPU happens under `torch.random.fork_rng`, leaving the global random
    state as it was."""
    try:
        with torch.device("meta"):
            parameters = sum(parameter.numel() for parameter in
                             build_model(model_config, image_shape, prior_config).parameters())
    except Exception:  # the probe itself will say what is wrong
        return "cpu"
    return "cpu" if parameters <= SMALL_MODEL_PARAMETERS else "meta"


def _try_a_batch(model_config: ModelConfig, prior_config: PriorConfig, image_shape: tuple[int, int, int]) -> None:
    """Build the model and hold what it returns for two images against the interface, where
    `probe_device` says, and on the CPU after all if an operation has no meta kernel."""
    if probe_device(model_config, prior_config, image_shape) == "meta":
        try:
            with torch.device("meta"):
                _exercise(model_config, prior_config, image_shape, on_meta=True)
            return
        except _NoMetaKernel:
            pass
    with torch.random.fork_rng(devices=[]):
        _exercise(model_config, prior_config, image_shape, on_meta=False)


class _NoMetaKernel(Exception):
    pass


def _exercise(model_config: ModelConfig, prior_config: PriorConfig, image_shape: tuple[int, ...],
              on_meta: bool) -> None:
    name, count, latent = model_config.name, 2, model_config.latent_dim
    step = "building it"
    try:
        model = build_model(model_config, image_shape, prior_config)
        step = "encode"
        images = torch.zeros(count, *image_shape)
        posterior = model.encode(images)
        _expect(name, "encode(x).mean", posterior.mean, (count, latent))
        if model.variational:
            if posterior.logvar is None:
                raise ConfigError(f"model.name={name!r} is variational but encode(x).logvar is None")
            _expect(name, "encode(x).logvar", posterior.logvar, (count, latent))
        step = "decode"
        z = model.reparameterize(posterior)
        _expect(name, "decode(z)", model.decode(z), (count, *image_shape))
        if model.variational:
            step = "the prior's kl_terms"
            kl = model.kl_terms(posterior, z)
            if tuple(kl.shape) not in ((count, latent), (count, 1)):
                raise ConfigError(f"prior.name={prior_config.name!r}: kl_terms gave shape {list(kl.shape)}; "
                                  f"expected [{count}, {latent}] (per dimension) or [{count}, 1] (estimated)")
            step = "the prior's log_prob"
            _expect(prior_config.name, "log_prob(z)", model.log_prior(z), (count,), key="prior.name")
            step = "sample"
            _expect(name, "sample(n) (decoded prior draws)", model.sample(count), (count, *image_shape))
    except ConfigError:
        raise
    except Exception as error:  # a user's class failing on two images: one line, not a traceback
        if on_meta and isinstance(error, (NotImplementedError, RuntimeError)) and "meta" in str(error).lower():
            raise _NoMetaKernel from error
        text = str(error).strip().splitlines()
        raise ConfigError(f"model.name={name!r} failed in {step} on a batch of {count} images of shape "
                          f"{list(image_shape)} ({type(error).__name__}: {text[0] if text else ''})") from None


def _expect(name: str, what: str, tensor, shape: tuple, key: str = "model.name") -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
        got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigError(f"{key}={name!r}: {what} gave {got}; the interface wants {list(shape)} "
                          "(the README's 'Your own components')")
