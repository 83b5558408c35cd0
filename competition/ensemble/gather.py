"""Find the finished runs of an experiment and read their out-of-fold and test predictions.

Every model, classifier or zoo, writes `<paths.work>/<experiment>/<model>/fold<k>/oof.csv` and
`test.csv` through `artifacts.write_predictions` (atomically: a file that exists is complete). A
model is finished when all `folds.n_splits` folds hold both. Before anything is stacked, every
model must line up with folds.csv and the test set; what is missing stops the run with the
command that makes it.
"""
from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition.artifacts import OOF_COLUMNS, TEST_COLUMNS, model_dir, read_json, read_table
from competition.config import Config
from competition.messages import first_few

log = logging.getLogger(__name__)

PREDICTION_FILES = ("oof.csv", "test.csv")
# summary.json keys that may hold a fold's training time, in order of preference.
TIME_KEYS = ("train_seconds", "fit_seconds", "seconds", "elapsed_seconds")
_FOLD_DIR = re.compile(r"^fold(\d+)$")


class MissingRunsError(RuntimeError):
    """A model the ensemble needs lacks folds, or its predictions do not line up with the folds."""


@dataclass
class ModelPredictions:
    """One model's predictions over all its folds, as read from its fold folders."""

    name: str
    oof: pd.DataFrame  # image_id, label, score, fold: one row per labeled training image
    test: pd.DataFrame  # image_id, fold, score: one row per test image and fold model
    summaries: dict[int, dict] = field(default_factory=dict)

    @property
    def folds(self) -> list[int]:
        return sorted(self.oof["fold"].unique().tolist())

    def train_seconds(self) -> float:
        """Summed training time of the fold models from summary.json; NaN when none was recorded."""
        total, found = 0.0, False
        for summary in self.summaries.values():
            for key in TIME_KEYS:
                value = summary.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    total, found = total + float(value), True
                    break
        return total if found else math.nan


@dataclass
class Gathered:
    """Everything stacking needs: the models, the fold table and the test ids in submission order."""

    models: list[ModelPredictions]
    folds: pd.DataFrame  # image_id, label, fold
    test_ids: list[str]
    index: pd.DataFrame  # the dataset index the runs were checked against


def fold_folders(model_path: Path) -> dict[int, Path]:
    """{k: model_path/fold<k>} for every fold folder present."""
    if not model_path.is_dir():
        return {}
    found = {}
    for child in model_path.iterdir():
        match = _FOLD_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def is_fold_complete(fold_path: Path) -> bool:
    return all((fold_path / name).is_file() for name in PREDICTION_FILES)


def missing_folds(model_path: Path, n_splits: int) -> list[int]:
    """Folds 0..n_splits-1 that lack oof.csv or test.csv."""
    return [k for k in range(n_splits) if not is_fold_complete(model_path / f"fold{k}")]


def model_names(work: str | Path, experiment: str) -> list[str]:
    """Model folders of an experiment: those holding at least one fold<k> folder, sorted by name."""
    root = Path(work) / experiment
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir()
                  if child.is_dir() and not child.name.startswith((".", "_")) and fold_folders(child))


def experiment_names(work: str | Path) -> list[str]:
    """Experiments under `paths.work`: folders holding at least one model folder."""
    root = Path(work)
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir()
                  if child.is_dir() and not child.name.startswith((".", "_")) and model_names(root, child.name))


def make_command(cfg: Config, model_name: str, folds: list[int], force: bool = False) -> str:
    """The command that writes the given folds of a model (the classifier when it is `model.name`)."""
    fold = str(folds[0]) if len(folds) == 1 else "all"
    root = model_dir(cfg.paths.work, cfg.experiment, model_name)
    if model_name == cfg.model.name:
        python, make = f"python -m competition train --fold {fold}", f"make train FOLD={fold}"
    else:
        python = f"python -m competition zoo --model {model_name} --fold {fold}"
        make = f"make zoo MODEL={model_name} FOLD={fold}"
    if force:
        return f"`{python} --force` (or delete {root} and run `{make}`)"
    return f"`{make}` ({python})"


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    # Ids stay strings exactly as written ("0001" is not 1, "NA" is not missing).
    try:
        frame = read_table(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MissingRunsError(f"{path}: not a readable CSV ({exc}); re-run the fold that wrote it") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MissingRunsError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(columns)}, "
                               f"found {','.join(map(str, frame.columns))}")
    frame = frame[columns].copy()
    frame["score"] = pd.to_numeric(frame["score"], errors="coerce")
    bad = frame.loc[~np.isfinite(frame["score"].to_numpy(float)), "image_id"].tolist()
    if bad:
        raise MissingRunsError(f"{path}: {len(bad)} score(s) are missing or not finite, for "
                               f"{first_few(bad, quote=True)}; re-run the fold that wrote it")
    duplicated = frame.loc[frame["image_id"].duplicated(), "image_id"].tolist()
    if duplicated:
        raise MissingRunsError(f"{path}: image ids listed more than once: {first_few(duplicated, quote=True)}")
    return frame


