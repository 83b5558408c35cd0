"""`predict` reproduces the submission from the trained fold models, survives bad images and refuses a
missing or stale experiment before scoring anything."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import config_with_folds
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from competition.cli import main as cli_main
from competition.ensemble.stacking import MeanBlend, RankBlend, form_scores, stacker_form, stacker_scores
from competition.predict import ExperimentNotReadyError, expand_images, predict

OVERRIDES = ("train.epochs=1", "folds.n_splits=2", "zoo.models=[padim-resnet18]", "zoo.gallery_size=0")


@pytest.fixture(scope="module")
def experiment(tiny_data, tmp_path_factory):
    """A finished tiny experiment: classifier and PaDiM on 2 folds, stacked into submission.csv."""
    from competition.classifier.train import main as train_main
    from competition.ensemble.infer import main as infer_main
    from competition.zoo.runner import main as zoo_main

    work = tmp_path_factory.mktemp("predict_experiment")
    cfg = config_with_folds(tiny_data, work, *OVERRIDES)
    train_main(cfg, "all")
    zoo_main(cfg, None, "all", False)
    infer_main(cfg)
    return cfg


def cli_args(cfg) -> list[str]:
    return ["--config", "configs/quick.yaml", "--set", f"paths.data={cfg.paths.data}",
            "--set", f"paths.work={cfg.paths.work}", "--set", f"paths.submissions={cfg.paths.submissions}",
            *[x for o in OVERRIDES for x in ("--set", o)]]


def test_predict_on_the_test_images_reproduces_the_submission(experiment, tmp_path):
    from competition.folds import load_index

    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", *cli_args(experiment), "--images", f"{experiment.paths.data}/test/images",
                     "--out", str(out), "--chunk", "7"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    index = load_index(experiment)
    table["image_id"] = table["path"].map(dict(zip(index["path"].astype(str), index["image_id"].astype(str))))
    submission = pd.read_csv(Path(experiment.paths.submissions) / "submission.csv", dtype=str).rename(
        columns={"answer": "submitted"})
    stacked = pd.read_csv(Path(experiment.paths.work) / experiment.experiment / "_ensemble" / "test.csv",
                          dtype={"image_id": str})
    assert len(table) == len(submission)
    merged = submission.merge(table, left_on="ImageId", right_on="image_id").merge(stacked, on="image_id",
                                                                                  suffixes=("", "_infer"))
    assert len(merged) == len(submission)
    assert (merged["answer"].astype(int) == merged["submitted"].astype(int)).all()
    assert (merged["answer"].astype(int) == merged["answer_infer"]).all()
    np.testing.assert_allclose(merged["score"].astype(float), merged["score_infer"], atol=1e-6, rtol=0)
    for model in ("efficientnet_b0", "padim-resnet18"):
        np.testing.assert_allclose(merged[model].astype(float), merged[f"{model}_infer"], atol=1e-6, rtol=0)


def test_unreadable_images_get_an_error_row_and_the_rest_are_scored(experiment, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    good = sorted((Path(experiment.paths.data) / "test" / "images").glob("*.png"))[:3]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    out = tmp_path / "out.csv"
    code = cli_main(["predict", *cli_args(experiment), "--images", str(folder), "--out", str(out)])
    assert code == 1
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert len(table) == 5
    for name in ("broken.png", "truncated.png"):
        row = table.loc[str(folder / name)]
        assert row["score"] == "" and row["answer"] == "" and name in row["error"]
    scored = table[table["error"] == ""]
    assert len(scored) == 3 and scored["score"].astype(float).between(0, 1).all()


def test_maps_are_drawn_for_the_images_predicted_defective(experiment, tmp_path):
    image = sorted((Path(experiment.paths.data) / "test" / "images").glob("*.png"))[:2]
    table = predict(experiment, [str(p) for p in image], tmp_path / "out.csv", tmp_path / "maps", threshold=-1.0)
    assert (table["answer"] == 1).all()
    assert sorted(Path(p).name for p in table["map"]) == sorted(p.name for p in image)
    assert all(Path(p).is_file() for p in table["map"])


def test_a_missing_fold_model_stops_before_scoring_naming_it_and_its_command(experiment, tmp_path):
    model_file = Path(experiment.paths.work) / experiment.experiment / "padim-resnet18" / "fold1" / "model.pt"
    moved = tmp_path / "model.pt"
    shutil.move(model_file, moved)
    try:
        with pytest.raises(ExperimentNotReadyError, match="make zoo MODEL=padim-resnet18 FOLD=1") as error:
            predict(experiment, [str(experiment.paths.data)], tmp_path / "out.csv")
        assert str(model_file) in str(error.value)
        assert not (tmp_path / "out.csv").exists()
    finally:
        shutil.move(moved, model_file)


def test_a_fold_changed_after_infer_is_refused(experiment, tmp_path):
    test_csv = Path(experiment.paths.work) / experiment.experiment / "efficientnet_b0" / "fold0" / "test.csv"
    original = test_csv.read_bytes()
    test_csv.write_bytes(original.replace(b"0.", b"0.9", 1))
    try:
        with pytest.raises(ExperimentNotReadyError, match="re-run make infer"):
            predict(experiment, [str(experiment.paths.data)], tmp_path / "out.csv")
    finally:
        test_csv.write_bytes(original)


def test_predict_without_an_ensemble_says_to_run_infer(tiny_data, tmp_path):
    cfg = config_with_folds(tiny_data, tmp_path)
    with pytest.raises(ExperimentNotReadyError, match="make infer"):
        predict(cfg, [str(tiny_data)], tmp_path / "out.csv")


def test_expand_images_takes_files_folders_and_globs(tiny_data):
    images = tiny_data / "test" / "images"
    every = expand_images([str(images)])
    assert every == sorted(every) and len(every) == len(list(images.glob("*.png")))
    assert expand_images([str(images / "*.png"), every[0]]) == every  # duplicates dropped
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_images([str(images / "nothing_here_*.png")])


@pytest.mark.parametrize("stacker", [make_pipeline(StandardScaler(), LogisticRegression()), RankBlend(rounds=5),
                                     MeanBlend()])
def test_the_stacker_form_reproduces_the_fitted_stacker(stacker):
    rng = np.random.default_rng(0)
    X = rng.random((60, 3))
    y = (X[:, 0] + 0.3 * rng.random(60) > 0.7).astype(int)
    fitted = stacker.fit(X, y)
    form = stacker_form(fitted, ["a", "b", "c"])
    X_new = rng.random((20, 3))
    np.testing.assert_allclose(form_scores(form, X_new), stacker_scores(fitted, X_new), atol=1e-12)


def test_a_stacker_without_a_plain_form_has_none():
    from sklearn.ensemble import RandomForestClassifier

    fitted = RandomForestClassifier(n_estimators=3, random_state=0).fit([[0.0], [1.0]], [0, 1])
    assert stacker_form(fitted, ["a"]) is None


def test_predict_through_the_onnx_graphs_agrees_with_torch(experiment, tmp_path):
    from competition.export import main as export_main

    assert export_main(experiment, "onnx") == 0
    images = [f"{experiment.paths.data}/test/images"]
    eager = predict(experiment, images, tmp_path / "torch.csv")
    graphs = predict(experiment, images, tmp_path / "onnx.csv", runtime="onnxruntime")
    assert (eager["answer"] == graphs["answer"]).all()
    np.testing.assert_allclose(graphs["score"], eager["score"], atol=1e-3)
