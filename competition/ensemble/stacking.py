"""Level-2 stacking over out-of-fold predictions, judged by nested cross-validation over the same folds.

Features. Each model's scores are normalised per fold model so that scores on different scales
(a classifier's probability, a PatchCore distance) become comparable. The reference of fold k is
the score distribution that the SAME fold-k model gave the test images (its test.csv):
 - it uses no label at all, so nothing about any fold's labels can leak into a feature;
 - it is held-out data for every fold model, whereas a model's scores on its own training normals
   are optimistic (a PatchCore memory bank scores its own images near zero), and oof.csv holds
   only the fold's validation images;
 - every fold model is calibrated on the same images, so fold k and fold j line up exactly.
The test set holds some defects; ranks do not care, and the z-score uses the median and MAD,
which the normal majority dominates. A test image's feature is the mean over the fold models of
their normalised test scores.

Stackers (`ensemble.method`): logistic regression on standardised features; `RankBlend`, a
non-negative weighted mean of the normalised scores whose weights come from greedy ensemble
selection with replacement (Caruana et al., 2004); or any scikit-learn classifier by dotted name.
The stacker's own out-of-fold scores come from `cross_val_predict` over a `PredefinedSplit` of the
same folds, so the prediction for fold k never saw fold k's labels. The CV threshold is
`metrics.best_threshold` on those scores (the middle of the best plateau); the test threshold is
the same rule with the out-of-fold classes reweighted to the test set's defect share
(`ensemble.prior`, `competition.ensemble.prior`).
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from competition.config import EnsembleConfig
from competition.ensemble.gather import ModelPredictions
from competition.ensemble.prior import decide_threshold
from competition.metrics import auroc, auroc_columns, best_threshold, macro_f1, threshold_by_rule

KEY_COLUMNS = ["image_id", "label", "fold"]
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


# ------------------------------------------------------------------------------------ features

def normalise_scores(scores, reference, method: str, snap_tolerance: float = 0.0) -> np.ndarray:
    """Scores placed on the scale of `reference` (one fold model's test scores).

    rank: mid-rank position among the reference scores, in [0, 1]; zscore: (score - median) / scale
    with scale = 1.4826 * MAD (the standard deviation when the MAD is 0, 1 when both are 0).
    `snap_tolerance` (rank only): a score this close to a reference score is taken as that score. `predict`
    recomputes scores in other batches and threads, whose last bits may differ; without it a test image
    scored again would move half a rank against its own reference score.
    """
    scores = np.asarray(scores, float)
    ref = np.sort(np.asarray(reference, float))
    if len(ref) == 0:
        raise ValueError("normalising needs reference scores; the fold model's test.csv is empty")
    if method == "rank":
        if snap_tolerance > 0:
            right = np.clip(np.searchsorted(ref, scores), 0, len(ref) - 1)
            left = np.clip(right - 1, 0, len(ref) - 1)
            nearest = np.where(np.abs(scores - ref[left]) <= np.abs(ref[right] - scores), ref[left], ref[right])
            scores = np.where(np.abs(nearest - scores) <= snap_tolerance, nearest, scores)
        below = np.searchsorted(ref, scores, side="left")
        up_to = np.searchsorted(ref, scores, side="right")
        return (below + up_to) / (2.0 * len(ref))
    if method == "zscore":
        centre = float(np.median(ref))
        scale = _MAD_TO_STD * float(np.median(np.abs(ref - centre)))
        if not scale > 0:
            scale = float(ref.std()) if ref.std() > 0 else 1.0
        return (scores - centre) / scale
    raise ValueError(f"ensemble.normalise must be 'rank' or 'zscore', got {method!r}")


def level2_features(models: list[ModelPredictions], method: str, folds: pd.DataFrame | None = None,
                    test_ids: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(oof features: image_id, label, fold, one column per model; test features: image_id, one column per model,
    each the mean over the model's fold models).

    `folds` (image_id, label, fold) and `test_ids` fix the row order; by default the first model's.
    Labels are carried along for the stacker but never read here.
    """
    if not models:
        raise ValueError("no models to build stacking features from")
    oof = (models[0].oof if folds is None else folds)[KEY_COLUMNS].reset_index(drop=True).copy()
    test_ids = _test_ids(models, test_ids)
    test = pd.DataFrame({"image_id": test_ids})
    for model in models:
        oof_values, per_fold = _model_features(model, method)
        oof[model.name] = oof["image_id"].map(oof_values).to_numpy(float)
        test[model.name] = test["image_id"].map(per_fold.mean(axis=1)).to_numpy(float)  # mean over the fold models
        for frame, what in ((oof, "out-of-fold"), (test, "test")):
            _require_scores(frame, model.name, what)
    return oof, test


def fold_test_features(models: list[ModelPredictions], method: str,
                       test_ids: list[str] | None = None) -> dict[int, pd.DataFrame]:
    """{k: test features (image_id, one column per model) of fold model k alone}: what the stacker would see
    if each model were its fold-k model, whose score distribution is that of the out-of-fold scores the stacker
    was fitted on (averaging over fold models shortens the tails). The test defect share is estimated on these
    (`ensemble.prior_features: per_fold`)."""
    if not models:
        raise ValueError("no models to build stacking features from")
    test_ids = _test_ids(models, test_ids)
    shared = [k for k in models[0].folds if all(k in model.folds for model in models)]
    frames = {k: pd.DataFrame({"image_id": test_ids}) for k in shared}
    for model in models:
        per_fold = _model_features(model, method)[1]
        for k, frame in frames.items():
            frame[model.name] = frame["image_id"].map(per_fold[k]).to_numpy(float)
            _require_scores(frame, model.name, f"fold-{k} test")
    return frames


def share_fold_features(models: list[ModelPredictions], ensemble: EnsembleConfig,
                        test_ids: list[str] | None = None) -> dict[int, pd.DataFrame] | None:
    """`fold_test_features` where `stack` estimates the test defect share on them (`prior: estimate` with
    `prior_features: per_fold`), else None: a fixed or training share never reads them."""
    if ensemble.prior == "estimate" and ensemble.prior_features == "per_fold":
        return fold_test_features(models, ensemble.normalise, test_ids)
    return None


def _test_ids(models: list[ModelPredictions], test_ids: list[str] | None) -> list[str]:
    return list(dict.fromkeys(models[0].test["image_id"])) if test_ids is None else list(test_ids)


def _model_features(model: ModelPredictions, method: str) -> tuple[pd.Series, pd.DataFrame]:
    """(normalised out-of-fold score per image id, normalised test scores: one column per fold model k)."""
    oof_parts, test_parts = [], []
    for k in model.folds:
        reference = model.test.loc[model.test["fold"] == k, "score"].to_numpy(float)
        fold_oof = model.oof[model.oof["fold"] == k]
        fold_test = model.test[model.test["fold"] == k]
        oof_parts.append(pd.Series(normalise_scores(fold_oof["score"], reference, method),
                                   index=fold_oof["image_id"].to_numpy()))
        test_parts.append(pd.Series(normalise_scores(fold_test["score"], reference, method),
                                    index=fold_test["image_id"].to_numpy(), name=k))
    per_fold = pd.concat(test_parts, axis=1)
    if per_fold.isna().any().any():
        raise ValueError(f"{model.name}: its fold models scored different test images; every test.csv "
                         "must hold every test image")
    return pd.concat(oof_parts), per_fold


def _require_scores(frame: pd.DataFrame, name: str, what: str) -> None:
    lacking = frame.loc[frame[name].isna(), "image_id"].tolist()
    if lacking:
        raise ValueError(f"{name} has no {what} score for {len(lacking)} image(s), e.g. {lacking[:3]}")


def feature_names(oof_features: pd.DataFrame) -> list[str]:
    return [c for c in oof_features.columns if c not in KEY_COLUMNS]


# ------------------------------------------------------------------------------------ stackers

class RankBlend(ClassifierMixin, BaseEstimator):
    """Weighted mean of normalised model scores (with `normalise: rank`, a rank average).

    Weights: greedy forward selection with replacement (Caruana et al., 2004), adding at each of
    `rounds` steps the model that most raises the AUROC of the blend, and keeping the best round.
    AUROC rather than macro-F1 because it is threshold-free; the threshold is chosen afterwards.
    With `bags` > 1, the paper's bagged selection: each bag selects among a random `bag_fraction`
    of the models (at least three), and the weights are the mean over bags (a model that wins only by chance on
    these few defects is diluted, which stabilises the blend).
    """

    def __init__(self, rounds: int = 50, bags: int = 1, bag_fraction: float = 0.5, random_state: int = 0):
        self.rounds = rounds
        self.bags = bags
        self.bag_fraction = bag_fraction
        self.random_state = random_state

    def fit(self, X, y):
        X, y = np.asarray(X, float), np.asarray(y, int)
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        if self.rounds < 1 or self.bags < 1 or not 0.0 < self.bag_fraction <= 1.0:
            raise ValueError(f"RankBlend needs rounds >= 1, bags >= 1 and bag_fraction in (0, 1]; got "
                             f"{self.rounds}, {self.bags}, {self.bag_fraction}")
        if len(self.classes_) < 2:
            self.weights_ = np.full(X.shape[1], 1.0 / X.shape[1])
        elif self.bags == 1:
            self.weights_ = self._select(X, y)
        else:
            rng = np.random.default_rng(self.random_state)
            # a bag holds at least three models (all of them, when there are fewer): a bag of one or two
            # out of a handful often lacks every good model, and its weights would only dilute the blend
            size = max(min(3, X.shape[1]), int(round(self.bag_fraction * X.shape[1])))
            weights = np.zeros(X.shape[1])
            for _ in range(self.bags):
                columns = np.sort(rng.choice(X.shape[1], size, replace=False))
                weights[columns] += self._select(X[:, columns], y)
            self.weights_ = weights / self.bags
        self.threshold_ = best_threshold(y, X @ self.weights_)[0]
        return self

    def _select(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        counts, total = np.zeros(X.shape[1]), np.zeros(len(X))
        best_counts, best_auc = None, -math.inf
        for step in range(1, self.rounds + 1):
            gains = auroc_columns(y, (total[:, None] + X) / step)  # the blend with each model added once more
            pick = int(np.nanargmax(gains))  # first of equals: the blend stays sparse
            counts[pick] += 1
            total += X[:, pick]
            if gains[pick] > best_auc + 1e-12:
                best_auc, best_counts = gains[pick], counts.copy()
        return best_counts / best_counts.sum()

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, float) @ self.weights_

    def predict(self, X) -> np.ndarray:
        """1 where the blend reaches the plateau-middle macro-F1 threshold of the data it was fitted on."""
        return (self.decision_function(X) >= self.threshold_).astype(int)


class MeanBlend(RankBlend):
    """The plain mean of the normalised scores (equal weights): the blend with nothing to fit."""

    def __init__(self):
        super().__init__()

    def fit(self, X, y):
        X, y = np.asarray(X, float), np.asarray(y, int)
        self.classes_, self.n_features_in_ = np.unique(y), X.shape[1]
        self.weights_ = np.full(X.shape[1], 1.0 / X.shape[1])
        self.threshold_ = best_threshold(y, X @ self.weights_)[0]
        return self


class BestSingle(MeanBlend):
    """The one model with the best out-of-fold macro-F1 at its plateau threshold (ties: the higher
    AUROC, then the first): submitting the best member is a candidate the blends must beat."""

    def fit(self, X, y):
        X, y = np.asarray(X, float), np.asarray(y, int)
        self.classes_, self.n_features_in_ = np.unique(y), X.shape[1]
        f1 = np.array([best_threshold(y, X[:, j])[1] for j in range(X.shape[1])])
        aucs = auroc_columns(y, X) if len(self.classes_) > 1 else np.zeros(X.shape[1])
        best = max(range(X.shape[1]), key=lambda j: (round(f1[j], 12), np.nan_to_num(aucs[j], nan=0.0), -j))
        self.weights_ = np.eye(X.shape[1])[best]
        self.threshold_ = best_threshold(y, X @ self.weights_)[0]
        return self


def import_estimator(dotted: str) -> type:
    """`sklearn.ensemble.RandomForestClassifier` -> the class; errors say what a valid name looks like."""
    example = "e.g. sklearn.ensemble.RandomForestClassifier"
    module_name, _, class_name = (dotted or "").rpartition(".")
    if not module_name:
        raise ValueError(f"ensemble.estimator {dotted!r} is not a dotted class name ({example})")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"ensemble.estimator {dotted!r}: module {module_name!r} cannot be imported "
                         f"({example})") from None
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"ensemble.estimator {dotted!r}: {module_name} has no class {class_name!r} ({example})")
    return cls


