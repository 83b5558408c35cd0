"""The competition metric (macro-F1) and threshold choice, shared by every stage.

Thresholds are chosen on a plateau: many thresholds give the same best macro-F1 on a small
validation set, and the middle of the widest such run generalises better than its edge.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score


def macro_f1(labels, predictions) -> float:
    """The leaderboard metric: unweighted mean of the F1 of class 0 and class 1."""
    return float(f1_score(np.asarray(labels, int), np.asarray(predictions, int), average="macro",
                          labels=[0, 1], zero_division=0))


def auroc(labels, scores) -> float:
    labels = np.asarray(labels, int)
    if labels.min(initial=0) == labels.max(initial=0):
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, float)))


def auroc_columns(labels, score_matrix) -> np.ndarray:
    """AUROC of every column of `score_matrix` at once (Mann-Whitney U on tie-averaged ranks).

    Equal to `auroc` per column; for loops that compare many candidate scores, e.g. blend weights.
    """
    from scipy.stats import rankdata

    labels = np.asarray(labels, int)
    scores = np.asarray(score_matrix, float)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(scores.shape[1], math.nan)
    ranks = rankdata(scores, axis=0)
    return (ranks[labels == 1].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def aupr(labels, scores) -> float:
    labels = np.asarray(labels, int)
    if labels.sum() == 0:
        return math.nan
    return float(average_precision_score(labels, np.asarray(scores, float)))


def macro_f1_curve(labels, scores, sample_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """Macro-F1 for every distinct cut of the sorted scores.

    Returns (unique_scores ascending, f1) where f1[k] is the macro-F1 when the images whose score is
    >= unique_scores[k] are called defective (k = len(unique) means nobody is). `sample_weight`
    counts each image that many times in the confusion matrix (e.g. to move the class shares).
    """
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    uniq, inverse = np.unique(scores, return_inverse=True)
    if sample_weight is None:
        pos_at = np.bincount(inverse, weights=labels, minlength=len(uniq))
        cnt_at = np.bincount(inverse, minlength=len(uniq)).astype(float)
        n_pos, n = labels.sum(), len(labels)
    else:
        weights = np.asarray(sample_weight, float)
        pos_at = np.bincount(inverse, weights=labels * weights, minlength=len(uniq))
        cnt_at = np.bincount(inverse, weights=weights, minlength=len(uniq))
        n_pos, n = float((labels * weights).sum()), float(weights.sum())
    # Predicted positives for cut k: everything at index >= k.
    tp = np.concatenate([np.cumsum(pos_at[::-1])[::-1], [0.0]])
    pp = np.concatenate([np.cumsum(cnt_at[::-1])[::-1], [0.0]])
    fp = pp - tp
    fn = n_pos - tp
    tn = (n - n_pos) - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        f1_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f1_neg = np.where(2 * tn + fn + fp > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    return uniq, (f1_pos + f1_neg) / 2


def best_threshold(labels, scores, tol: float = 1e-12, sample_weight=None) -> tuple[float, float]:
    """(threshold, macro-F1): the middle of the widest run of cuts that reach the best macro-F1.

    Predict defect when score >= threshold. Cut k is valid for any threshold in
    (uniq[k-1], uniq[k]]; a run of cuts a..b spans (uniq[a-1], uniq[b]] and we take its midpoint.
    `sample_weight` weights the confusion matrix as in `macro_f1_curve`.
    """
    uniq, f1 = macro_f1_curve(labels, scores, sample_weight)
    best = f1.max()
    on = f1 >= best - tol
    # widest contiguous run of best cuts (first one on ties)
    best_run, run_start, best_len = (0, 0), None, -1
    for k, flag in enumerate(np.append(on, False)):
        if flag and run_start is None:
            run_start = k
        elif not flag and run_start is not None:
            if k - run_start > best_len:
                best_len, best_run = k - run_start, (run_start, k - 1)
            run_start = None
    a, b = best_run
    span = (uniq[-1] - uniq[0]) if len(uniq) > 1 else 1.0
    margin = 0.5 * span / max(len(uniq) - 1, 1) if span > 0 else 0.5
    low = uniq[a - 1] if a > 0 else uniq[0] - margin
    high = uniq[b] if b < len(uniq) else uniq[-1] + margin
    return float((low + high) / 2), float(best)


def binary_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 of the defect class, macro-F1 and the confusion matrix at a threshold."""
    labels = np.asarray(labels, int)
    pred = (np.asarray(scores, float) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / max(len(labels), 1)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "macro_f1": macro_f1(labels, pred),
        "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
    }