def read_model(model_path: Path, folds: list[int], check_disjoint: bool = True) -> ModelPredictions:
    """Read oof.csv, test.csv and (optional) summary.json of the given folds of one model.

    `check_disjoint` stops when an image is in two folds' oof.csv; `gather` checks more precisely
    against folds.csv instead."""
    oofs, tests, summaries = [], [], {}
    for k in folds:
        fold_path = model_path / f"fold{k}"
        oof = _read_csv(fold_path / "oof.csv", OOF_COLUMNS)
        labels = pd.to_numeric(oof["label"], errors="coerce")
        if not labels.isin([0, 1]).all():
            raise MissingRunsError(f"{fold_path / 'oof.csv'}: label must be 0 or 1 in every row")
        oof["label"] = labels.astype(int)
        oof["fold"] = k
        test = _read_csv(fold_path / "test.csv", TEST_COLUMNS)
        test["fold"] = k
        oofs.append(oof)
        tests.append(test[["image_id", "fold", "score"]])
        summary_path = fold_path / "summary.json"
        if summary_path.is_file():
            try:
                summary = read_json(summary_path)
            except ValueError:
                log.warning("%s is not valid JSON; its training time is left out", summary_path)
                summary = {}
            summaries[k] = summary if isinstance(summary, dict) else {}
    oof = pd.concat(oofs, ignore_index=True)
    duplicated = oof.loc[oof["image_id"].duplicated(), "image_id"].unique().tolist()
    if duplicated and check_disjoint:
        raise MissingRunsError(f"{model_path}: images appear in the oof.csv of more than one fold: "
                               f"{first_few(duplicated, quote=True)}; the folds were written with different "
                               "fold assignments")
    return ModelPredictions(model_path.name, oof, pd.concat(tests, ignore_index=True), summaries)


def _is_zoo_model(name: str) -> bool:
    from competition.zoo.registry import get_entry

    try:
        get_entry(name)
    except ValueError:
        return False
    return True


def select_models(cfg: Config, allow_partial: bool = False) -> list[str]:
    """The models that enter the ensemble; stops naming every missing fold and its command. With the default
    `ensemble.models: []` every model of the experiment must be finished: an unfinished one would silently
    change the stack; `allow_partial` leaves it out with a warning instead."""
    work, experiment, n_splits = cfg.paths.work, cfg.experiment, cfg.folds.n_splits
    root = Path(work) / experiment
    present = model_names(work, experiment)
    wanted = list(cfg.ensemble.models) or present
    for name in cfg.ensemble.models:  # a typo is not a missing run: say so, with the names it may have meant
        if name not in present and name != cfg.model.name and not _is_zoo_model(name):
            close = difflib.get_close_matches(name, present + [cfg.model.name], n=3, cutoff=0.5)
            raise MissingRunsError(f"ensemble.models: {name!r} is neither a run of experiment {experiment!r} "
                                   f"({', '.join(present) or 'none yet'}), the classifier ({cfg.model.name}) nor a "
                                   f"zoo model{'; did you mean ' + ' or '.join(close) + '?' if close else ''}")
    incomplete = {name: missing_folds(model_dir(work, experiment, name), n_splits) for name in wanted}
    incomplete = {name: folds for name, folds in incomplete.items() if folds}

    if not present and not cfg.ensemble.models:
        raise MissingRunsError(
            f"no runs under {root}: nothing to stack for experiment {experiment!r}. Make them with "
            f"{make_command(cfg, cfg.model.name, list(range(n_splits)))} and/or `make zoo` "
            f"(python -m competition zoo --fold all), with the config of experiment {experiment!r}")

    def describe(name: str, folds: list[int]) -> str:
        what = "no folds" if len(folds) == n_splits else f"fold(s) {', '.join(map(str, folds))} missing"
        return f"{name}: {what} (oof.csv and test.csv under {model_dir(work, experiment, name)}/fold<k>); " \
               f"make them with {make_command(cfg, name, folds)}"

    if cfg.ensemble.models and incomplete:
        lines = "\n  ".join(describe(name, folds) for name, folds in incomplete.items())
        raise MissingRunsError(
            f"ensemble.models of experiment {experiment!r} needs all {n_splits} folds of every listed model:\n  "
            f"{lines}\n(with the config of experiment {experiment!r}; or remove the model from ensemble.models)")
    if incomplete and not allow_partial:
        lines = "\n  ".join(describe(name, folds) for name, folds in incomplete.items())
        raise MissingRunsError(
            f"experiment {experiment!r} has unfinished models (a model is finished when all {n_splits} folds have "
            f"predictions):\n  {lines}\nFinish them, or stack only the finished ones: `python -m competition infer "
            "--allow-partial` (make infer ALLOW_PARTIAL=1), or list the models in ensemble.models")
    finished = [name for name in wanted if name not in incomplete]
    if not finished:
        lines = "\n  ".join(describe(name, folds) for name, folds in incomplete.items())
        raise MissingRunsError(
            f"no finished run under {root} (a run is finished when all {n_splits} folds have predictions):\n  "
            f"{lines}\n(with the config of experiment {experiment!r})")
    for name, folds in incomplete.items():
        log.warning("left out of the ensemble, unfinished: %s", describe(name, folds))
    return finished