# The candidates `ensemble.method: auto` chooses among, simplest first (ties go to the earlier one).
AUTO_CANDIDATES = ("best_single", "mean", "rank_blend", "logistic")


def build_stacker(ensemble: EnsembleConfig, seed: int = 0, method: str | None = None) -> BaseEstimator:
    """The unfitted level-2 estimator that `ensemble.method` (or `method`) names, with
    `ensemble.estimator_params` (for the configured method only: auto's candidates use their defaults,
    rank_blend there with the paper's bagging)."""
    chosen = method or ensemble.method
    params = dict(ensemble.estimator_params) if chosen == ensemble.method else {}
    if chosen == "rank_blend" and chosen != ensemble.method:
        params = {"bags": 20, "bag_fraction": 0.5, "random_state": seed}
    if chosen == "logistic":
        cls, wrap = LogisticRegression, lambda est: make_pipeline(StandardScaler(), est)
    elif chosen == "rank_blend":
        cls, wrap = RankBlend, lambda est: est
    elif chosen == "mean":
        cls, wrap = MeanBlend, lambda est: est
    elif chosen == "best_single":
        cls, wrap = BestSingle, lambda est: est
    elif chosen == "sklearn":
        cls, wrap = import_estimator(ensemble.estimator), lambda est: est
    else:
        raise ValueError(f"ensemble.method must be auto, {', '.join(AUTO_CANDIDATES)} or sklearn, got {chosen!r}")
    try:
        estimator = cls(**params)
    except TypeError as exc:
        raise ValueError(f"ensemble.estimator_params {params} do not fit {cls.__name__}: {exc}") from None
    if not hasattr(estimator, "fit") or score_method(estimator) is None:
        raise ValueError(f"ensemble.estimator {cls.__module__}.{cls.__name__} is not a classifier with fit and "
                         "predict_proba or decision_function")
    if "random_state" in estimator.get_params() and "random_state" not in params:
        estimator.set_params(random_state=seed)  # reproducible unless the config says otherwise
    return wrap(estimator)


