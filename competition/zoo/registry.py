"""Named, ready-to-run zoo configurations (`patchcore-resnet18`, `padim-resnet18`, ...), timm-style.

Each model module declares its own entries at import time with `register(name, ModelClass,
description, **hyperparameters)`; this module imports every module of `competition.zoo` to find
them, so adding a model never edits a shared file. A config overrides any entry's
hyperparameters with `zoo.params: {NAME: {key: value}}`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from competition.zoo.base import AnomalyModel, ZooSettings

# Modules of the package that hold the frame, not models: not imported when discovering.
FRAME_MODULES = {"base", "registry", "runner", "features", "evaluation", "validation", "coreset"}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model_class: type[AnomalyModel]
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    module: str = ""


_ENTRIES: dict[str, ZooEntry] = {}
_DISCOVERED = False


def register(name: str, model_class: type[AnomalyModel], description: str, **params: Any) -> ZooEntry:
    """Declare a named configuration of `model_class`; `name` must start with the model's family."""
    family = model_class.family
    if not family or not (name == family or name.startswith(family + "-")):
        raise ValueError(f"zoo entry {name!r}: the name must start with its model's family {family!r} "
                         f"(e.g. {family}-resnet18)")
    unknown = sorted(set(params) - set(model_class.DEFAULTS))
    if unknown:
        raise ValueError(f"zoo entry {name!r}: unknown parameter(s) {', '.join(unknown)} for {family}; "
                         f"known: {', '.join(sorted(model_class.DEFAULTS))}")
    existing = _ENTRIES.get(name)
    if existing is not None and existing.module != model_class.__module__:
        raise ValueError(f"zoo entry {name!r} is registered twice: by {existing.module} and "
                         f"{model_class.__module__}")
    entry = ZooEntry(name, model_class, description, dict(params), model_class.__module__)
    _ENTRIES[name] = entry
    return entry


def discover() -> None:
    """Import every model module of the package once (their `register` calls fill the registry)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import competition.zoo as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in FRAME_MODULES:
            continue
        importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def entries() -> dict[str, ZooEntry]:
    discover()
    return dict(sorted(_ENTRIES.items()))


def get_entry(name: str) -> ZooEntry:
    known = entries()
    if name not in known:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(known)} "
                         "(python -m competition zoo --list)")
    return known[name]


def list_models() -> list[tuple[str, str]]:
    """(name, short description) of every registered configuration, sorted by name."""
    return [(e.name, e.description) for e in entries().values()]


def resolved_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry's hyperparameters with config overrides on top, checked against the model's DEFAULTS."""
    entry = get_entry(name)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(entry.model_class.DEFAULTS))
    if unknown:
        raise ValueError(f"zoo.params.{name}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(entry.model_class.DEFAULTS))}")
    return {**entry.params, **overrides}


def build_model(name: str, settings: ZooSettings, overrides: dict[str, Any] | None = None) -> AnomalyModel:
    """An unfitted model for the registry entry `name`, with `overrides` (from `zoo.params`) applied."""
    entry = get_entry(name)
    return entry.model_class(settings, **resolved_params(name, overrides))


def build_from_config(name: str, cfg, run_dir=None) -> AnomalyModel:
    """`build_model` with settings and `zoo.params[name]` taken from the config."""
    settings = ZooSettings.from_config(cfg, run_dir=run_dir)
    return build_model(name, settings, cfg.zoo.params.get(name))
