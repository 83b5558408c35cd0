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

from competition.artifacts import save_figure, write_csv, write_json, write_yaml
from competition.config import Config
from competition.ensemble.gather import Gathered, gather
from competition.ensemble.stacking import StackResult, cross_validation_scores, level2_features, stack
from competition.ensemble.submission import build_submission, expected_image_ids, write_submission
from competition.metrics import macro_f1_curve

ENSEMBLE_DIR = "_ensemble"  # under <paths.work>/<experiment>/; model folders never start with "_"


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, so the record stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def ensemble_record(cfg: Config, gathered: Gathered, result: StackResult, seconds: float) -> dict[str, Any]:
    """What `submissions/<experiment>.json` keeps: models, weights, threshold, CV scores, config."""
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


def plot_threshold(result: StackResult, path: Path) -> Path:
    """Out-of-fold macro-F1 against the threshold (the chosen one marked) and the score histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, scores = result.oof["label"].to_numpy(int), result.oof["score"].to_numpy(float)
    cuts, f1 = macro_f1_curve(labels, scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.step(cuts, f1[:-1], where="pre", color="tab:blue")
    left.axvline(result.threshold, color="tab:red", linestyle="--", label=f"threshold {result.threshold:.4g}")
    left.set(xlabel="stacker score threshold (defect if >=)", ylabel="out-of-fold macro-F1",
             title=f"nested OOF macro-F1 {result.cv['oof_macro_f1']:.4f}")
    left.legend()
    bins = np.histogram_bin_edges(np.concatenate([scores, result.test["score"].to_numpy(float)]), bins=40)
    right.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="OOF normal")
    right.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="OOF defect")
    right.hist(result.test["score"], bins=bins, histtype="step", density=True, color="black", label="test")
    right.axvline(result.threshold, color="tab:red", linestyle="--")
    right.set(xlabel="stacker score", ylabel="density", title="score distributions")
    right.legend()
    return save_figure(fig, path)


def write_ensemble_outputs(cfg: Config, result: StackResult, record: dict[str, Any]) -> Path:
    out = Path(cfg.paths.work) / cfg.experiment / ENSEMBLE_DIR
    write_csv(result.oof, out / "oof.csv")
    write_csv(result.test, out / "test.csv")
    write_yaml(cfg.to_dict(), out / "config.yaml")
    write_json({k: v for k, v in record.items() if k != "config"}, out / "metrics.json")
    plot_threshold(result, out / "threshold.png")
    return out


def main(cfg: Config) -> None:
    start = time.perf_counter()
    gathered = gather(cfg)
    oof_features, test_features = level2_features(gathered.models, cfg.ensemble.normalise,
                                                  gathered.folds, gathered.test_ids)
    result = stack(oof_features, test_features, cfg.ensemble, cfg.seed)
    expected = expected_image_ids(cfg, gathered.index)
    submission = build_submission(expected, result.test.set_index("image_id")["answer"])
    record = ensemble_record(cfg, gathered, result, time.perf_counter() - start)
    paths = write_submission(submission, expected, cfg.paths.submissions, cfg.experiment, record)
    out = write_ensemble_outputs(cfg, result, record)

    print(f"experiment {cfg.experiment}: {cfg.ensemble.method} stacker over {len(result.models)} model(s), "
          f"{cfg.ensemble.normalise}-normalised, {record['n_folds']}-fold nested CV")
    width = max(len(name) for name in result.models + ["ensemble"])
    print(f"  {'model':<{width}}  OOF macro-F1  OOF AUROC")
    for name, cv in record["model_cv"].items():
        print(f"  {name:<{width}}  {cv['oof_macro_f1']:12.4f}  {_fmt(cv['oof_auroc']):>9}")
    cv = result.cv
    print(f"  {'ensemble':<{width}}  {cv['oof_macro_f1']:12.4f}  {_fmt(cv['oof_auroc']):>9}"
          f"   (per fold {cv['cv_mean']:.4f} ± {_fmt(cv['cv_std'])}, threshold {result.threshold:.4g})")
    print(f"  {record['n_test_defect_predicted']} of {record['n_test']} test images predicted defective")
    print(f"  stacker outputs: {out}")
    print(paths["submission"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