def score_method(estimator) -> str | None:
    """predict_proba when the estimator has it, else decision_function: both rank images alike."""
    for name in ("predict_proba", "decision_function"):
        if hasattr(estimator, name):
            return name
    return None


def stacker_scores(estimator, X) -> np.ndarray:
    out = getattr(estimator, score_method(estimator))(X)
    return out[:, 1] if out.ndim == 2 else out


def nested_oof_scores(stacker, X, y, folds) -> np.ndarray:
    """The stacker's out-of-fold scores: fold k's come from a clone fitted on the other folds only."""
    X, y, folds = np.asarray(X, float), np.asarray(y, int), np.asarray(folds, int)
    out = cross_val_predict(clone(stacker), X, y, cv=PredefinedSplit(folds), method=score_method(stacker))
    return out[:, 1] if out.ndim == 2 else out


def describe_stacker(fitted, names: list[str]) -> dict[str, Any]:
    """What the fitted stacker learned, per model: coefficients, weights or importances."""
    final = fitted.steps[-1][1] if isinstance(fitted, Pipeline) else fitted
    out: dict[str, Any] = {"estimator": f"{type(final).__module__}.{type(final).__name__}"}
    if isinstance(final, RankBlend):  # also MeanBlend and BestSingle
        out["weights"] = dict(zip(names, map(float, final.weights_)))
    elif hasattr(final, "coef_"):
        scaled = isinstance(fitted, Pipeline)
        out["coefficients" + ("_on_standardised_features" if scaled else "")] = \
            dict(zip(names, map(float, np.ravel(final.coef_))))
        if hasattr(final, "intercept_"):
            out["intercept"] = float(np.ravel(final.intercept_)[0])
    elif hasattr(final, "feature_importances_"):
        out["feature_importances"] = dict(zip(names, map(float, final.feature_importances_)))
    return out


