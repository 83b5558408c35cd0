"""The local leaderboard (`leaderboard`) and the grader (`score`).

Every model row is computed the same way from its run files: scores normalised per fold model as
the stacker sees them (`ensemble.normalise`), one threshold at the plateau middle of the
out-of-fold macro-F1, per-fold macro-F1 at that threshold. Ensemble rows come from the records
`infer` writes beside each submission. With an answer key (`answers.csv` beside `test/`, as the
synthetic generator writes) each row's thresholded test predictions are scored by `Usage`, like
Kaggle's Public and Private boards.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from competition.artifacts import file_digest, read_json, read_table, write_csv, write_text
from competition.config import Config
from competition.ensemble.gather import (
    ModelPredictions,
    check_alignment,
    experiment_names,
    fold_folders,
    is_fold_complete,
    model_names,
    read_model,
)
from competition.ensemble.infer import print_blend_view
from competition.ensemble.stacking import cross_validation_scores, level2_features
from competition.ensemble.submission import SubmissionError, read_submission, validate_submission
from competition.messages import first_few
from competition.metrics import macro_f1
from competition.plots import plot_leaderboard

ANSWER_COLUMNS = ["ImageId", "answer", "Usage"]
USAGE_ORDER = ["Public", "Private"]
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.png")


class AnswerKeyError(ValueError):
    """The answer key itself is malformed."""


# ------------------------------------------------------------------------------------ scoring

def read_answers(path: str | Path) -> pd.DataFrame:
    """answers.csv (ImageId,answer,Usage) as strings, answers checked to be 0/1."""
    try:
        key = read_table(path, all_text=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise AnswerKeyError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ANSWER_COLUMNS if c not in key.columns]
    if missing:
        raise AnswerKeyError(f"{path}: missing column(s) {', '.join(missing)}; an answer key has columns "
                             f"{','.join(ANSWER_COLUMNS)}, found {','.join(map(str, key.columns))}")
    if not key["answer"].isin(["0", "1"]).all() or key["ImageId"].duplicated().any():
        raise AnswerKeyError(f"{path}: every answer must be 0 or 1 and every ImageId listed once")
    return key[ANSWER_COLUMNS]


def score_by_usage(submission: pd.DataFrame, answers: pd.DataFrame, source: str = "submission",
                   reference: str = "answers.csv") -> dict[str, float]:
    """Macro-F1 per Usage (Public, Private, any other) and over all rows ("All").

    The submission is validated against the key's ImageIds first (any row order is accepted).
    """
    validate_submission(submission, answers["ImageId"].tolist(), in_order=False, source=source,
                        reference=reference)
    merged = answers.merge(submission.astype({"answer": str}), on="ImageId", suffixes=("_true", "_pred"))
    usages = USAGE_ORDER + sorted(set(merged["Usage"]) - set(USAGE_ORDER))
    scores = {}
    for usage in usages:
        part = merged[merged["Usage"] == usage]
        if len(part):
            scores[usage] = macro_f1(part["answer_true"].astype(int), part["answer_pred"].astype(int))
    scores["All"] = macro_f1(merged["answer_true"].astype(int), merged["answer_pred"].astype(int))
    return scores


def score_main(submission: str, answers: str) -> int:
    """`python -m competition score`: prints macro-F1 by Usage; 1 for a malformed submission."""
    try:
        key = read_answers(answers)
        scores = score_by_usage(read_submission(submission), key, source=submission, reference=answers)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (AnswerKeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = key["Usage"].value_counts()
    print(f"{submission} against {answers}")
    print(f"  {'Usage':<8} {'images':>6}  macro-F1")
    for usage, score in scores.items():
        n = len(key) if usage == "All" else int(counts[usage])
        print(f"  {usage:<8} {n:>6}  {score:.4f}")
    return 0


# ------------------------------------------------------------------------------------ rows

def expected_fold_count(model_path: Path, fallback: int) -> int:
    """folds.n_splits of the run's own config.yaml when a fold folder holds one, else `fallback`."""
    for fold_path in fold_folders(model_path).values():
        config_path = fold_path / "config.yaml"
        if config_path.is_file():
            try:
                n_splits = (yaml.safe_load(config_path.read_text()) or {}).get("folds", {}).get("n_splits")
            except (yaml.YAMLError, AttributeError):
                continue
            if isinstance(n_splits, int) and n_splits >= 2:
                return n_splits
    return fallback


def _answers_scores(predictions: pd.DataFrame, answers: pd.DataFrame | None, what: str,
                    notes: list[str]) -> dict[str, float]:
    if answers is None:
        return {}
    try:
        return score_by_usage(predictions, answers, source=what)
    except SubmissionError as exc:
        notes.append(f"{what}: not scored against the answer key ({str(exc).splitlines()[1].strip(' -')})")
        return {}