def check_alignment(model: ModelPredictions, folds: pd.DataFrame, test_ids: list[str], cfg: Config) -> None:
    """Every fold's oof.csv must hold exactly that fold's images with their labels; test.csv every test id."""
    root = model_dir(cfg.paths.work, cfg.experiment, model.name)
    problems, bad_folds = [], []
    for k in range(cfg.folds.n_splits):
        before = len(problems)
        expected = folds[folds["fold"] == k].set_index("image_id")["label"]
        got = model.oof[model.oof["fold"] == k].set_index("image_id")["label"]
        extra = sorted(set(got.index) - set(expected.index))
        lacking = sorted(set(expected.index) - set(got.index))
        where = f"{root / f'fold{k}' / 'oof.csv'}"
        if extra:
            problems.append(f"{where}: {len(extra)} image id(s) not in fold {k} of folds.csv: "
                            f"{first_few(extra, quote=True)}")
        if lacking:
            problems.append(f"{where}: {len(lacking)} image id(s) of fold {k} missing: "
                            f"{first_few(lacking, quote=True)}")
        both = expected.rename("expected").to_frame().join(got.rename("got"), how="inner")
        wrong = both.index[both["expected"] != both["got"]].tolist()
        if wrong:
            problems.append(f"{where}: labels differ from folds.csv for {first_few(wrong, quote=True)}")
        test = model.test[model.test["fold"] == k]
        test_where = f"{root / f'fold{k}' / 'test.csv'}"
        extra = sorted(set(test["image_id"]) - set(test_ids))
        present = set(test["image_id"])
        lacking = [i for i in test_ids if i not in present]
        if extra:
            problems.append(f"{test_where}: {len(extra)} image id(s) that are not test images: "
                            f"{first_few(extra, quote=True)}")
        if lacking:
            problems.append(f"{test_where}: {len(lacking)} test image id(s) missing: {first_few(lacking, quote=True)}")
        if len(problems) > before:
            bad_folds.append(k)
    if problems:
        raise MissingRunsError(
            f"{model.name} does not line up with {Path(cfg.paths.work) / 'folds.csv'} and the test set of "
            f"{cfg.paths.data}:\n  " + "\n  ".join(problems) +
            "\nIt was made with other folds or another dataset; re-run it on the current ones: "
            f"{make_command(cfg, model.name, bad_folds, force=True)}")


def gather(cfg: Config, index: pd.DataFrame | None = None, allow_partial: bool = False) -> Gathered:
    """The finished, aligned runs of `cfg.experiment` (restricted to `ensemble.models` when set)."""
    from competition.folds import load_index, read_folds

    names = select_models(cfg, allow_partial)  # before reading the dataset: missing runs are the likelier problem
    index = load_index(cfg) if index is None else index
    folds = read_folds(cfg, index)[["image_id", "label", "fold"]].copy()
    folds["label"] = folds["label"].astype(int)
    test_ids = index.loc[index["split"] == "test", "image_id"].astype(str).tolist()
    if not test_ids:
        raise MissingRunsError(f"the dataset at {cfg.paths.data} has no test images to predict")
    models = []
    for name in names:
        model = read_model(model_dir(cfg.paths.work, cfg.experiment, name), list(range(cfg.folds.n_splits)),
                           check_disjoint=False)
        check_alignment(model, folds, test_ids, cfg)
        models.append(model)
    return Gathered(models, folds, test_ids, index)
