"""Stacking: label-free per-fold normalisation, nested CV that never sees a fold's labels, plateau
threshold, stackers, gathering runs (missing-run messages) and `infer` end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, quick_config
from fake_runs import read_answers_labels, write_fake_model
from sklearn.base import BaseEstimator, ClassifierMixin

from competition.cli import main as cli_main
from competition.config import ConfigError, EnsembleConfig
from competition.ensemble.gather import MissingRunsError, ModelPredictions, gather
from competition.ensemble.stacking import (
    RankBlend,
    build_stacker,
    candidate_scores,
    choose_candidate,
    cross_validation_scores,
    level2_features,
    nested_oof_scores,
    normalise_scores,
    stack,
)
from competition.ensemble.submission import read_submission
from competition.folds import load_index, read_folds
from competition.metrics import best_threshold, macro_f1, threshold_by_rule


def make_folds(n: int = 160, n_pos: int = 32, n_splits: int = 4) -> pd.DataFrame:
    labels = np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)]
    folds = np.r_[np.arange(n_pos) % n_splits, np.arange(n - n_pos) % n_splits]
    return pd.DataFrame({"image_id": [f"img_{i:04d}" for i in range(n)], "label": labels, "fold": folds})


def make_model(name: str, folds: pd.DataFrame, test_labels: np.ndarray, signal: float, seed: int,
               fold_scale: bool = True) -> ModelPredictions:
    """Predictions as a run writes them; fold k's model has its own affine scale when fold_scale."""
    rng = np.random.default_rng(seed)
    oof_noise, test_noise = rng.normal(size=len(folds)), rng.normal(size=(folds["fold"].nunique(), len(test_labels)))
    oofs, tests = [], []
    for k in sorted(folds["fold"].unique()):
        scale, offset = (1.0 + 2.0 * k, 5.0 * k) if fold_scale else (1.0, 0.0)
        part = folds[folds["fold"] == k]
        oofs.append(part.assign(score=offset + scale * (signal * part["label"] + oof_noise[part.index])))
        tests.append(pd.DataFrame({"image_id": [f"test_{i:03d}" for i in range(len(test_labels))], "fold": k,
                                   "score": offset + scale * (signal * test_labels + test_noise[k])}))
    return ModelPredictions(name, pd.concat(oofs, ignore_index=True)[["image_id", "label", "score", "fold"]],
                            pd.concat(tests, ignore_index=True))


TEST_LABELS = (np.arange(60) % 5 == 0).astype(int)


# ------------------------------------------------------------------------------------ features

def test_rank_normalisation_is_the_mid_rank_position_among_the_reference():
    ranks = normalise_scores([0.0, 2.0, 2.5, 9.0], [1.0, 2.0, 3.0, 4.0], "rank")
    np.testing.assert_allclose(ranks, [0.0, 0.375, 0.5, 1.0])


def test_zscore_is_robust_to_the_defects_among_the_reference_scores():
    rng = np.random.default_rng(0)
    reference = np.r_[rng.normal(3.0, 2.0, size=2000), np.full(100, 80.0)]  # 5% far-off defects
    z = normalise_scores([3.0, 5.0], reference, "zscore")
    assert abs(z[0]) < 0.1 and abs(z[1] - 1.0) < 0.15
    plain = (5.0 - reference.mean()) / reference.std()  # what mean and std would give: far off
    assert abs(plain - 1.0) > 0.8
    assert np.isfinite(normalise_scores([1.0, 2.0], [4.0, 4.0, 4.0], "zscore")).all()


@pytest.mark.parametrize("method", ["rank", "zscore"])
def test_per_fold_normalisation_undoes_each_fold_models_own_scale(method):
    folds = make_folds()
    scaled = make_model("m", folds, TEST_LABELS, signal=1.5, seed=3, fold_scale=True)
    plain = make_model("m", folds, TEST_LABELS, signal=1.5, seed=3, fold_scale=False)
    raw = scaled.oof["score"].to_numpy()
    assert abs(raw[scaled.oof["fold"] == 3].mean() - raw[scaled.oof["fold"] == 0].mean()) > 10
    oof_a, test_a = level2_features([scaled], method, folds)
    oof_b, test_b = level2_features([plain], method, folds)
    np.testing.assert_allclose(oof_a["m"], oof_b["m"], atol=1e-9)
    np.testing.assert_allclose(test_a["m"], test_b["m"], atol=1e-9)