def model_row(experiment: str, model: ModelPredictions, normalise: str, answers: pd.DataFrame | None,
              notes: list[str]) -> dict:
    oof, test = level2_features([model], normalise)
    cv = cross_validation_scores(oof["label"], oof[model.name], oof["fold"])
    predictions = pd.DataFrame({"ImageId": test["image_id"],
                                "answer": (test[model.name] >= cv["threshold"]).astype(int)})
    scores = _answers_scores(predictions, answers, f"{experiment}/{model.name}", notes)
    return {"experiment": experiment, "model": model.name, "kind": "model", **_cv_columns(cv),
            "train_seconds": model.train_seconds(), "public": scores.get("Public", math.nan),
            "private": scores.get("Private", math.nan)}


def ensemble_row(experiment: str, record: dict, submission_path: Path, answers: pd.DataFrame | None,
                 notes: list[str]) -> dict:
    scores = {}
    if answers is not None and submission_path.is_file():
        scores = _answers_scores(read_submission(submission_path), answers, str(submission_path), notes)
    cv = {key: (math.nan if value is None else value) for key, value in record["cv"].items()}
    cv["fold_macro_f1"] = [math.nan if v is None else v for v in record["cv"].get("fold_macro_f1", [])]
    seconds = record.get("train_seconds")
    # The submission's threshold is tuned for the test defect share; records from before it was kept
    # used the out-of-fold threshold.
    prior = record.get("prior") or {}
    share = prior.get("test_share")
    columns = {**_cv_columns(cv), "threshold": record.get("threshold", cv["threshold"]),
               "test_share": math.nan if share is None else share,
               "prior": (prior.get("method") or prior.get("mode") or "") if prior else ""}
    method = record.get("method", "?")
    chosen = ((record.get("stacker") or {}).get("auto") or {}).get("chosen")
    if chosen:  # auto: the blend that nested CV chose
        method = f"{method} -> {chosen}"
    return {"experiment": experiment, "model": f"ensemble ({method}: {'+'.join(record.get('models', []))})",
            "kind": "ensemble", **columns, "train_seconds": math.nan if seconds is None else seconds,
            "public": scores.get("Public", math.nan), "private": scores.get("Private", math.nan)}


def _cv_columns(cv: dict) -> dict:
    folds = {f"fold{k}": value for k, value in enumerate(cv["fold_macro_f1"])}
    return {"n_folds": len(folds), "cv_mean": cv["cv_mean"], "cv_std": cv["cv_std"],
            "oof_macro_f1": cv["oof_macro_f1"], "oof_auroc": cv["oof_auroc"], "threshold": cv["threshold"], **folds}


def _ensemble_records(submissions: Path) -> dict[str, dict]:
    """{experiment: record} for every `<experiment>.json` that `infer` wrote."""
    records = {}
    if submissions.is_dir():
        for path in sorted(submissions.glob("*.json")):
            try:
                record = read_json(path)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("cv"), dict) and "models" in record:
                records[path.stem] = record
    return records


def _current_folds(cfg: Config, notes: list[str]) -> tuple[pd.DataFrame, list[str]] | None:
    """(folds.csv rows, test ids) of the configured experiment's dataset, for infer's alignment check."""
    from competition.folds import load_index, read_folds

    try:
        index = load_index(cfg)
        folds = read_folds(cfg, index)[["image_id", "label", "fold"]].copy()
    except (OSError, RuntimeError, ValueError) as exc:
        notes.append(f"{cfg.experiment}: its runs are not checked against the folds ({exc})")
        return None
    folds["label"] = folds["label"].astype(int)
    return folds, index.loc[index["split"] == "test", "image_id"].astype(str).tolist()


def _changed_since_infer(work: Path, submissions: Path, experiment: str) -> list[str]:
    """The fold test.csv files whose digest differs from the one `infer` recorded (predictor.json)."""
    path = submissions / f"{experiment}.predictor.json"
    if not path.is_file():
        return []
    try:
        digests = read_json(path).get("test_csv_sha1", {})
    except ValueError:
        return [str(path)]
    changed = []
    for model, folds in digests.items():
        for fold, digest in folds.items():
            test_csv = work / experiment / model / f"fold{fold}" / "test.csv"
            if not test_csv.is_file() or file_digest(test_csv) != digest:
                changed.append(f"{model}/fold{fold}")
    return changed


