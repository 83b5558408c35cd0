"""The decision under a shifted defect share: estimate the test set's share, threshold for it.

The stacker's threshold is tuned on out-of-fold scores, at the training set's defect share; a test
set may hold many more defects. Under label shift (the classes keep their score distributions,
only their shares move) the test share can be estimated from unlabelled test scores: by EM on
calibrated posteriors (Saerens, Latinne and Decaestecker, Neural Computation 2002) or by
black-box shift estimation from the out-of-fold confusion matrix (Lipton, Wang and Smola, ICML
2018). The threshold then maximises the macro-F1 expected at that share: out-of-fold defects and
normals reweighted by test share / training share, the plateau-middle rule of `metrics`.

Default estimator: BBSE. On two-Gaussian scores with 5% defects out of fold and 5%, 20% or 50% in
the test set (tests/test_prior.py) EM's error is the smaller: it uses every score through a
two-parameter calibration, whereas BBSE sees each test score only as above or below one cut. On
real stacks the order reverses: per fold model, BBSE landed closer to the true share on all seven
real-set stacks measured (mean absolute error 0.039 against EM's 0.112; README, "Stacking"), and EM
overshot on deeppcb by up to 0.21. A logistic map fitted on about 30 out-of-fold defects is least
sure in the tails, where EM leans hardest; BBSE rests on one confusion matrix. EM stays selectable
(`ensemble.prior_method: em`); it was the closer one on the synthetic `small` set. Both assume
each class scores alike out of fold and in the test set. The submitted test features are means over
the fold models, with shorter tails than one fold model's out-of-fold scores; on them EM fell to a
share of 0 on the synthetic `small` set (truth 5%). So `infer` by default (`ensemble.prior_features:
per_fold`) estimates on each fold model's own test features, scored by the same stacker, and
averages the estimates.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from competition.metrics import THRESHOLD_RULES, threshold_by_rule

PRIOR_MODES = ("train", "estimate")  # besides a fixed share in (0, 1)
ESTIMATORS = ("em", "bbse")
# Shares used for a threshold stay inside this range: a share of exactly 0 or 1 gives one class
# zero weight, and its best threshold calls every image the same.
SHARE_RANGE = (0.01, 0.99)


@dataclass
class PriorDecision:
    """What the threshold was tuned for, as `infer` prints it and the submission record keeps it."""
    mode: str  # train | estimate | fixed
    method: str | None  # the estimator behind `test_share` (mode estimate), else None
    train_share: float  # defect share among the out-of-fold images
    test_share: float  # the share the threshold is tuned for
    threshold: float  # applied to the test scores (defect if >=)
    train_threshold: float  # the plateau-middle threshold at the training share
    expected_macro_f1: float  # out-of-fold macro-F1 reweighted to `test_share`, at `threshold`
    estimates: dict[str, float] = field(default_factory=dict)  # every estimator's share (NaN: none)
    note: str = ""  # why an estimate could not be used
    # what the estimates were computed on: the submitted (averaged) test scores, or each fold model's own
    # test scores with the estimates averaged (then `fold_estimates` holds each fold model's)
    estimated_from: str = "averaged"
    fold_estimates: dict[str, list[float]] = field(default_factory=dict)
    # how the cut was chosen on the out-of-fold scores: smoothed (kernel-smoothed class distributions) | plateau
    rule: str = "plateau"

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.mode == "train" or self.note.endswith("is kept"):
            what = f"the training share {self.train_share:.3f} (prior: {self.mode})"
        elif self.mode == "fixed":
            what = f"the configured share {self.test_share:.3f} (training share {self.train_share:.3f})"
        else:
            others = ", ".join(f"{name.upper()} {_share(value)}" for name, value in self.estimates.items()
                               if name != self.method)
            source = ("mean over the fold models' own test scores" if self.estimated_from == "per_fold"
                      else "on the averaged test scores")
            what = (f"an estimated share {self.test_share:.3f} by {self.method.upper()}, {source}"
                    f"{' (' + others + ')' if others else ''}; training share {self.train_share:.3f}")
        text = (f"test defect share: threshold {self.threshold:.4g} ({self.rule}) tuned for {what}; "
                f"train-share threshold {self.train_threshold:.4g}")
        return text + (f"; {self.note}" if self.note else "")


# ------------------------------------------------------------------------------------ calibration

def platt_calibration(labels, scores) -> Callable[[np.ndarray], np.ndarray]:
    """score -> P(defect | score) at the training share: a logistic fit on the out-of-fold scores.

    Platt (1999) with his smoothed targets, (n_pos + 1) / (n_pos + 2) and 1 / (n_neg + 2), so
    that perfectly separated scores still give a finite slope.
    """
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    targets = np.where(labels == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    centre, scale = float(scores.mean()), float(scores.std()) or 1.0
    z = (scores - centre) / scale

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        logits = params[0] * z + params[1]
        # cross-entropy of soft targets: log(1 + e^t) - y t, computed without overflow
        value = float(np.sum(np.logaddexp(0.0, logits) - targets * logits))
        residual = expit(logits) - targets
        return value, np.array([np.sum(residual * z), np.sum(residual)])

    fit = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B")
    slope, intercept = fit.x

    def calibrated(values) -> np.ndarray:
        return expit(slope * (np.asarray(values, float) - centre) / scale + intercept)

    return calibrated


# ------------------------------------------------------------------------------------ estimators

def em_share(train_posteriors, test_posteriors, max_iter: int = 1000, tol: float = 1e-8) -> float:
    """Saerens et al.'s EM: the test share under which the re-weighted test posteriors average to it.

    `train_posteriors` are the calibrated out-of-fold probabilities (their mean is the share the
    calibration learned); each step re-weights the test posteriors by the ratio of the shares.
    """
    train_share = float(np.mean(train_posteriors))
    p = np.clip(np.asarray(test_posteriors, float), 1e-12, 1 - 1e-12)
    share = train_share
    for _ in range(max_iter):
        defect = p * (share / train_share)
        normal = (1.0 - p) * ((1.0 - share) / (1.0 - train_share))
        updated = float(np.mean(defect / (defect + normal)))
        if abs(updated - share) < tol:
            return updated
        share = updated
    return share


def bbse_share(labels, oof_scores, test_scores) -> float:
    """Lipton et al.'s black-box shift estimate for two classes; NaN when the classifier is blind.

    The classifier is the out-of-fold score cut midway between the median normal and the median
    defect score. P(test called defect) = TPR s + FPR (1 - s) is solved for s, clipped to [0, 1].
    A cut chosen for the largest TPR - FPR would be tuned on the same few defects it is measured on,
    overstating TPR - FPR and so understating a large shift.
    """
    labels, oof_scores = np.asarray(labels, int), np.asarray(oof_scores, float)
    if not 0 < labels.sum() < len(labels):
        return math.nan
    cut = (float(np.median(oof_scores[labels == 0])) + float(np.median(oof_scores[labels == 1]))) / 2
    called = oof_scores >= cut
    tpr, fpr = float(called[labels == 1].mean()), float(called[labels == 0].mean())
    if not tpr - fpr > 0:
        return math.nan
    called_test = float(np.mean(np.asarray(test_scores, float) >= cut))
    return float(np.clip((called_test - fpr) / (tpr - fpr), 0.0, 1.0))


def estimate_test_share(labels, oof_scores, test_scores) -> dict[str, float]:
    """{estimator: estimated test defect share} for every estimator in `ESTIMATORS`."""
    calibrated = platt_calibration(labels, oof_scores)
    return {"em": em_share(calibrated(oof_scores), calibrated(test_scores)),
            "bbse": bbse_share(labels, oof_scores, test_scores)}


# ------------------------------------------------------------------------------------ threshold

def threshold_at_share(labels, scores, test_share: float, rule: str = "smoothed") -> tuple[float, float]:
    """(threshold, expected macro-F1) for `test_share` defects by `rule` (`metrics.threshold_by_rule`):
    the best cut of the kernel-smoothed out-of-fold macro-F1 at that share, or the plateau middle of the
    out-of-fold macro-F1 reweighted to it."""
    return threshold_by_rule(labels, scores, rule, test_share)


def parse_prior(prior: str | float) -> tuple[str, float | None]:
    """`ensemble.prior` -> (mode, fixed share): train, estimate, or a share strictly inside (0, 1)."""
    if isinstance(prior, str) and prior in PRIOR_MODES:
        return prior, None
    if isinstance(prior, (int, float)) and not isinstance(prior, bool) and 0.0 < float(prior) < 1.0:
        return "fixed", float(prior)
    raise ValueError(f"prior must be train, estimate or a defect share strictly between 0 and 1 "
                     f"(e.g. 0.5), got {prior!r}")


def decide_threshold(labels, oof_scores, test_scores, prior: str | float = "estimate",
                     method: str = "bbse", fold_test_scores=None, rule: str = "smoothed") -> PriorDecision:
    """The test threshold for `prior` (see `parse_prior`) by `rule` (`metrics.THRESHOLD_RULES`), with both
    share estimates for the record.

    `fold_test_scores`: the test images scored by each fold model alone (one array per fold model); the share
    is then estimated on each and the estimates averaged. A fold model's test scores are distributed like the
    out-of-fold scores the calibration is fitted on, whereas `test_scores`, means over the fold models, have
    shorter tails: on them EM can collapse to a share of 0 (README, "Stacking"). `prior: train` with rule
    `plateau` returns exactly `metrics.best_threshold` of the out-of-fold scores.
    """
    if method not in ESTIMATORS:
        raise ValueError(f"prior_method must be one of {', '.join(ESTIMATORS)}, got {method!r}")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    mode, fixed = parse_prior(prior)
    labels, oof_scores = np.asarray(labels, int), np.asarray(oof_scores, float)
    test_scores = np.asarray(test_scores, float)
    train_share = float(labels.mean()) if len(labels) else math.nan
    train_threshold, train_f1 = threshold_by_rule(labels, oof_scores, rule)
    one_class = not 0 < labels.sum() < len(labels)
    estimates = {name: math.nan for name in ESTIMATORS}
    fold_estimates: dict[str, list[float]] = {}
    per_fold = fold_test_scores is not None and len(fold_test_scores) > 0
    if not one_class and len(test_scores):
        if per_fold:
            each = [estimate_test_share(labels, oof_scores, np.asarray(s, float)) for s in fold_test_scores]
            fold_estimates = {name: [e[name] for e in each] for name in ESTIMATORS}
            estimates = {name: float(np.mean(values)) for name, values in fold_estimates.items()}
        else:
            estimates = estimate_test_share(labels, oof_scores, test_scores)
    source = "per_fold" if per_fold else "averaged"

    share = {"train": train_share, "fixed": fixed}.get(mode, estimates[method])
    note = ""
    if mode != "train" and one_class:
        note = "out-of-fold scores hold one class only: the training-share threshold is kept"
    elif mode == "estimate" and not math.isfinite(share):
        note = f"{method.upper()} gave no estimate: the training-share threshold is kept"
    elif mode == "estimate" and not SHARE_RANGE[0] <= share <= SHARE_RANGE[1]:
        note = f"estimate {share:.4f} clipped to [{SHARE_RANGE[0]}, {SHARE_RANGE[1]}]"
        share = float(np.clip(share, *SHARE_RANGE))
    used_method = method if mode == "estimate" else None
    if mode == "train" or note.endswith("is kept"):
        return PriorDecision(mode, used_method, train_share, train_share, train_threshold, train_threshold,
                             train_f1, estimates, note, source, fold_estimates, rule)
    threshold, expected = threshold_at_share(labels, oof_scores, share, rule)
    return PriorDecision(mode, used_method, train_share, share, threshold, train_threshold, expected,
                         estimates, note, source, fold_estimates, rule)


def _share(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"
