"""The zoo's one registry: named, ready-to-run configurations (`patchcore-resnet18`, `padim-ssl`, ...), timm-style.

Each module of `competition.zoo.models` declares its entries at import time with `register(name,
ModelClass, description, **hyperparameters)`; `discover` imports every module of that package to
find them, so adding a model never edits a shared file. A config overrides any entry's
hyperparameters with `zoo.params: {NAME: {key: value}}`, checked against the model's params dataclass.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from competition.artifacts import load_checkpoint
from competition.zoo.api import DRAW_SEED_STRIDE, AnomalyModel, BackboneParams, ZooSettings, build_params

MODELS_PACKAGE = "competition.zoo.models"


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
    build_params(model_class.params_class, params, f"zoo entry {name!r} ({family})")
    existing = _ENTRIES.get(name)
    if existing is not None and existing.module != model_class.__module__:
        raise ValueError(f"zoo entry {name!r} is registered twice: by {existing.module} and "
                         f"{model_class.__module__}")
    entry = ZooEntry(name, model_class, description, dict(params), model_class.__module__)
    _ENTRIES[name] = entry
    return entry


@contextmanager
def temporary_entries() -> Iterator[None]:
    """Entries registered inside the block are removed after it (tests register their own models)."""
    discover()
    saved = dict(_ENTRIES)
    try:
        yield
    finally:
        _ENTRIES.clear()
        _ENTRIES.update(saved)


def discover() -> None:
    """Import every module of `competition.zoo.models` once (their `register` calls fill the registry)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module(MODELS_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{MODELS_PACKAGE}.{info.name}")
    _DISCOVERED = True


def entries() -> dict[str, ZooEntry]:
    discover()
    return dict(sorted(_ENTRIES.items()))


DRAW_SEPARATOR = "@"  # NAME@K: entry NAME at random draw K (BackboneParams.draw), e.g. padim-resnet18@2


def split_draw(name: str) -> tuple[str, int]:
    """"padim-resnet18@2" -> ("padim-resnet18", 2); a name without the separator is draw 0."""
    base, separator, draw = name.partition(DRAW_SEPARATOR)
    if not separator:
        return name, 0
    if not draw.isdigit() or int(draw) < 1:
        raise ValueError(f"zoo model {name!r}: after {DRAW_SEPARATOR!r} comes a draw number of 1 or more "
                         f"(e.g. {base}{DRAW_SEPARATOR}1)")
    return base, int(draw)


def get_entry(name: str, where: str = "") -> ZooEntry:
    """The registered configuration `name`; an unknown name says which config key gave it (`where`) and
    suggests the closest registered names. `NAME@K` is entry NAME at random draw K (its backbone and every
    other random choice seeded apart, `BackboneParams.draw`): independent members on the same folds."""
    base, draw = split_draw(name)
    known = entries()
    if base not in known:
        close = difflib.get_close_matches(base, list(known), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown zoo model {name!r}{f' in {where}' if where else ''}; {hint}known: "
                         f"{', '.join(known)} (python -m competition zoo --list)")
    entry = known[base]
    if not draw:
        return entry
    if not issubclass(entry.model_class.params_class, BackboneParams):
        raise ValueError(f"zoo model {name!r}{f' in {where}' if where else ''}: {base} has no random backbone to "
                         "draw again (draws are for models over a timm backbone)")
    return ZooEntry(name, entry.model_class, f"{entry.description} (random draw {draw})",
                    {**entry.params, "draw": draw}, entry.module)


def config_params(cfg, name: str) -> dict[str, Any]:
    """`zoo.params` for `name`: a draw NAME@K takes NAME's overrides, then its own on top."""
    base, _ = split_draw(name)
    own = dict(cfg.zoo.params.get(name) or {})
    return {**(cfg.zoo.params.get(base) or {}), **own} if base != name else own


def list_models() -> list[tuple[str, str]]:
    """(name, short description) of every registered configuration, sorted by name."""
    return [(e.name, e.description) for e in entries().values()]


def model_class(family: str) -> type[AnomalyModel]:
    """The model class of a family (what a checkpoint records)."""
    classes = {entry.model_class.family: entry.model_class for entry in entries().values()}
    if family not in classes:
        raise ValueError(f"no zoo model of family {family!r}; known: {', '.join(sorted(classes))}")
    return classes[family]


def resolved_params(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The entry's hyperparameters with config overrides on top, as the model's checked params dataclass."""
    entry = get_entry(name)
    return build_params(entry.model_class.params_class, {**entry.params, **(overrides or {})}, f"zoo.params.{name}",
                        noun="key(s)")


def build_model(name: str, settings: ZooSettings, overrides: dict[str, Any] | None = None) -> AnomalyModel:
    """An unfitted model for the registry entry `name`, with `overrides` (from `zoo.params`) applied."""
    entry = get_entry(name)
    resolved_params(name, overrides)  # errors name zoo.params.<name>
    return entry.model_class(settings, **{**entry.params, **(overrides or {})})


def _network_layers(name: str, overrides: dict[str, Any], seed: int) -> list[tuple[str, set[int]]]:
    """("backbone@seed", the layers model `name` with `overrides` reads from that random network) for each
    network it reads (none for a model without the shared extractor)."""
    params = resolved_params(name, overrides)
    model_class = get_entry(name).model_class
    layers = model_class.extractor_layers(params)
    if not layers:
        return []
    return [(f"{params.backbone}@{seed + DRAW_SEED_STRIDE * (params.draw + k)}", {int(i) for i in layers})
            for k in range(model_class.extractor_draws(params))]


def run_shared_layers(cfg, names: list[str], extra: tuple[str, dict[str, Any]] | None = None) -> dict[str, list[int]]:
    """"backbone@seed" -> the layers that the models `names` (with their `zoo.params`) read from that random
    network through the shared extractor (`AnomalyModel.extractor_layers`), for `ZooSettings.shared_layers`.
    Keyed by the network's seed, which a draw shifts; a model with its own weights widens the random
    network of its name and seed too, which costs time, never a feature. `extra`: one more (name, overrides)."""
    wanted: dict[str, set[int]] = {}
    pairs = [(name, config_params(cfg, name)) for name in dict.fromkeys(names)] + ([extra] if extra else [])
    for name, overrides in pairs:
        for network, layers in _network_layers(name, overrides, int(cfg.seed)):
            wanted.setdefault(network, set()).update(layers)
    return {key: sorted(layers) for key, layers in sorted(wanted.items())}


def entry_image_size(cfg, name: str) -> int:
    """The canvas side of entry `name`: its `zoo.image_sizes` (a draw NAME@K takes NAME's unless named itself),
    else `zoo.image_size`."""
    sizes = cfg.zoo.image_sizes
    return int(sizes.get(name, sizes.get(split_draw(name)[0], cfg.zoo.image_size)))


def build_from_config(name: str, cfg, run_dir=None, draw: int | None = None) -> AnomalyModel:
    """`build_model` with settings and `zoo.params[name]` taken from the config, on the entry's canvas
    (`entry_image_size`); its shared feature extractor computes the layers that every model of `zoo.models` on
    the same canvas reads from its network (`run_shared_layers`; another canvas is another cache entry).
    `draw` overrides the entry's random draw (a screened draw, `competition.zoo.draws`)."""
    overrides = config_params(cfg, name) if draw is None else {**config_params(cfg, name), "draw": int(draw)}
    size = entry_image_size(cfg, name)
    same_canvas = [other for other in cfg.zoo.models if entry_image_size(cfg, other) == size]
    settings = dataclasses.replace(ZooSettings.from_config(cfg, run_dir=run_dir), image_size=size,
                                   shared_layers=run_shared_layers(cfg, same_canvas, (name, overrides)))
    return build_model(name, settings, overrides)


def load_model(path: str | Path, settings: ZooSettings | None = None) -> AnomalyModel:
    """A fitted model from `AnomalyModel.save`'s file, whatever its class (found by the family it records)."""
    checkpoint = load_checkpoint(path)
    family = checkpoint.get("family")
    try:
        cls = model_class(family)
    except ValueError as exc:
        raise ValueError(f"{path}: saved by model family {family!r}, which no zoo module defines; {exc}") from None
    return cls.from_checkpoint(checkpoint, path, settings)