def test_features_never_read_a_label():
    folds = make_folds()
    model = make_model("m", folds, TEST_LABELS, signal=1.0, seed=1)
    flipped_folds = folds.assign(label=1 - folds["label"])
    flipped = ModelPredictions("m", model.oof.assign(label=1 - model.oof["label"]), model.test)
    oof_a, test_a = level2_features([model], "rank", folds)
    oof_b, test_b = level2_features([flipped], "rank", flipped_folds)
    np.testing.assert_array_equal(oof_a["m"], oof_b["m"])
    np.testing.assert_array_equal(test_a["m"], test_b["m"])


def test_test_feature_is_the_mean_over_the_fold_models():
    folds = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "label": [0, 1, 0, 1], "fold": [0, 0, 1, 1]})
    test = pd.DataFrame({"image_id": ["t1", "t2", "t1", "t2"], "fold": [0, 0, 1, 1], "score": [1.0, 2.0, 20.0, 10.0]})
    oof = folds.assign(score=[0.0, 5.0, 15.0, 30.0])[["image_id", "label", "score", "fold"]]
    oof_f, test_f = level2_features([ModelPredictions("m", oof, test)], "rank", folds, ["t2", "t1"])
    # fold 0 ranks t1=0.25, t2=0.75; fold 1 ranks t1=0.75, t2=0.25 -> means 0.5 and 0.5
    np.testing.assert_allclose(test_f["m"], [0.5, 0.5])
    assert test_f["image_id"].tolist() == ["t2", "t1"]
    np.testing.assert_allclose(oof_f["m"], [0.0, 1.0, 0.5, 1.0])


# ------------------------------------------------------------------------------------ nested CV

def _features(seed: int = 0):
    folds = make_folds()
    models = [make_model("good", folds, TEST_LABELS, 2.0, seed), make_model("weak", folds, TEST_LABELS, 0.7, seed + 1),
              make_model("noise", folds, TEST_LABELS, 0.0, seed + 2)]
    return level2_features(models, "rank", folds)


