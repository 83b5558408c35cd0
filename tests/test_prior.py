"""The decision under a shifted defect share: the test share estimated from unlabelled scores, and
the threshold tuned for it, on two-Gaussian scores with a known shift."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import quick_config
from fake_runs import read_answers_labels, write_fake_model
from test_stacking import make_folds, make_model

from competition.artifacts import read_json
from competition.config import ConfigError, EnsembleConfig
from competition.ensemble.infer import main as infer_main
from competition.ensemble.prior import (
    bbse_share,
    decide_threshold,
    em_share,
    estimate_test_share,
    parse_prior,
    platt_calibration,
    threshold_at_share,
)
from competition.ensemble.stacking import fold_test_features, level2_features, stack
from competition.folds import load_index, read_folds
from competition.leaderboard import main as leaderboard_main
from competition.metrics import (
    best_threshold,
    macro_f1,
    silverman_bandwidth,
    smoothed_survival,
    smoothed_threshold,
)

TRAIN_SHARE = 0.05
SEPARATION = 2.5  # defect scores ~ N(2.5, 1), normal ~ N(0, 1): AUROC about 0.96
SEEDS = range(5)


def scores_at_share(rng: np.random.Generator, n: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) with exactly round(n * share) defects."""
    n_defect = int(round(n * share))
    labels = np.r_[np.ones(n_defect, int), np.zeros(n - n_defect, int)]
    return labels, rng.normal(SEPARATION * labels, 1.0)


def shifted_sets(seed: int, test_share: float):
    """Out-of-fold scores of a 600-image training set at 5% defects, and a 700-image test set."""
    rng = np.random.default_rng(seed)
    oof_labels, oof_scores = scores_at_share(rng, 600, TRAIN_SHARE)
    test_labels, test_scores = scores_at_share(rng, 700, test_share)
    return oof_labels, oof_scores, test_labels, test_scores


