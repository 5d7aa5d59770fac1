"""Components: what a researcher varies, named in the config and found in one way.

A `Registry` maps names to components of one kind (a model family, a prior). A name in
the config is one of

    linear_vae                          a registered name (`Registry.register`; ours are
                                        registered exactly so, where they are defined)
    my_package.models:ResidualVAE       an import path: a module Python can import, then an attribute
    path/to/residual_vae.py:ResidualVAE a file and a class in it; a relative path is relative to the
                                        config or study file that names it (`anchor_file_reference`)

and installed packages may register names through the entry-point group `vae_lab.<kind>s`
(e.g. `vae_lab.models`). The component's options come from its section's keys that its
constructor names and from `<section>.options`; `check_options` holds them against the
constructor's signature. Every problem is a `ConfigError` of one line.

This module knows nothing of models or data: each layer keeps its own registry.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from vae_lab.config import COMPONENT_KEYS, ConfigError, file_reference

README_SECTION = "the README's 'Your own components'"
_IMPORT_REFERENCE = re.compile(r"^(?P<module>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)"
                               r":(?P<attribute>[A-Za-z_][A-Za-z0-9_.]*)$")


def is_reference(name: str) -> bool:
    """Does `name` point at code (`module:Attr` or `file.py:Attr`) rather than a registered name?"""
    return ":" in name


def short_name(name: str) -> str:
    """What to call a component in a table: a registered name as is, a reference by its class."""
    return name.rsplit(":", 1)[1] if is_reference(name) else name


def component_files(config) -> list[Path]:
    """The files of the `file.py:Class` components a config (a `vae_lab.config.Config`) names."""
    flat = config.flat()
    found = [file_reference(flat[key]) for key in COMPONENT_KEYS]
    return [path for path, _ in filter(None, found)]


def load_file_module(path: Path):
    """Import a Python file as a module of its own (one module per file's path and contents, so
    two runs of different versions of a file do not mix)."""
    source = path.read_bytes()
    module_name = "vae_lab_user_" + hashlib.sha256(str(path.resolve()).encode() + source).hexdigest()[:16]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before executing it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass
class Registry:
    """The components of one kind. `key` is the config key that names one (e.g. `model.name`)."""

    kind: str
    key: str

    def __post_init__(self):
        self._registered: dict[str, Any] = {}
        self._pinned: dict[str, Any] = {}

    def pin(self, reference: str, component: Any) -> None:
        """Make `reference` mean `component` in this process: a logged run's own copy of the file
        it named (`vae_lab.tracking.logged`), wherever that file is now."""
        self._pinned[reference] = component

    def register(self, name: str, component: Any = None) -> Callable:
        """Register `component` under `name`; used bare or as a decorator (`@MODELS.register("x")`)."""
        if component is None:
            return lambda target: self.register(name, target)
        if not name or is_reference(name):
            raise ValueError(f"a {self.kind} name is a plain word, not {name!r}")
        if name in self._registered and self._registered[name] is not component:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._registered[name]!r})")
        self._registered[name] = component
        return component

    def names(self) -> list[str]:
        return sorted(set(self._registered) | set(self._entry_points()))

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {point.name: point for point in importlib.metadata.entry_points(group=f"vae_lab.{self.kind}s")}

    def _unknown(self, name: str) -> ConfigError:
        return ConfigError(
            f"{self.key}={name!r} is not a registered {self.kind}; registered: {', '.join(self.names())}; "
            f"or name your own as package.module:Class or path/to/file.py:Class ({README_SECTION})")

    def resolve(self, name: str) -> Any:
        """The component `name` names; ConfigError (one line) when it cannot be found or imported."""
        if name in self._registered:
            return self._registered[name]
        if not is_reference(name):
            point = self._entry_points().get(name)
            if point is None:
                raise self._unknown(name)
            return self._load(name, point.load)
        if name in self._pinned:
            return self._pinned[name]
        file_match, import_match = file_reference(name), _IMPORT_REFERENCE.match(name)
        if file_match:
            path, attribute = file_match
            if not path.is_file():
                raise ConfigError(f"{self.key}={name!r}: no file {str(path)!r} (a relative path is relative to the "
                                  "config or study file that names it)")
            module = self._load(name, lambda: load_file_module(path))
            where = str(path)
        elif import_match:
            module = self._load(name, lambda: importlib.import_module(import_match["module"]))
            attribute, where = import_match["attribute"], import_match["module"]
        else:
            raise ConfigError(f"{self.key}={name!r} is neither a registered {self.kind} nor package.module:Class "
                              f"nor path/to/file.py:Class; registered: {', '.join(self.names())}")
        target = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ConfigError(f"{self.key}={name!r}: {where} has no {attribute!r}")
            target = getattr(target, part)
        return target

    def _load(self, name: str, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except Exception as error:  # any error in a user's module is theirs to see, in one line
            raise ConfigError(f"{self.key}={name!r} could not be imported ({_first_line(error)})") from None


def constructor_parameters(component: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """A class's (or function's) keyword parameters, and whether it takes **kwargs."""
    target = component.__init__ if inspect.isclass(component) else component
    parameters = dict(inspect.signature(target).parameters)
    if inspect.isclass(component):
        parameters.pop(next(iter(parameters)), None)  # self
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {name: p for name, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return named, takes_any


def check_options(component: Any, label: str, section: str, supplied: Iterable[str], options: dict) -> None:
    """Hold `options` (the `<section>.options` mapping) and the `supplied` keyword arguments
    against `component`'s constructor: an option it does not take, or a parameter without a
    default that nobody gives, is a ConfigError naming it and the allowed ones."""
    parameters, takes_any = constructor_parameters(component)
    supplied = set(supplied)
    own = sorted(name for name in parameters if name not in supplied)
    allowed = ", ".join(f"{section}.options.{name}" for name in own) or "none"
    for option in options:
        if option in supplied:
            raise ConfigError(f"{section}.options.{option}: {option} is given by {section}.{option} (or by vae_lab); "
                              f"{label}'s own options: {allowed}")
        if option not in parameters and not takes_any:
            raise ConfigError(f"{section}.options.{option} is not an option of {label}; allowed: {allowed}")
    missing = [name for name, parameter in parameters.items()
               if parameter.default is inspect.Parameter.empty and name not in supplied and name not in options]
    if missing:
        raise ConfigError(f"{label} needs {section}.options.{missing[0]} (it has no default); allowed: {allowed}")