def stacker_form(fitted, names: list[str]) -> dict[str, Any] | None:
    """The fitted stacker as plain numbers, enough for `form_scores` to reproduce its scores: what `predict`
    reads back from JSON, so no pickled code ever runs. None for a stacker without such a form (an arbitrary
    `ensemble.method: sklearn` estimator)."""
    final = fitted.steps[-1][1] if isinstance(fitted, Pipeline) else fitted
    if isinstance(final, RankBlend):  # also MeanBlend and BestSingle
        return {"kind": "weighted_mean", "features": list(names), "weights": final.weights_.tolist()}
    if isinstance(fitted, Pipeline) and len(fitted.steps) == 2 and isinstance(final, LogisticRegression) \
            and isinstance(fitted.steps[0][1], StandardScaler) and len(final.classes_) == 2:
        scaler = fitted.steps[0][1]
        return {"kind": "logistic", "features": list(names), "mean": scaler.mean_.tolist(),
                "scale": scaler.scale_.tolist(), "coef": np.ravel(final.coef_).tolist(),
                "intercept": float(np.ravel(final.intercept_)[0])}
    return None


def form_scores(form: dict[str, Any], X) -> np.ndarray:
    """`stacker_scores` of the stacker that `stacker_form` wrote, from its numbers alone."""
    X = np.asarray(X, float)
    if form["kind"] == "weighted_mean":
        return X @ np.asarray(form["weights"], float)
    if form["kind"] == "logistic":
        z = (X - np.asarray(form["mean"], float)) / np.asarray(form["scale"], float)
        return expit(z @ np.asarray(form["coef"], float) + float(form["intercept"]))
    raise ValueError(f"unknown stacker form {form.get('kind')!r}")


