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
    return uniq, macro_f1_from_counts(tp, fp, fn, tn)


def macro_f1_from_counts(tp, fp, fn, tn) -> np.ndarray:
    """Macro-F1 from (possibly weighted or expected) confusion-matrix counts, elementwise; an F1 with nothing
    to count is 0."""
    tp, fp, fn, tn = (np.asarray(v, float) for v in (tp, fp, fn, tn))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f1_neg = np.where(2 * tn + fn + fp > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    return (f1_pos + f1_neg) / 2


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


def silverman_bandwidth(values) -> float:
    """Silverman's rule of thumb for a Gaussian kernel: 0.9 min(sd, IQR / 1.34) n^(-1/5); the sd alone
    when the IQR is 0, and 0 when every value is the same."""
    values = np.asarray(values, float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    iqr = float(np.subtract(*np.percentile(values, [75, 25]))) / 1.34 if len(values) else 0.0
    spread = min(sd, iqr) if iqr > 0 else sd
    return 0.9 * spread * len(values) ** -0.2 if len(values) else 0.0


def smoothed_survival(values, cuts, bandwidth: float, low: float, high: float) -> np.ndarray:
    """P(score >= cut) for every cut in [low, high] under Gaussian kernels on `values`, reflected at `low`
    and `high` (Schuster 1985) and normalised, so that it is 1 at `low` and 0 at `high` as on the data: an
    unreflected kernel puts mass beyond the highest score, and a cut there would seem to call images."""
    from scipy.special import ndtr

    values = np.asarray(values, float)[None, :]

    def mass_above(c: np.ndarray) -> np.ndarray:
        c = c[:, None]
        return (ndtr((values - c) / bandwidth)                  # the kernels themselves, above c
                - ndtr((c + values - 2 * high) / bandwidth)      # their mirror images about `high`
                + ndtr((high - 2 * low + values) / bandwidth)    # and about `low`, within [c, high]
                - ndtr((c - 2 * low + values) / bandwidth)).mean(axis=1)

    cuts = np.asarray(cuts, float)
    # (cuts x values) in slices: bounded memory at any n
    survival = np.concatenate([mass_above(cuts[i:i + 256]) for i in range(0, len(cuts), 256)])
    return np.clip(survival / mass_above(np.array([low]))[0], 0.0, 1.0)


def smoothed_threshold(labels, scores, share: float | None = None, points: int = 2001) -> tuple[float, float]:
    """(threshold, macro-F1): the cut that maximises macro-F1 under kernel-smoothed class distributions.

    Each class's survival function is the mean of Gaussian kernels on its scores at Silverman's bandwidth
    (the smooth non-parametric ROC of Zou, Hall and Shapiro, Statistics in Medicine 1997; Lloyd, JASA
    1998), reflected at the lowest and highest score (`smoothed_survival`). At a defect share `share`
    (default: the labels' own) the expected confusion matrix of every cut of a grid of `points` over the
    scores' range gives its macro-F1, and the best cut is returned. With about 30 defects the empirical
    curve of `best_threshold` is a staircase whose best run often sits in a gap between two defects; the
    smoothed curve is the expected macro-F1 of the population they sample. A class with fewer than two
    distinct scores has no bandwidth: the plateau rule of `best_threshold` is used then (reweighted to
    `share`).
    """
    labels = np.asarray(labels, int)
    scores = np.asarray(scores, float)
    share = float(labels.mean()) if share is None else float(share)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    bandwidths = [silverman_bandwidth(positives), silverman_bandwidth(negatives)]
    if min(bandwidths) <= 0 or not 0.0 < share < 1.0:
        return threshold_by_rule(labels, scores, "plateau", share)
    low, high = float(scores.min()), float(scores.max())
    cuts = np.linspace(low, high, points)
    tpr, fpr = (smoothed_survival(values, cuts, bandwidth, low, high)
                for values, bandwidth in zip((positives, negatives), bandwidths))
    f1 = macro_f1_from_counts(share * tpr, (1.0 - share) * fpr, share * (1.0 - tpr), (1.0 - share) * (1.0 - fpr))
    best = int(np.argmax(f1))
    return float(cuts[best]), float(f1[best])


THRESHOLD_RULES = ("smoothed", "plateau")


def threshold_by_rule(labels, scores, rule: str, share: float | None = None) -> tuple[float, float]:
    """(threshold, macro-F1) at defect share `share` (default: the labels' own): `smoothed_threshold`, or the
    plateau middle of the empirical curve reweighted to that share (`best_threshold`)."""
    if rule == "smoothed":
        return smoothed_threshold(labels, scores, share)
    if rule != "plateau":
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    labels = np.asarray(labels, int)
    both = 0 < labels.sum() < len(labels)
    weights = shift_weights(labels, share) if share is not None and both and 0.0 < share < 1.0 else None
    return best_threshold(labels, scores, sample_weight=weights)


def shift_weights(labels, test_share: float) -> np.ndarray:
    """Per image: test share / training share for defects, the normal ratio for normals (label shift)."""
    labels = np.asarray(labels, int)
    train_share = float(labels.mean())
    return np.where(labels == 1, test_share / train_share, (1.0 - test_share) / (1.0 - train_share))


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