@pytest.mark.parametrize("test_share", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_estimates_land_near_the_true_test_share(test_share, seed):
    oof_labels, oof_scores, _, test_scores = shifted_sets(seed, test_share)
    estimates = estimate_test_share(oof_labels, oof_scores, test_scores)
    assert set(estimates) == {"em", "bbse"}
    assert estimates["em"] == pytest.approx(test_share, abs=0.07)  # the closer one on Gaussian scores
    assert estimates["bbse"] == pytest.approx(test_share, abs=0.1)  # the default: noisier here, closer on real stacks


@pytest.mark.parametrize("test_share", [0.05, 0.2, 0.5])
def test_em_is_the_better_estimator_on_gaussian_scores(test_share):
    """On two-Gaussian scores EM's error is the smaller at every share; real stacks reverse it, which is why
    BBSE is the default (prior.py's docstring)."""
    errors = {"em": [], "bbse": []}
    for seed in range(100):
        oof_labels, oof_scores, _, test_scores = shifted_sets(seed, test_share)
        for name, share in estimate_test_share(oof_labels, oof_scores, test_scores).items():
            errors[name].append((share - test_share) ** 2)
    assert np.mean(errors["em"]) < np.mean(errors["bbse"])


@pytest.mark.parametrize("method", ["bbse", "em"])
@pytest.mark.parametrize("test_share", [0.2, 0.5])
def test_threshold_at_the_estimated_share_nears_the_oracle(test_share, method):
    at_train, at_estimate, oracle = [], [], []
    for seed in SEEDS:
        oof_labels, oof_scores, test_labels, test_scores = shifted_sets(seed, test_share)
        decision = decide_threshold(oof_labels, oof_scores, test_scores, "estimate", method=method)
        assert decision.mode == "estimate" and decision.method == method
        assert decision.test_share == pytest.approx(decision.estimates[method])
        at_train.append(macro_f1(test_labels, test_scores >= decision.train_threshold))
        at_estimate.append(macro_f1(test_labels, test_scores >= decision.threshold))
        oracle.append(best_threshold(test_labels, test_scores)[1])  # tuned on the test labels
    assert np.mean(at_estimate) >= np.mean(oracle) - 0.03
    if test_share == 0.5:
        assert np.mean(at_estimate) >= np.mean(at_train) + 0.05


def test_more_defects_lower_the_threshold():
    oof_labels, oof_scores, _, _ = shifted_sets(0, 0.5)
    thresholds = [threshold_at_share(oof_labels, oof_scores, share)[0] for share in (0.05, 0.2, 0.5)]
    assert thresholds[0] > thresholds[1] > thresholds[2]


def gaussian_macro_f1(cut, separation: float, share: float):
    """Population macro-F1 of `score >= cut` for N(0, 1) normals and N(separation, 1) defects at `share`."""
    from scipy.stats import norm

    tpr, fpr = norm.sf(np.asarray(cut) - separation), norm.sf(np.asarray(cut))
    tp, fn, fp, tn = share * tpr, share * (1 - tpr), (1 - share) * fpr, (1 - share) * (1 - fpr)
    return (tp / (tp + (fp + fn) / 2) + tn / (tn + (fp + fn) / 2)) / 2


@pytest.mark.parametrize("test_share", [0.05, 0.5])
def test_the_smoothed_cut_beats_the_plateau_with_thirty_defects(test_share):
    """30 defects among 430 images, as on the real sets: over 100 draws the smoothed cut's population macro-F1
    is higher on average, and more often, than the plateau middle's, and close to the best cut's."""
    plateau, smoothed = [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        labels = np.r_[np.ones(30), np.zeros(400)].astype(int)
        scores = rng.normal(1.5 * labels, 1.0)
        plateau.append(gaussian_macro_f1(threshold_at_share(labels, scores, test_share, "plateau")[0], 1.5, test_share))
        smoothed.append(gaussian_macro_f1(threshold_at_share(labels, scores, test_share)[0], 1.5, test_share))
    plateau, smoothed = np.array(plateau), np.array(smoothed)
    best = gaussian_macro_f1(np.linspace(-3, 5, 8001), 1.5, test_share).max()
    assert smoothed.mean() > plateau.mean() + 0.003
    assert (smoothed > plateau).mean() > 0.6
    assert smoothed.mean() > best - 0.01


def test_the_smoothed_cut_finds_the_population_optimum_on_a_large_sample():
    rng = np.random.default_rng(0)
    labels = (rng.random(20000) < 0.3).astype(int)
    scores = rng.normal(2.0 * labels, 1.0)
    cuts = np.linspace(-3, 5, 8001)
    target = cuts[np.argmax(gaussian_macro_f1(cuts, 2.0, 0.3))]
    threshold, f1 = smoothed_threshold(labels, scores)
    assert threshold == pytest.approx(target, abs=0.05)
    assert f1 == pytest.approx(gaussian_macro_f1(target, 2.0, 0.3), abs=0.01)
    # at another share the same scores give that share's optimum
    target = cuts[np.argmax(gaussian_macro_f1(cuts, 2.0, 0.6))]
    assert smoothed_threshold(labels, scores, 0.6)[0] == pytest.approx(target, abs=0.05)


def test_the_smoothed_survival_is_reflected_at_the_ends_of_the_scores():
    """Like the data, the smoothed distribution calls everybody at the lowest score and nobody above the highest."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 1.0, 50)
    cuts = np.linspace(values.min(), values.max(), 101)
    survival = smoothed_survival(values, cuts, 0.1, values.min(), values.max())
    assert survival[0] == pytest.approx(1.0) and survival[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(survival) <= 1e-12)
    empirical = (values[None, :] >= cuts[:, None]).mean(axis=1)
    assert np.abs(survival - empirical).max() < 0.1


def test_defects_crowding_the_top_score_leave_the_cut_inside_the_range():
    """Rank-like scores with a third of the defects within a hair of the top: unreflected kernels would put
    half their mass above the highest score, so the best cut would sit on it and call almost nobody."""
    rng = np.random.default_rng(0)
    normals = np.linspace(0.0, 1.0, 400) ** 0.5 * 0.995
    defects = np.r_[1.0 - rng.exponential(0.004, 12), rng.uniform(0.3, 1.0, 18)].clip(0.0, 1.0)
    labels = np.r_[np.ones(30), np.zeros(400)].astype(int)
    scores = np.r_[defects, normals]
    for share in (0.01, 0.05):
        threshold, _ = smoothed_threshold(labels, scores, share)
        assert threshold < np.sort(scores)[-3]  # the top three scores are all called, at least
        assert (scores >= threshold).sum() >= 10


def test_the_smoothed_rule_falls_back_to_the_plateau_without_a_bandwidth():
    labels = np.array([0, 0, 0, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9])  # one defect: no spread to smooth
    assert silverman_bandwidth(scores[labels == 1]) == 0.0
    assert smoothed_threshold(labels, scores, 0.5) == threshold_at_share(labels, scores, 0.5, "plateau")
    with pytest.raises(ValueError, match="threshold_rule"):
        decide_threshold(labels, scores, scores, "train", rule="middle")


def test_prior_train_gives_todays_threshold_exactly():
    oof_labels, oof_scores, _, test_scores = shifted_sets(1, 0.5)
    decision = decide_threshold(oof_labels, oof_scores, test_scores, "train", rule="plateau")
    assert decision.threshold == best_threshold(oof_labels, oof_scores)[0] == decision.train_threshold
    assert decision.test_share == decision.train_share == pytest.approx(TRAIN_SHARE)
    assert decision.method is None
    # weights of one everywhere leave the plateau rule as it was
    assert best_threshold(oof_labels, oof_scores, sample_weight=np.ones(len(oof_labels))) == \
        best_threshold(oof_labels, oof_scores)


def test_a_fixed_share_is_used_as_given():
    oof_labels, oof_scores, _, test_scores = shifted_sets(2, 0.2)
    decision = decide_threshold(oof_labels, oof_scores, test_scores, 0.35)
    assert decision.mode == "fixed" and decision.test_share == 0.35 and decision.method is None
    assert decision.threshold == threshold_at_share(oof_labels, oof_scores, 0.35)[0]
    assert decision.estimates["em"] == pytest.approx(0.2, abs=0.07)  # still estimated, for the record


def test_bbse_is_the_default_em_is_selectable_and_both_are_recorded():
    oof_labels, oof_scores, _, test_scores = shifted_sets(3, 0.5)
    decision = decide_threshold(oof_labels, oof_scores, test_scores, "estimate")
    assert decision.method == "bbse" and decision.test_share == pytest.approx(decision.estimates["bbse"])
    decision = decide_threshold(oof_labels, oof_scores, test_scores, "estimate", method="em")
    assert decision.method == "em" and decision.test_share == pytest.approx(decision.estimates["em"])
    assert "BBSE" in decision.describe() and "EM" in decision.describe()
    with pytest.raises(ValueError, match="prior_method .*em, bbse"):
        decide_threshold(oof_labels, oof_scores, test_scores, "estimate", method="kmm")


def test_calibration_and_em_pieces():
    oof_labels, oof_scores, _, test_scores = shifted_sets(4, 0.5)
    calibrated = platt_calibration(oof_labels, oof_scores)
    probabilities = calibrated(oof_scores)
    assert np.all(np.diff(calibrated(np.sort(oof_scores))) >= 0)  # monotone
    assert probabilities.mean() == pytest.approx(TRAIN_SHARE, abs=0.01)  # calibrated at the training share
    # no shift: EM stays at the training share's posteriors' mean
    assert em_share(probabilities, probabilities) == pytest.approx(probabilities.mean(), abs=1e-6)
    # perfectly separated out-of-fold scores still calibrate to finite, ordered probabilities
    separated = platt_calibration([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9])([0.0, 0.5, 1.0])
    assert np.all(np.isfinite(separated)) and separated[0] < separated[1] < separated[2]
    # a blind classifier gives BBSE nothing to solve
    assert np.isnan(bbse_share([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5]))


def test_one_class_out_of_fold_keeps_the_training_threshold():
    decision = decide_threshold([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6], "estimate")
    assert decision.threshold == decision.train_threshold and "one class" in decision.note


def test_parse_prior_and_its_errors():
    assert parse_prior("train") == ("train", None)
    assert parse_prior("estimate") == ("estimate", None)
    assert parse_prior(0.5) == ("fixed", 0.5)
    for bad in ("guess", 0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="train, estimate or a defect share"):
            parse_prior(bad)


def test_config_key_validation(tmp_path):
    assert EnsembleConfig().prior == "estimate" and EnsembleConfig().prior_method == "bbse"
    assert quick_config(tmp_path, tmp_path, "ensemble.prior=0.4").ensemble.prior == 0.4
    assert quick_config(tmp_path, tmp_path, "ensemble.prior=train").ensemble.prior == "train"
    with pytest.raises(ConfigError, match="ensemble.prior .*strictly between 0 and 1.*got 1.5"):
        quick_config(tmp_path, tmp_path, "ensemble.prior=1.5")
    with pytest.raises(ConfigError, match="ensemble.prior .*'guess'"):
        quick_config(tmp_path, tmp_path, "ensemble.prior=guess")
    with pytest.raises(ConfigError, match="ensemble.prior_method"):
        quick_config(tmp_path, tmp_path, "ensemble.prior_method=kmm")
    assert EnsembleConfig().prior_features == "per_fold"
    with pytest.raises(ConfigError, match="ensemble.prior_features"):
        quick_config(tmp_path, tmp_path, "ensemble.prior_features=median")


def test_stack_applies_the_threshold_for_the_estimated_share():
    """End to end through the stacker: a rank blend of one feature, 5% defects out of fold, 50% in test."""
    rng = np.random.default_rng(0)
    oof_labels, oof_scores = scores_at_share(rng, 600, TRAIN_SHARE)
    test_labels, test_scores = scores_at_share(rng, 700, 0.5)
    oof = pd.DataFrame({"image_id": [f"i{i}" for i in range(600)], "label": oof_labels,
                        "fold": np.arange(600) % 5, "m": oof_scores})
    test = pd.DataFrame({"image_id": [f"t{i}" for i in range(700)], "m": test_scores})
    by_share = {}
    for prior in ("train", "estimate"):
        result = stack(oof, test, EnsembleConfig(method="rank_blend", prior=prior))
        assert result.prior["mode"] == prior
        assert ((result.test["score"] >= result.threshold).astype(int) == result.test["answer"]).all()
        assert result.cv["threshold"] == best_threshold(oof_labels, result.oof["score"])[0]
        by_share[prior] = macro_f1(test_labels, result.test["answer"])
    assert result.prior["test_share"] == pytest.approx(0.5, abs=0.07)
    assert by_share["estimate"] > by_share["train"] + 0.05


@pytest.mark.parametrize("test_share", [0.05, 0.3])
def test_per_fold_estimates_avoid_the_collapse_of_averaged_test_features(test_share):
    """Fold models whose test noise is independent: the mean over them has shorter tails than any one fold
    model's out-of-fold scores, and EM on the averaged features lands far below the truth (at 5%, on 0);
    estimated on each fold model's own features and averaged, the share is right."""
    test_labels = (np.random.default_rng(9).random(600) < test_share).astype(int)
    folds = make_folds(n=400, n_pos=20, n_splits=5)
    errors = {"averaged": [], "per_fold": []}
    for seed in SEEDS:
        models = [make_model("a", folds, test_labels, 1.5, seed), make_model("b", folds, test_labels, 1.0, seed + 10)]
        oof, test = level2_features(models, "rank", folds)
        per_fold_features = fold_test_features(models, "rank")
        for way in errors:
            # logistic, the stacker `auto` picks here: the same estimates (auto's nested choice took 80 s a share)
            prior = stack(oof, test, EnsembleConfig(method="logistic", prior_features=way), 0, per_fold_features).prior
            assert prior["estimated_from"] == way
            assert len(prior["fold_estimates"].get("em", [])) == (5 if way == "per_fold" else 0)
            errors[way].append(abs(prior["estimates"]["em"] - test_labels.mean()))
    assert np.mean(errors["per_fold"]) < 0.04
    assert np.mean(errors["averaged"]) > 1.5 * np.mean(errors["per_fold"])


def test_fold_test_features_average_to_the_submitted_test_features():
    folds = make_folds(n=100, n_pos=10, n_splits=5)
    test_labels = (np.arange(50) % 10 == 0).astype(int)
    models = [make_model("a", folds, test_labels, 1.5, 0), make_model("b", folds, test_labels, 1.0, 1)]
    test = level2_features(models, "zscore", folds)[1]
    frames = fold_test_features(models, "zscore")
    assert sorted(frames) == [0, 1, 2, 3, 4]
    mean = sum(frame[["a", "b"]].to_numpy() for frame in frames.values()) / len(frames)
    np.testing.assert_allclose(mean, test[["a", "b"]].to_numpy())
    assert all(frame["image_id"].tolist() == test["image_id"].tolist() for frame in frames.values())


def test_infer_prints_records_and_the_leaderboard_shows_the_share(tiny_cfg, capsys):
    index = load_index(tiny_cfg)
    folds = read_folds(tiny_cfg, index)
    test_ids = index.loc[index["split"] == "test", "image_id"].tolist()
    test_labels = read_answers_labels(Path(tiny_cfg.paths.data), test_ids)
    for name, signal, seed in (("zoo-a", 2.5, 1), ("zoo-b", 1.0, 2)):
        write_fake_model(tiny_cfg.paths.work, tiny_cfg.experiment, name, folds, test_ids, test_labels, signal, seed)
    infer_main(tiny_cfg)
    out = capsys.readouterr().out
    assert "test defect share" in out and "BBSE" in out
    record = read_json(Path(tiny_cfg.paths.submissions) / f"{tiny_cfg.experiment}.json")
    prior = record["prior"]
    assert prior["mode"] == "estimate" and prior["method"] == "bbse" and record["threshold"] == prior["threshold"]
    assert 0 < prior["train_share"] < 1 and 0 < prior["test_share"] < 1 and set(prior["estimates"]) == {"em", "bbse"}
    assert prior["estimated_from"] == "per_fold" and "mean over the fold models" in out  # the default
    assert len(prior["fold_estimates"]["bbse"]) == tiny_cfg.folds.n_splits
    assert prior["estimates"]["bbse"] == pytest.approx(np.mean(prior["fold_estimates"]["bbse"]))
    leaderboard_main(tiny_cfg)
    out = capsys.readouterr().out
    assert "test defect share" in out and f"{prior['test_share']:.3f} (bbse)" in out
    table = pd.read_csv(Path(tiny_cfg.paths.submissions) / "leaderboard.csv")
    stacked = table[table["kind"] == "ensemble"].iloc[0]
    assert stacked["test_share"] == pytest.approx(prior["test_share"]) and stacked["prior"] == "bbse"
    assert table.loc[table["kind"] == "model", "test_share"].isna().all()