# ------------------------------------------------------------------------------------ scoring

def cross_validation_scores(labels, scores, folds) -> dict[str, Any]:
    """Threshold (plateau middle of the out-of-fold macro-F1) and the CV figures at that threshold.

    fold_macro_f1 applies the one threshold inside each fold; cv_std is the sample standard deviation.
    """
    labels, scores, folds = np.asarray(labels, int), np.asarray(scores, float), np.asarray(folds, int)
    threshold, oof_f1 = best_threshold(labels, scores)
    fold_f1 = [macro_f1(labels[folds == k], scores[folds == k] >= threshold) for k in np.unique(folds)]
    return {
        "threshold": threshold,
        "oof_macro_f1": oof_f1,
        "oof_auroc": auroc(labels, scores),
        "fold_macro_f1": fold_f1,
        "cv_mean": float(np.mean(fold_f1)),
        "cv_std": float(np.std(fold_f1, ddof=1)) if len(fold_f1) > 1 else math.nan,
    }


@dataclass
class StackResult:
    models: list[str]
    oof: pd.DataFrame  # image_id, label, fold, features, score (the stacker's nested OOF score)
    test: pd.DataFrame  # image_id, features, score, answer
    threshold: float  # applied to the test scores: tuned for the test defect share (see `prior`)
    cv: dict[str, Any]  # out-of-fold figures at the training share (cv["threshold"])
    stacker: dict[str, Any] = field(default_factory=dict)
    prior: dict[str, Any] = field(default_factory=dict)  # prior.PriorDecision.as_record()
    form: dict[str, Any] | None = None  # the fitted stacker as plain numbers (`stacker_form`); None: it has none


