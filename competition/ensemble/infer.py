"""`python -m competition infer`: gather the finished runs, stack them, threshold, write submission.csv.

Reads only what earlier stages wrote (per-model, per-fold oof.csv/test.csv, folds.csv, the dataset
index). Writes `submissions/<experiment>.csv|.json`, `submissions/submission.csv`, and the
stacker's own out-of-fold and test scores, config and plot under `<paths.work>/<experiment>/_ensemble/`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from competition.artifacts import (
    file_digest,
    json_safe,
    model_dir,
    remove_stale_temporaries,
    write_csv,
    write_json,
    write_yaml,
)
from competition.config import Config
from competition.ensemble.gather import Gathered, gather
from competition.ensemble.prior import PriorDecision
from competition.ensemble.stacking import (
    StackResult,
    cross_validation_scores,
    level2_features,
    share_fold_features,
    stack,
)
from competition.ensemble.submission import build_submission, expected_image_ids, write_submission
from competition.plots import plot_stacker_threshold

ENSEMBLE_DIR = "_ensemble"  # under <paths.work>/<experiment>/; model folders never start with "_"


def ensemble_record(cfg: Config, gathered: Gathered, result: StackResult, seconds: float) -> dict[str, Any]:
    """What `submissions/<experiment>.json` keeps: models, weights, threshold, test defect share, CV scores, config."""
    oof = result.oof
    model_cv = {name: cross_validation_scores(oof["label"], oof[name], oof["fold"]) for name in result.models}
    times = [model.train_seconds() for model in gathered.models]
    return json_safe({
        "experiment": cfg.experiment,
        "models": result.models,
        "method": cfg.ensemble.method,
        "normalise": cfg.ensemble.normalise,
        "stacker": result.stacker,
        "threshold": result.threshold,
        "prior": result.prior,
        "cv": result.cv,
        "model_cv": model_cv,
        "n_folds": int(oof["fold"].nunique()),
        "n_train": len(oof),
        "n_test": len(result.test),
        "n_test_defect_predicted": int(result.test["answer"].sum()),
        "train_seconds": float(np.nansum(times)) if not all(math.isnan(t) for t in times) else None,
        "stack_seconds": seconds,
        "config": cfg.to_dict(),
    })


def write_ensemble_outputs(cfg: Config, result: StackResult, record: dict[str, Any]) -> Path:
    out = Path(cfg.paths.work) / cfg.experiment / ENSEMBLE_DIR
    write_csv(result.oof, out / "oof.csv")
    write_csv(result.test, out / "test.csv")
    write_yaml(cfg.to_dict(), out / "config.yaml")
    write_json({k: v for k, v in record.items() if k != "config"}, out / "metrics.json")
    plot_stacker_threshold(result.oof["label"], result.oof["score"], result.test["score"], result.threshold,
                           result.cv["oof_macro_f1"], out / "threshold.png")
    return out


PREDICTOR_FORMAT = 1


def predictor_path(cfg: Config) -> Path:
    """`submissions/<experiment>.predictor.json`: what `predict` needs beyond the fold models themselves."""
    return Path(cfg.paths.submissions) / f"{cfg.experiment}.predictor.json"


def predictor_record(cfg: Config, gathered: Gathered, result: StackResult) -> dict[str, Any]:
    """The ensemble as plain numbers for `python -m competition predict`: per model and fold model the
    reference scores its scores are normalised against (its test.csv scores, sorted) and a digest of that
    test.csv (a fold retrained after infer makes the record stale), the stacker's form and the threshold."""
    references, digests = {}, {}
    for model in gathered.models:
        root = model_dir(cfg.paths.work, cfg.experiment, model.name)
        references[model.name] = {str(k): np.sort(model.test.loc[model.test["fold"] == k, "score"].to_numpy(float))
                                  for k in model.folds}
        digests[model.name] = {str(k): file_digest(root / f"fold{k}" / "test.csv") for k in model.folds}
    return json_safe({
        "format": PREDICTOR_FORMAT, "experiment": cfg.experiment, "models": result.models,
        "kinds": {name: "classifier" if name == cfg.model.name else "zoo" for name in result.models},
        "n_folds": cfg.folds.n_splits, "normalise": cfg.ensemble.normalise, "method": cfg.ensemble.method,
        "stacker": result.form, "threshold": result.threshold, "prior": result.prior,
        "references": references, "test_csv_sha1": digests,
    })