def collect_rows(cfg: Config, answers: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(table sorted by out-of-fold macro-F1, notes on what was left out)."""
    work, submissions = Path(cfg.paths.work), Path(cfg.paths.submissions)
    rows, notes = [], []
    records = _ensemble_records(submissions)
    current = _current_folds(cfg, notes)
    for experiment in sorted(set(experiment_names(work)) | set(records)):
        for name in model_names(work, experiment):
            model_path = work / experiment / name
            present = fold_folders(model_path)
            fallback = cfg.folds.n_splits if experiment == cfg.experiment else max(present) + 1
            n_splits = expected_fold_count(model_path, fallback)
            lacking = [k for k in range(n_splits) if not is_fold_complete(model_path / f"fold{k}")]
            if lacking:
                notes.append(f"{experiment}/{name}: unfinished, fold(s) {', '.join(map(str, lacking))} "
                             f"of {n_splits} lack predictions")
                continue
            try:
                model = read_model(model_path, list(range(n_splits)))
                if experiment == cfg.experiment and current is not None:  # infer's own check: never rank
                    check_alignment(model, *current, cfg)                  # on partial or misaligned rows
                rows.append(model_row(experiment, model, cfg.ensemble.normalise, answers, notes))
            except (RuntimeError, ValueError) as exc:
                notes.append(f"{experiment}/{name}: left out: {exc}")
        if experiment in records:
            stale = _changed_since_infer(work, submissions, experiment)
            if stale:
                notes.append(f"{experiment}: the ensemble is stale, {first_few(stale)} changed since `make infer`; "
                             "its row describes the older runs")
            try:
                rows.append(ensemble_row(experiment, records[experiment], submissions / f"{experiment}.csv",
                                         answers, notes))
            except (KeyError, TypeError, ValueError) as exc:
                notes.append(f"{submissions / f'{experiment}.json'}: left out, not a record `infer` writes ({exc})")
    table = pd.DataFrame(rows)
    if table.empty:
        return table, notes
    fold_columns = sorted((c for c in table.columns if c.startswith("fold")), key=lambda c: int(c[4:]))
    head = ["experiment", "model", "kind", "n_folds", "cv_mean", "cv_std", "oof_macro_f1", "oof_auroc",
            "threshold", "test_share", "prior", "train_seconds", "public", "private"]
    if "test_share" not in table:  # only stacked rows have a test share
        table["test_share"], table["prior"] = math.nan, ""
    table["prior"] = table["prior"].fillna("")
    table = table[head + fold_columns]
    table = table.sort_values(["oof_macro_f1", "oof_auroc", "cv_mean"], ascending=False, na_position="last",
                              kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table, notes


# ------------------------------------------------------------------------------------ output

def _num(value, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _test_share(share, prior: str) -> str:
    """The share a stacked row's threshold was tuned for and where it came from: `0.482 (em)`."""
    return f"{_num(share, 3)} ({prior})" if _num(share) and prior else _num(share, 3)


def _duration(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown_table(table: pd.DataFrame) -> str:
    has_answers = table["public"].notna().any() or table["private"].notna().any()
    header = ["#", "experiment", "model", "per-fold macro-F1", "mean ± std", "OOF macro-F1", "OOF AUROC",
              "threshold", "test defect share", "train time"] + (["Public", "Private"] if has_answers else [])
    fold_columns = [c for c in table.columns if c.startswith("fold")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in table.itertuples(index=False):
        row = row._asdict()
        folds = " ".join(_num(row[c], 3) for c in fold_columns if not pd.isna(row[c]))
        cells = [str(row["rank"]), row["experiment"], row["model"], folds,
                 f"{_num(row['cv_mean'])} ± {_num(row['cv_std'])}", _num(row["oof_macro_f1"]),
                 _num(row["oof_auroc"]), _num(row["threshold"]), _test_share(row["test_share"], row["prior"]),
                 _duration(row["train_seconds"])]
        if has_answers:
            cells += [_num(row["public"]), _num(row["private"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> None:
    answers_path = Path(cfg.paths.data) / "answers.csv"
    answers = read_answers(answers_path) if answers_path.is_file() else None
    table, notes = collect_rows(cfg, answers)
    if table.empty:
        raise RuntimeError(f"nothing to rank: no finished run under {cfg.paths.work} and no ensemble record "
                           f"under {cfg.paths.submissions}; run `make train`, `make zoo` and `make infer` first")
    out = Path(cfg.paths.submissions)
    write_csv(table, out / "leaderboard.csv")
    markdown = markdown_table(table)
    write_text(out / "leaderboard.md", markdown)
    plot_leaderboard(table, out / "leaderboard.png")
    print(markdown, end="")
    if answers is None:
        print(f"(no answer key at {answers_path}: Public/Private columns left out)")
    for note in notes:
        print(f"note: {note}")
    record = _ensemble_records(out).get(cfg.experiment)
    if record and isinstance(record.get("stacker"), dict):  # which models earn their place in the blend
        print(f"{cfg.experiment}: the submitted blend")
        print_blend_view(record["stacker"])
    print(out / "leaderboard.csv")