# auto chooses inside each outer fold by nested CV over the other folds, which needs at least two of them; with
# fewer folds in all the choice is made once on every fold, and `nested_choice: false` in the record says its CV
# figure is then the chosen candidate's, not honest about the choosing.
AUTO_MIN_FOLDS = 3


def candidate_scores(ensemble: EnsembleConfig, X, y, folds, seed: int = 0
                     ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Every auto candidate's nested out-of-fold figures on (X, y, folds), and its nested scores.

    `expected_macro_f1`, what `choose_candidate` compares, is the macro-F1 of the cut that
    `ensemble.threshold_rule` would choose on those scores: with `smoothed`, the expected macro-F1 under
    kernel-smoothed class distributions, a less noisy figure with about 30 defects than the best step of
    the empirical curve (`oof_macro_f1`, the `plateau` rule's, also shown)."""
    table, scores = {}, {}
    for name in AUTO_CANDIDATES:
        scores[name] = nested_oof_scores(build_stacker(ensemble, seed, name), X, y, folds)
        cv = cross_validation_scores(y, scores[name], folds)
        table[name] = {"oof_macro_f1": cv["oof_macro_f1"], "oof_auroc": cv["oof_auroc"],
                       "expected_macro_f1": threshold_by_rule(y, scores[name], ensemble.threshold_rule)[1]}
    return table, scores


def choose_candidate(table: dict[str, dict[str, float]], tolerance: float = 0.0,
                     key: str = "expected_macro_f1") -> str:
    """The simplest candidate that no more complex one beats by more than `tolerance` on `key`."""
    chosen = AUTO_CANDIDATES[0]
    for name in AUTO_CANDIDATES[1:]:
        if table[name][key] > table[chosen][key] + tolerance:
            chosen = name
    return chosen


def _on_test_ranks(fitted, X_rows, X_test) -> np.ndarray:
    """A fitted stacker's scores of `X_rows` as ranks among its own test scores: candidates (and the
    folds of auto, which may choose differently) then share one scale, as fold models do at level 1."""
    reference = np.sort(stacker_scores(fitted, X_test) if len(X_test) else stacker_scores(fitted, X_rows))
    # the empirical CDF interpolated between the reference's scores: monotone without collapsing scores
    # that fall between two reference scores onto one rank (a few hundred test images quantise coarsely)
    return np.interp(stacker_scores(fitted, X_rows), reference, (np.arange(len(reference)) + 0.5) / len(reference))


def auto_oof_scores(ensemble: EnsembleConfig, X, y, folds, X_test, seed: int = 0) -> tuple[np.ndarray, dict]:
    """auto's honest out-of-fold scores: for each fold k, the choice among the candidates is made by
    nested CV on the other folds only, and the chosen one, fitted there, scores fold k."""
    out, choices = np.zeros(len(y)), {}
    for k in np.unique(folds):
        inner = folds != k
        name = choose_candidate(candidate_scores(ensemble, X[inner], y[inner], folds[inner], seed)[0],
                                ensemble.auto_tolerance)
        fitted = clone(build_stacker(ensemble, seed, name)).fit(X[inner], y[inner])
        out[~inner] = _on_test_ranks(fitted, X[~inner], X_test)
        choices[int(k)] = name
    return out, choices


def marginal_gains(ensemble: EnsembleConfig, method: str, X, y, folds, names: list[str], full: float,
                   seed: int = 0) -> dict[str, float]:
    """Per model: `full`, the nested OOF macro-F1 of `method` over every model, minus that without the
    model (positive: the model earns its place)."""
    if len(names) < 2:
        return {}
    stacker = build_stacker(ensemble, seed, method)
    gains = {}
    for j, name in enumerate(names):
        keep = [i for i in range(len(names)) if i != j]
        without = cross_validation_scores(y, nested_oof_scores(stacker, X[:, keep], y, folds), folds)
        gains[name] = full - without["oof_macro_f1"]
    return gains


def rank_correlations(oof_features: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Spearman correlation of the models' out-of-fold scores: near 1, a model adds little."""
    names = feature_names(oof_features)
    matrix = oof_features[names].corr(method="spearman")
    return {a: {b: float(matrix.loc[a, b]) for b in names} for a in names}


def stack(oof_features: pd.DataFrame, test_features: pd.DataFrame, ensemble: EnsembleConfig,
          seed: int = 0, fold_features: dict[int, pd.DataFrame] | None = None) -> StackResult:
    """Nested out-of-fold scores and CV figures, then the stacker refit on all out-of-fold rows
    scores the test features and the threshold, tuned for the test defect share that
    `ensemble.prior` gives (`prior.decide_threshold`), turns them into 0/1. With `fold_features`
    (`share_fold_features`) and `ensemble.prior_features: per_fold`, that share is estimated on each fold
    model's own test features, scored by the same fitted stacker, and averaged.

    `ensemble.method: auto` judges every candidate (`AUTO_CANDIDATES`) by the macro-F1 that
    `ensemble.threshold_rule` expects of its nested out-of-fold scores (`candidate_scores`) and submits
    the best (ties to the simpler) exactly as if it had been configured: its nested
    out-of-fold scores set the threshold and the test scores are its own. The CV figures are auto's:
    out-of-fold scores that make the choice inside each outer fold (`auto_score`), so they are honest
    about the choosing too."""
    names = feature_names(oof_features)
    X = oof_features[names].to_numpy(float)
    X_test = test_features[names].to_numpy(float)
    y = oof_features["label"].to_numpy(int)
    folds = oof_features["fold"].to_numpy(int)
    auto = ensemble.method == "auto"
    if auto:  # the CV figure is auto's own, choice included; the submission is the chosen blend's
        table, candidates = candidate_scores(ensemble, X, y, folds, seed)
        method = choose_candidate(table, ensemble.auto_tolerance)
        oof_scores = candidates[method]
        nested_choice = len(np.unique(folds)) >= AUTO_MIN_FOLDS
        if nested_choice:
            auto_scores, choices = auto_oof_scores(ensemble, X, y, folds, X_test, seed)
        else:  # no inner folds to choose on: the choice is made on every fold, and its CV figure says so
            auto_scores, choices = oof_scores, {int(k): method for k in np.unique(folds)}
        cv = cross_validation_scores(y, auto_scores, folds)
    else:
        method = ensemble.method
        oof_scores = nested_oof_scores(build_stacker(ensemble, seed), X, y, folds)
        cv = cross_validation_scores(y, oof_scores, folds)
    fitted = clone(build_stacker(ensemble, seed, method)).fit(X, y)
    test_scores = stacker_scores(fitted, X_test)
    fold_scores = None
    if fold_features and ensemble.prior_features == "per_fold":
        fold_scores = [stacker_scores(fitted, frame[names].to_numpy(float)) for frame in fold_features.values()]
    decision = decide_threshold(y, oof_scores, test_scores, ensemble.prior, ensemble.prior_method, fold_scores,
                                ensemble.threshold_rule)
    oof = oof_features.assign(score=oof_scores, **({"auto_score": auto_scores} if auto else {}))
    test = test_features.assign(score=test_scores, answer=(test_scores >= decision.threshold).astype(int))
    described = describe_stacker(fitted, names)
    if auto:
        described["auto"] = {"chosen": method, "candidates": table, "tolerance": ensemble.auto_tolerance,
                             "chosen_per_fold": choices, "nested_choice": nested_choice}
    described["rank_correlation"] = rank_correlations(oof_features)
    own_f1 = table[method]["oof_macro_f1"] if auto else cv["oof_macro_f1"]
    described["marginal_gain"] = marginal_gains(ensemble, method, X, y, folds, names, own_f1, seed)
    return StackResult(names, oof, test, decision.threshold, cv, described, decision.as_record(),
                       stacker_form(fitted, names))