def main(cfg: Config, allow_partial: bool = False) -> None:
    start = time.perf_counter()
    for folder in (Path(cfg.paths.submissions), Path(cfg.paths.work) / cfg.experiment / ENSEMBLE_DIR):
        remove_stale_temporaries(folder)  # left by a killed infer; never read
    gathered = gather(cfg, allow_partial=allow_partial)
    if gathered.folds["label"].nunique() < 2:
        raise ValueError("the training images hold no defect (or no normal): stacking and its threshold need both. "
                         "On normals only, use the zoo models' own OK/NG decisions: test_decisions.csv in each "
                         "fold folder, at zoo.confidence or the 95th percentile of the held-out normals' scores")
    oof_features, test_features = level2_features(gathered.models, cfg.ensemble.normalise,
                                                  gathered.folds, gathered.test_ids)
    fold_features = share_fold_features(gathered.models, cfg.ensemble, gathered.test_ids)
    result = stack(oof_features, test_features, cfg.ensemble, cfg.seed, fold_features)
    expected = expected_image_ids(cfg, gathered.index)
    submission = build_submission(expected, result.test.set_index("image_id")["answer"])
    record = ensemble_record(cfg, gathered, result, time.perf_counter() - start)
    paths = write_submission(submission, expected, cfg.paths.submissions, cfg.experiment, record)
    out = write_ensemble_outputs(cfg, result, record)
    write_json(predictor_record(cfg, gathered, result), predictor_path(cfg))

    print(f"experiment {cfg.experiment}: {cfg.ensemble.method} stacker over {len(result.models)} model(s), "
          f"{cfg.ensemble.normalise}-normalised, {record['n_folds']}-fold nested CV")
    width = max(len(name) for name in result.models + ["ensemble"])
    print(f"  {'model':<{width}}  OOF macro-F1  OOF AUROC")
    for name, cv in record["model_cv"].items():
        print(f"  {name:<{width}}  {cv['oof_macro_f1']:12.4f}  {_fmt(cv['oof_auroc']):>9}")
    cv = result.cv
    print(f"  {'ensemble':<{width}}  {cv['oof_macro_f1']:12.4f}  {_fmt(cv['oof_auroc']):>9}"
          f"   (per fold {cv['cv_mean']:.4f} ± {_fmt(cv['cv_std'])}, threshold {cv['threshold']:.4g})")
    print_blend_view(result.stacker)
    print(f"  {PriorDecision(**result.prior).describe()}")
    print(f"  {record['n_test_defect_predicted']} of {record['n_test']} test images predicted defective")
    print(f"  stacker outputs: {out}")
    if result.form is None:
        print(f"  predict cannot reuse this stacker ({record['stacker']['estimator']} has no plain-number form); "
              "it can with ensemble.method logistic, auto, rank_blend, mean or best_single")
    print(paths["submission"])


def print_blend_view(stacker: dict[str, Any]) -> None:
    """Which blend auto chose and why, the blend's weights, each model's marginal gain, and the rank
    correlation of the models' out-of-fold scores: which models earn their place."""
    auto = stacker.get("auto")
    if auto:
        # records before expected_macro_f1 existed chose by oof_macro_f1
        scores = ", ".join(f"{name} {row.get('expected_macro_f1', row['oof_macro_f1']):.4f} "
                           f"(best step {row['oof_macro_f1']:.4f})" for name, row in auto["candidates"].items())
        per_fold = ", ".join(f"{k}: {name}" for k, name in auto["chosen_per_fold"].items())
        where = "per outer fold" if auto.get("nested_choice", True) else "too few folds to nest the choice; per fold"
        print(f"  auto chose {auto['chosen']} (expected macro-F1 of the nested OOF scores: {scores}; "
              f"{where} {per_fold})")
    weights = stacker.get("weights") or stacker.get("coefficients_on_standardised_features") or {}
    gains = stacker.get("marginal_gain") or {}
    if weights or gains:
        print("  " + "; ".join(f"{name}: weight {_fmt(weights.get(name))}, gain {_fmt(gains.get(name))}"
                               for name in (weights or gains)))
    correlation = stacker.get("rank_correlation") or {}
    if len(correlation) > 1:
        names = list(correlation)
        width = max(map(len, names))
        print(f"  rank correlation of OOF scores:\n    {'':<{width}}  " + "  ".join(f"{n[:8]:>8}" for n in names))
        for a in names:
            print(f"    {a:<{width}}  " + "  ".join(f"{correlation[a][b]:8.3f}" for b in names))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
