"""How a zoo model is judged on a fold: AUROC, AUPR, and decisions at four thresholds.

The four thresholds (predict defect when score >= threshold), all reported with accuracy,
precision, recall, F1 of the defect class, macro-F1 (the competition metric) and the confusion:
- `f1_percentile`: the macro-F1-best among the 1st..99th percentiles of the scores;
- `f1_grid`: the macro-F1-best on a uniform grid of 200 steps between the lowest and highest score;
- `youden`: the ROC point maximising Youden's J = TPR - FPR;
- `normal_p95`: the 95th percentile of the normal images' scores (about 5% false alarms).
They are chosen on the very scores they are reported on (in-sample), to compare models and to
see how separable a fold is; stacking sets the submission's threshold on its own.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_curve

from competition.metrics import aupr, auroc, binary_metrics, macro_f1


def _best_of(labels, scores, candidates) -> float:
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    best, best_f1 = float(candidates[0]), -1.0
    for t in candidates:
        f1 = macro_f1(labels, scores >= t)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(t), f1
    return best


def threshold_f1_percentile(labels, scores) -> float:
    """The macro-F1-best threshold among the 1st..99th percentiles of all scores."""
    return _best_of(labels, scores, np.percentile(np.asarray(scores, float), np.arange(1, 100)))


def threshold_f1_grid(labels, scores, steps: int = 200) -> float:
    """The macro-F1-best threshold on a uniform grid between the lowest and the highest score."""
    scores = np.asarray(scores, float)
    return _best_of(labels, scores, np.linspace(scores.min(), scores.max(), steps))


def threshold_youden(labels, scores) -> float:
    """The ROC threshold with the largest TPR - FPR (Youden's J)."""
    fpr, tpr, thresholds = roc_curve(np.asarray(labels, int), np.asarray(scores, float))
    j = tpr - fpr
    t = thresholds[int(np.argmax(j))]
    return float(t) if np.isfinite(t) else float(np.max(scores))


def threshold_normal_percentile(labels, scores, q: float = 95.0) -> float:
    """The `q`th percentile of the normal images' scores."""
    labels = np.asarray(labels, int)
    normal = np.asarray(scores, float)[labels == 0]
    return float(np.percentile(normal, q)) if normal.size else math.nan


THRESHOLDS = {
    "f1_percentile": threshold_f1_percentile,
    "f1_grid": threshold_f1_grid,
    "youden": threshold_youden,
    "normal_p95": threshold_normal_percentile,
}


def evaluate_scores(labels, scores) -> dict:
    """AUROC, AUPR and the metrics at each of the four thresholds (when both classes are present)."""
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    out = {"n": int(labels.size), "n_defect": int(labels.sum()), "auroc": auroc(labels, scores),
           "aupr": aupr(labels, scores), "thresholds": {}}
    if labels.size and 0 < labels.sum() < labels.size:
        for name, rule in THRESHOLDS.items():
            out["thresholds"][name] = binary_metrics(labels, scores, rule(labels, scores))
    return out
