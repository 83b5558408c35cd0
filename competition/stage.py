"""The one stage runner: when `train`, `zoo` and `pretrain` reuse, resume, refuse or redo a run folder.

A run records the results-relevant part of its resolved config (`results_config`) in its finished
marker (summary.json) and in last.pt. A later call whose record differs is refused, naming the
changed keys and the two ways out (`--force`, or another folder). Keys that change only speed
(`NEUTRAL_KEYS`) never refuse. Resuming from last.pt is the training engine's part
(`competition.training.fit`), which checks the same record with `refuse_changed`.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from competition.artifacts import UnreadableFileError, read_json, remove_stale_temporaries
from competition.config import Config
from competition.messages import first_few

# Dotted config keys that change how fast a stage runs, never what it computes: they may differ
# between the run that wrote a folder and the call that reuses or resumes it. `device` is here so
# a run started on one machine can be resumed or reused on another.
NEUTRAL_KEYS: frozenset[str] = frozenset({
    "device",
    "train.threads",
    "train.num_workers",
    "train.cache_images",
    "train.channels_last",
    "oversample.mode",  # online and cached make the same defect copies
    "zoo.num_workers",
    "zoo.cache",
    "zoo.cache_max_gb",  # how much of the feature cache stays on disk: evicted features are extracted again
    "zoo.channels_last",
    # which stages train on the pseudo-labels: a stage that does records them whole, one that does not
    # records none of them, so the flag itself says nothing more about a fold's results
    "pseudo.zoo",
})

# The second way out of a refusal for stages whose folder is named by the experiment.
ANOTHER_EXPERIMENT = "use another `experiment` name to keep both"


class ConfigChangedError(RuntimeError):
    """A run folder was written with another results-relevant config; the message names the keys."""


def json_form(value: Any) -> Any:
    """The form a record takes after a JSON round trip (tuples become lists), so saved and fresh compare."""
    return json.loads(json.dumps(value))


def _without_neutral(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        dotted = f"{prefix}{key}"
        if dotted in NEUTRAL_KEYS:
            continue
        out[key] = _without_neutral(value, dotted + ".") if isinstance(value, dict) else value
    return out


def results_config(cfg: Config, keys: Iterable[str]) -> dict[str, Any]:
    """The resolved config restricted to `keys` (dotted; a section brings all its keys), without the
    neutral keys, nested as in the config. `paths.data` is resolved to an absolute path."""
    data = cfg.to_dict()
    data["paths"]["data"] = str(Path(cfg.paths.data).resolve())
    record: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        source, target = data, record
        for part in parents:
            source, target = source[part], target.setdefault(part, {})
        target[leaf] = source[leaf]
    return json_form(_without_neutral(record))


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`dotted.key: old -> new` for every results-relevant value that differs (neutral keys skipped)."""
    old, new = _without_neutral(json_form(old), prefix), _without_neutral(json_form(new), prefix)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def refuse_changed(path: str | Path, old: dict[str, Any], new: dict[str, Any], redo: str = "start it over",
                   elsewhere: str = ANOTHER_EXPERIMENT) -> None:
    """Raise ConfigChangedError naming the changed keys if `old` (what `path` was written with) differs."""
    changed = config_differences(old, new)
    if changed:
        shown = first_few(changed, 8, separator="; ")  # not commas: the values themselves may be lists
        raise ConfigChangedError(f"{path} was written with another config ({shown}). "
                                 f"Pass --force to {redo}, or {elsewhere}.")


@dataclass
class RunFolder:
    """One stage's outputs for one unit of work (a fold, a backbone).

    `marker` (a JSON file holding the record under "config") is written last and marks the run
    finished, together with every `required` file; a marker saying `"finished": false` (a progress
    report written during training) does not. `outputs` (files or whole folders) are what `--force` deletes.
    """
    marker: Path
    outputs: tuple[Path, ...]
    required: tuple[Path, ...] = ()
    redo: str = "redo it"  # completes "Pass --force to ..."
    elsewhere: str = ANOTHER_EXPERIMENT

    def clear(self) -> None:
        for path in (self.marker, *self.outputs):
            if Path(path).is_dir():
                shutil.rmtree(path)
            else:
                Path(path).unlink(missing_ok=True)

    def finished(self) -> dict[str, Any] | None:
        """The marker's content if the run is finished, else None."""
        if not self.marker.exists() or not all(Path(p).exists() for p in self.required):
            return None
        try:
            done = read_json(self.marker)
        except UnreadableFileError as exc:
            raise UnreadableFileError(f"{exc}; delete it or pass --force to {self.redo}") from None
        return done if done.get("finished", True) else None

    def prepare(self, record: dict[str, Any], force: bool) -> dict[str, Any] | None:
        """Before running: with `force`, delete the outputs and return None (run afresh). Otherwise
        a finished run made with the same `record` returns its marker (the caller reuses it), one
        made with another record raises ConfigChangedError, and an unfinished one returns None
        (the engine resumes from last.pt, after the same check)."""
        for folder in {Path(p) if Path(p).is_dir() else Path(p).parent for p in (self.marker, *self.outputs)}:
            remove_stale_temporaries(folder)  # left by a killed write; never read
        if force:
            self.clear()
            return None
        done = self.finished()
        if done is not None:
            refuse_changed(self.marker, done.get("config", {}), record, self.redo, self.elsewhere)
        return done