STACKERS = [EnsembleConfig(method="logistic"), EnsembleConfig(method="rank_blend"),
            EnsembleConfig(method="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                           estimator_params={"n_estimators": 20, "max_depth": 3})]


@pytest.mark.parametrize("ensemble", STACKERS, ids=lambda e: e.method)
def test_nested_scores_of_a_fold_do_not_move_when_its_labels_change(ensemble):
    oof, _ = _features()
    X, y, folds = oof[["good", "weak", "noise"]].to_numpy(), oof["label"].to_numpy(), oof["fold"].to_numpy()
    stacker = build_stacker(ensemble, seed=0)
    base = nested_oof_scores(stacker, X, y, folds)
    for k in range(4):
        y_flipped = np.where(folds == k, 1 - y, y)
        scores = nested_oof_scores(stacker, X, y_flipped, folds)
        np.testing.assert_array_equal(scores[folds == k], base[folds == k])
        if ensemble.method == "logistic":  # the check can fail: the other folds did train on fold k
            assert not np.allclose(scores[folds != k], base[folds != k])


class SpyStacker(ClassifierMixin, BaseEstimator):
    """Records which rows (column 0 holds the row number) each clone was fitted on and scored."""

    calls: list[tuple[set, set]] = []

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.fitted_rows_ = set(X[:, 0].astype(int))
        return self

    def decision_function(self, X):
        SpyStacker.calls.append((self.fitted_rows_, set(X[:, 0].astype(int))))
        return X[:, 1]

    def predict(self, X):
        return (X[:, 1] > 0.5).astype(int)


def test_the_stacker_for_a_fold_is_fitted_without_a_single_row_of_it():
    oof, _ = _features()
    folds = oof["fold"].to_numpy()
    X = np.c_[np.arange(len(oof)), oof["good"]]
    SpyStacker.calls = []
    nested_oof_scores(SpyStacker(), X, oof["label"], folds)
    assert len(SpyStacker.calls) == 4
    for fitted, scored in SpyStacker.calls:
        (k,) = set(folds[list(scored)])
        assert scored == set(np.flatnonzero(folds == k))
        assert fitted == set(np.flatnonzero(folds != k))


def test_a_memorising_stacker_gets_no_credit_for_label_free_noise():
    """ID-like noise features let a 1-nearest-neighbour stacker look up the labels of any fold it was
    fitted on: scored on its own training rows it is perfect. Nested, it must fall to chance, far
    below a stacker on an honest feature."""
    oof, _ = _features()
    rng = np.random.default_rng(7)
    y, folds = oof["label"].to_numpy(), oof["fold"].to_numpy()
    noise = rng.normal(size=(len(oof), 4))
    one_nn = EnsembleConfig(method="sklearn", estimator="sklearn.neighbors.KNeighborsClassifier",
                            estimator_params={"n_neighbors": 1})
    memoriser = build_stacker(one_nn).fit(noise, y)
    assert macro_f1(y, memoriser.predict(noise)) == 1.0  # what a leaking CV would report
    leaky_cv = cross_validation_scores(y, nested_oof_scores(build_stacker(one_nn), noise, y, folds), folds)
    honest = stack(oof[["image_id", "label", "fold", "good"]], oof[["image_id", "good"]], EnsembleConfig())
    assert leaky_cv["oof_macro_f1"] < 0.6 and leaky_cv["oof_auroc"] < 0.6
    assert honest.cv["oof_macro_f1"] > 0.75 and honest.cv["oof_auroc"] > 0.9


# ------------------------------------------------------------------------------------ threshold and stackers

def test_threshold_is_the_middle_of_the_best_plateau_not_its_edge():
    folds = np.arange(40) % 4
    labels = (np.arange(40) >= 30).astype(int)
    feature = np.r_[np.linspace(0.0, 0.4, 30), np.linspace(0.8, 1.0, 10)]  # gap (0.4, 0.8) separates
    oof = pd.DataFrame({"image_id": [f"i{i}" for i in range(40)], "label": labels, "fold": folds, "m": feature})
    test = pd.DataFrame({"image_id": ["t0", "t1", "t2"], "m": [0.55, 0.65, 0.9]})
    result = stack(oof, test, EnsembleConfig(method="rank_blend", prior="train", threshold_rule="plateau"))
    assert result.stacker["weights"] == {"m": 1.0}
    assert result.threshold == pytest.approx(0.6)
    assert result.threshold == best_threshold(labels, result.oof["score"])[0]
    assert result.cv["oof_macro_f1"] == 1.0 and result.cv["fold_macro_f1"] == [1.0] * 4
    assert result.test["answer"].tolist() == [0, 1, 1]
    # the default rule cuts in the same gap, and says so in the record
    smoothed = stack(oof, test, EnsembleConfig(method="rank_blend", prior="train"))
    assert 0.4 < smoothed.threshold < 0.8 and smoothed.prior["rule"] == "smoothed"


def test_rank_blend_puts_its_weight_on_the_informative_model():
    oof, _ = _features()
    blend = RankBlend().fit(oof[["good", "weak", "noise"]], oof["label"])
    assert blend.weights_.sum() == pytest.approx(1.0) and (blend.weights_ >= 0).all()
    assert blend.weights_[0] >= 0.6 and blend.weights_[2] <= 0.2


def test_logistic_stack_records_coefficients_and_thresholds_the_refit_test_scores():
    oof, test = _features()
    result = stack(oof, test, EnsembleConfig(method="logistic"))
    coefficients = result.stacker["coefficients_on_standardised_features"]
    assert set(coefficients) == {"good", "weak", "noise"}
    assert coefficients["good"] > coefficients["weak"] > abs(coefficients["noise"])
    assert result.cv["oof_auroc"] > 0.9
    assert ((result.test["score"] >= result.threshold).astype(int) == result.test["answer"]).all()
    assert result.test["answer"].sum() > 0
    # the refit stacker separates the synthetic test set too
    assert macro_f1(TEST_LABELS, result.test["answer"]) > 0.8


def test_sklearn_stacker_by_dotted_name_and_its_errors():
    oof, test = _features()
    ensemble = EnsembleConfig(method="sklearn", estimator="sklearn.ensemble.RandomForestClassifier",
                              estimator_params={"n_estimators": 10})
    assert build_stacker(ensemble, seed=5).get_params()["random_state"] == 5
    result = stack(oof, test, ensemble)
    assert "feature_importances" in result.stacker and result.cv["oof_auroc"] > 0.8
    with pytest.raises(ValueError, match="no class 'RandomForest'.*RandomForestClassifier"):
        build_stacker(EnsembleConfig(method="sklearn", estimator="sklearn.ensemble.RandomForest"))
    with pytest.raises(ValueError, match="cannot be imported"):
        build_stacker(EnsembleConfig(method="sklearn", estimator="nowhere.Model"))
    with pytest.raises(ValueError, match="estimator_params .*LogisticRegression"):
        build_stacker(EnsembleConfig(method="logistic", estimator_params={"n_trees": 3}))
    with pytest.raises(ValueError, match="not a classifier"):
        build_stacker(EnsembleConfig(method="sklearn", estimator="sklearn.preprocessing.StandardScaler"))


def test_config_requires_an_estimator_exactly_for_method_sklearn(tmp_path):
    with pytest.raises(ConfigError, match="ensemble.method.*estimator must name .*RandomForestClassifier"):
        quick_config(tmp_path, tmp_path, "ensemble.method=sklearn")
    with pytest.raises(ConfigError, match="estimator 'sklearn.svm.SVC' is only used with method: sklearn"):
        quick_config(tmp_path, tmp_path, "ensemble.estimator=sklearn.svm.SVC")
    with pytest.raises(ConfigError, match="ensemble.models .*lists a more than once"):
        quick_config(tmp_path, tmp_path, "ensemble.models=[a, b, a]")


# ------------------------------------------------------------------------------------ gathering and infer

@pytest.fixture
def runs(tiny_cfg):
    """tiny_cfg plus the helpers to write fake runs on its folds and test set."""
    index = load_index(tiny_cfg)
    folds = read_folds(tiny_cfg, index)
    test_ids = index.loc[index["split"] == "test", "image_id"].tolist()
    test_labels = read_answers_labels(Path(tiny_cfg.paths.data), test_ids)

    def write(name: str, signal: float, seed: int, **kwargs) -> None:
        write_fake_model(tiny_cfg.paths.work, tiny_cfg.experiment, name, folds, test_ids, test_labels, signal, seed,
                         **kwargs)

    return tiny_cfg, write, folds, test_ids


def _config_args(cfg, *sets):
    args = ["--config", str(ROOT / "configs" / "quick.yaml"), "--set", f"paths.data={cfg.paths.data}",
            "--set", f"paths.work={cfg.paths.work}", "--set", f"paths.submissions={cfg.paths.submissions}"]
    for s in sets:
        args += ["--set", s]
    return args


def test_no_runs_stops_with_the_commands_that_make_them(runs):
    cfg, *_ = runs
    with pytest.raises(MissingRunsError, match=r"no runs under .*make train FOLD=all.*make zoo"):
        gather(cfg)


def test_unfinished_models_are_left_out_or_named_with_the_command_for_each_missing_fold(runs, caplog):
    cfg, write, *_ = runs
    write("zoo-a", 2.0, 1)
    write(cfg.model.name, 1.0, 2, only_folds=[0, 2])
    write("zoo-b", 1.0, 3, only_folds=[1])
    with pytest.raises(MissingRunsError, match="--allow-partial") as info:
        gather(cfg)  # an unfinished model would silently change the stack
    assert "`make train FOLD=1`" in str(info.value) and "zoo-b: fold(s) 0, 2 missing" in str(info.value)
    gathered = gather(cfg, allow_partial=True)
    assert [m.name for m in gathered.models] == ["zoo-a"]
    assert "make train FOLD=1" in caplog.text

    listed = quick_config(Path(cfg.paths.data), Path(cfg.paths.work).parent,
                          f"ensemble.models=[zoo-a, {cfg.model.name}, zoo-b, padim-resnet18]")
    with pytest.raises(MissingRunsError) as info:
        gather(listed)
    message = str(info.value)
    assert f"{cfg.model.name}: fold(s) 1 missing" in message and "`make train FOLD=1`" in message
    assert "zoo-b: fold(s) 0, 2 missing" in message and "`make zoo MODEL=zoo-b FOLD=all`" in message
    assert "padim-resnet18: no folds" in message and "make zoo MODEL=padim-resnet18 FOLD=all" in message
    assert "zoo-a" not in message.split("\n", 1)[1]


def test_a_misspelt_ensemble_model_is_named_with_what_it_may_mean(runs):
    cfg, write, *_ = runs
    write("zoo-a", 2.0, 1)
    listed = quick_config(Path(cfg.paths.data), Path(cfg.paths.work).parent, "ensemble.models=[zoo-aa]")
    with pytest.raises(MissingRunsError, match="ensemble.models: 'zoo-aa' is neither.*did you mean zoo-a"):
        gather(listed)


def test_predictions_from_other_folds_stop_naming_the_file_and_the_rerun(runs):
    cfg, write, folds, test_ids = runs
    write("zoo-a", 2.0, 1)
    # fold 1 swaps one image with fold 0, as a run made before folds.csv was rewritten would
    path = Path(cfg.paths.work) / cfg.experiment / "zoo-a" / "fold1" / "oof.csv"
    oof = pd.read_csv(path, dtype={"image_id": str})
    stranger = folds.loc[(folds["fold"] == 0) & (folds["label"] == 0), "image_id"].iloc[0]
    oof.loc[oof["label"] == 0, "image_id"] = [stranger] + oof.loc[oof["label"] == 0, "image_id"].tolist()[1:]
    oof.to_csv(path, index=False)
    with pytest.raises(MissingRunsError) as info:
        gather(cfg)
    message = str(info.value)
    assert "zoo-a/fold1/oof.csv: 1 image id(s) not in fold 1" in message and stranger in message
    assert "zoo-a/fold1/oof.csv: 1 image id(s) of fold 1 missing" in message
    assert "python -m competition zoo --model zoo-a --fold 1 --force" in message


def test_infer_writes_a_valid_submission_in_sample_order_and_its_record(runs, capsys):
    cfg, write, folds, test_ids = runs
    write("zoo-a", 2.5, 1)
    write("zoo-b", 0.0, 2, fold_scale=False)
    write(cfg.model.name, 1.5, 3)
    assert cli_main(["infer", *_config_args(cfg)]) == 0
    out = capsys.readouterr().out
    subs = Path(cfg.paths.submissions)
    assert out.strip().endswith(str(subs / "submission.csv"))
    assert "ensemble" in out and "OOF macro-F1" in out
    submission = read_submission(subs / "submission.csv")
    sample = pd.read_csv(Path(cfg.paths.data) / "test" / "sample_submission.csv", dtype=str)
    assert submission.columns.tolist() == ["ImageId", "answer"]
    assert submission["ImageId"].tolist() == sample["ImageId"].tolist() == test_ids
    assert set(submission["answer"]) <= {"0", "1"}
    assert (subs / "quick.csv").read_text() == (subs / "submission.csv").read_text()
    record = pd.read_json(subs / "quick.json", typ="series")
    assert record["models"] == sorted(["zoo-a", "zoo-b", cfg.model.name])
    assert record["config"]["experiment"] == "quick" and 0 < record["cv"]["oof_macro_f1"] <= 1
    assert len(record["cv"]["fold_macro_f1"]) == cfg.folds.n_splits
    assert set(record["stacker"]["coefficients_on_standardised_features"]) == set(record["models"])
    stacked = Path(cfg.paths.work) / "quick" / "_ensemble"
    written = {p.name for p in stacked.iterdir()}
    assert {"oof.csv", "test.csv", "config.yaml", "metrics.json", "threshold.png"} <= written
    # the stacker folder is not mistaken for a model on the next run
    assert [m.name for m in gather(cfg).models] == record["models"]


def test_infer_with_missing_runs_exits_with_one_line(runs, capsys):
    cfg, *_ = runs
    assert cli_main(["infer", *_config_args(cfg, "ensemble.models=[patchcore-resnet18]")]) == 2
    err = capsys.readouterr().err
    assert "patchcore-resnet18: no folds" in err and "make zoo MODEL=patchcore-resnet18 FOLD=all" in err


# ------------------------------------------------------------------------------------ auto: the best blend by nested CV

def test_auto_matches_a_strong_model_among_noise():
    folds = make_folds()
    models = [make_model("strong", folds, TEST_LABELS, 2.5, 0), make_model("noise_a", folds, TEST_LABELS, 0.0, 1),
              make_model("noise_b", folds, TEST_LABELS, 0.0, 2)]
    oof, test = level2_features(models, "rank", folds)
    result = stack(oof, test, EnsembleConfig(method="auto", prior="train"))
    strong = cross_validation_scores(oof["label"], oof["strong"], oof["fold"])["oof_macro_f1"]
    auto = result.stacker["auto"]
    assert set(auto["candidates"]) == {"best_single", "mean", "rank_blend", "logistic"}
    assert auto["chosen"] != "mean"  # the noise is left out or weighed down, never averaged in
    weights = result.stacker.get("weights") or result.stacker["coefficients_on_standardised_features"]
    assert weights["strong"] > 5 * max(abs(weights["noise_a"]), abs(weights["noise_b"]))
    assert result.cv["oof_macro_f1"] >= strong - 0.03  # honest nested score, within noise of the member
    assert result.stacker["marginal_gain"]["strong"] > 0.1
    assert result.stacker["rank_correlation"]["strong"]["strong"] == pytest.approx(1.0)


def test_auto_blends_two_complementary_models_beyond_either():
    """Two models of equal strength whose errors are independent: their average beats both."""
    folds = make_folds()
    models = [make_model("left", folds, TEST_LABELS, 1.3, 10), make_model("right", folds, TEST_LABELS, 1.3, 20)]
    oof, test = level2_features(models, "rank", folds)
    result = stack(oof, test, EnsembleConfig(method="auto", prior="train"))
    singles = [cross_validation_scores(oof["label"], oof[m], oof["fold"])["oof_macro_f1"] for m in ("left", "right")]
    assert result.stacker["auto"]["chosen"] != "best_single"
    assert result.cv["oof_macro_f1"] > max(singles) + 0.03
    assert min(result.stacker["marginal_gain"].values()) > 0  # each earns its place


def test_auto_keeps_the_best_member_when_a_blend_wins_by_less_than_auto_tolerance():
    """`ensemble.auto_tolerance` reaches the choice: a blend's margin over the best member, just under the
    tolerance, submits the member alone; the outer folds' choices honour it too; the record names it."""
    folds = make_folds()
    models = [make_model("left", folds, TEST_LABELS, 1.3, 10), make_model("right", folds, TEST_LABELS, 1.3, 20)]
    oof, test = level2_features(models, "rank", folds)
    table = stack(oof, test, EnsembleConfig(method="auto", prior="train", auto_tolerance=0.0)).stacker["auto"]
    margin = max(row["expected_macro_f1"] for row in table["candidates"].values()) \
        - table["candidates"]["best_single"]["expected_macro_f1"]
    assert table["chosen"] != "best_single" and margin > 0
    kept = stack(oof, test, EnsembleConfig(method="auto", prior="train", auto_tolerance=margin + 1e-6)).stacker
    assert kept["auto"]["chosen"] == "best_single" and kept["auto"]["tolerance"] == pytest.approx(margin + 1e-6)
    every_fold = stack(oof, test, EnsembleConfig(method="auto", prior="train", auto_tolerance=0.99)).stacker["auto"]
    assert set(every_fold["chosen_per_fold"].values()) == {"best_single"}  # the outer folds' choices honour it too
    with pytest.raises(ValueError, match="auto_tolerance"):
        EnsembleConfig(auto_tolerance=-0.01)


def test_auto_scores_of_a_fold_do_not_move_when_its_labels_change():
    """The memoriser check extended to auto: fold k's honest score comes from a choice and a fit made on the
    other folds only, so flipping fold k's labels leaves it bitwise the same."""
    oof, test = _features()
    base = stack(oof, test, EnsembleConfig(method="auto", prior="train")).oof["auto_score"].to_numpy()
    folds = oof["fold"].to_numpy()
    for k in (0, 2):
        flipped = oof.assign(label=np.where(folds == k, 1 - oof["label"], oof["label"]))
        scores = stack(flipped, test, EnsembleConfig(method="auto", prior="train")).oof["auto_score"].to_numpy()
        np.testing.assert_array_equal(scores[folds == k], base[folds == k])
        assert not np.allclose(scores[folds != k], base[folds != k])  # the other folds did see fold k's labels


def test_auto_on_two_folds_chooses_once_and_says_its_cv_is_not_nested():
    """Two folds leave no inner folds to choose on: auto picks on both, as the submission does, and the record says
    so instead of failing."""
    folds = make_folds(n_splits=2)
    models = [make_model("left", folds, TEST_LABELS, 1.3, 10), make_model("right", folds, TEST_LABELS, 1.3, 20)]
    oof, test = level2_features(models, "rank", folds)
    result = stack(oof, test, EnsembleConfig(method="auto", prior="train"))
    auto = result.stacker["auto"]
    assert auto["nested_choice"] is False and set(auto["chosen_per_fold"].values()) == {auto["chosen"]}
    np.testing.assert_array_equal(result.oof["auto_score"], result.oof["score"])
    nested = stack(oof.assign(fold=make_folds(n_splits=4)["fold"]), test, EnsembleConfig(method="auto", prior="train"))
    assert nested.stacker["auto"]["nested_choice"] is True


def test_bagged_selection_spreads_weight_over_equal_models_and_is_reproducible():
    oof, _ = _features()
    X, y = oof[["good", "weak", "noise"]].to_numpy(), oof["label"].to_numpy()
    bagged = RankBlend(rounds=20, bags=10, bag_fraction=0.5, random_state=1).fit(X, y)
    again = RankBlend(rounds=20, bags=10, bag_fraction=0.5, random_state=1).fit(X, y)
    np.testing.assert_array_equal(bagged.weights_, again.weights_)
    assert bagged.weights_.sum() == pytest.approx(1.0)
    assert bagged.weights_[0] == bagged.weights_.max()  # the good model still weighs most
    assert np.count_nonzero(bagged.weights_) >= 2  # bags without it use the next best


def test_choose_candidate_keeps_the_simpler_blend_on_ties_and_within_a_tolerance():
    table = {"best_single": {"expected_macro_f1": 0.80}, "mean": {"expected_macro_f1": 0.80},
             "rank_blend": {"expected_macro_f1": 0.81}, "logistic": {"expected_macro_f1": 0.81}}
    assert choose_candidate(table) == "rank_blend"  # the tie with logistic goes to the simpler one
    table["rank_blend"]["expected_macro_f1"] = table["logistic"]["expected_macro_f1"] = 0.804
    assert choose_candidate(table) == "rank_blend"
    assert choose_candidate(table, tolerance=0.005) == "best_single"


def test_auto_judges_candidates_by_the_threshold_rules_macro_f1():
    """With `smoothed` the choice compares the smoothed curve's best macro-F1 of each candidate's nested scores,
    with `plateau` the best step of the empirical curve (the earlier behaviour)."""
    folds = make_folds()
    models = [make_model("left", folds, TEST_LABELS, 1.3, 10), make_model("right", folds, TEST_LABELS, 1.3, 20)]
    oof, _ = level2_features(models, "rank", folds)
    X, y, k = oof[["left", "right"]].to_numpy(), oof["label"].to_numpy(), oof["fold"].to_numpy()
    for rule in ("smoothed", "plateau"):
        table, scores = candidate_scores(EnsembleConfig(method="auto", threshold_rule=rule), X, y, k)
        for name, row in table.items():
            assert row["expected_macro_f1"] == pytest.approx(threshold_by_rule(y, scores[name], rule)[1])
            assert row["oof_macro_f1"] == pytest.approx(best_threshold(y, scores[name])[1])
