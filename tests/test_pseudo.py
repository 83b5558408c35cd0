"""Pseudo-labels: the pick from a first round's stacked test scores, and a second round's folds that train
on them. They are test images only: never a validation-fold image, never an out-of-fold score, and a
changed pick makes the second round's folds stale."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import config_with_folds, quick_config
from PIL import Image

from competition.artifacts import pseudo_labels_path, read_json, run_dir, write_csv
from competition.config import ConfigError, load_config
from competition.ensemble.infer import ENSEMBLE_DIR
from competition.folds import PSEUDO_FOLD, StaleFoldsError, load_index, read_folds, training_folds
from competition.pseudo import main as pseudo_main
from competition.pseudo import select_pseudo_labels
from competition.run import build_jobs
from competition.stage import ConfigChangedError

SECOND_ROUND = ["experiment=round2", "pseudo.enabled=true", "pseudo.source=round1"]
TINY_MODEL = ["model.name=test_efficientnet", "model.image_size=32", "train.batch_size=8", "train.threads=1",
              "train.epochs=1", "positives.ratio=0.25", "zoo.image_size=32", "zoo.batch_size=16",
              "zoo.gallery_size=0", "zoo.painted_per_fold=0"]


def _stacked(ids, scores, threshold):
    scores = np.asarray(scores, float)
    return pd.DataFrame({"image_id": ids, "score": scores, "answer": (scores >= threshold).astype(int)})


def test_the_pick_takes_the_most_confident_share_of_each_predicted_side():
    test = _stacked([f"t{i}" for i in range(10)], [0.1, 0.9, 0.2, 0.3, 0.95, 0.05, 0.6, 0.4, 0.8, 0.7], 0.55)
    picked = select_pseudo_labels(test, normal_share=0.5, defect_share=0.4)
    # predicted normal: t5 .05, t0 .1, t2 .2, t3 .3, t7 .4 -> the lowest half (2 of 5); defects: t4, t1 of 5
    assert picked.to_dict("list") == {"image_id": ["t5", "t0", "t4", "t1"], "label": [0, 0, 1, 1],
                                      "score": [0.05, 0.1, 0.95, 0.9]}
    assert select_pseudo_labels(test, 0.0, 0.0).empty
    everything = select_pseudo_labels(test, 1.0, 1.0)
    assert sorted(everything["image_id"]) == sorted(test["image_id"])
    assert everything.set_index("image_id")["label"].sort_index().eq(test.set_index("image_id")["answer"]).all()


def test_ties_are_broken_by_image_id_whatever_the_input_order():
    test = _stacked(["b", "a", "d", "c"], [0.1, 0.1, 0.9, 0.9], 0.5)
    first = select_pseudo_labels(test, 0.5, 0.5)
    again = select_pseudo_labels(test.iloc[::-1], 0.5, 0.5)
    assert first.equals(again) and list(first["image_id"]) == ["a", "d"]


def test_the_config_needs_a_source_other_than_the_experiment_itself():
    with pytest.raises(ConfigError, match="enabled needs source"):
        load_config(None, ["pseudo.enabled=true"])
    with pytest.raises(ConfigError, match="needs its own experiment name"):
        load_config(None, ["pseudo.enabled=true", "pseudo.source=default"])
    with pytest.raises(ConfigError, match=r"normal_share must be in \[0, 1\]"):
        load_config(None, ["pseudo.normal_share=1.5"])


def _first_round(cfg, defect_ids) -> None:
    """A finished first round's stacker output: every test image scored, `defect_ids` above the threshold."""
    test_ids = load_index(cfg).query("split == 'test'")["image_id"].astype(str).tolist()
    rng = np.random.default_rng(0)
    scores = np.where(np.isin(test_ids, defect_ids), rng.uniform(0.6, 1.0, len(test_ids)),
                      rng.uniform(0.0, 0.4, len(test_ids)))
    write_csv(_stacked(test_ids, scores, 0.5), f"{cfg.paths.work}/round1/{ENSEMBLE_DIR}/test.csv")


@pytest.fixture
def second_round(tiny_data, tmp_path):
    cfg = config_with_folds(tiny_data, tmp_path, *TINY_MODEL, *SECOND_ROUND)
    index = load_index(cfg)
    test = index[index["split"] == "test"]
    _first_round(cfg, test.loc[test["label"] == 1, "image_id"].astype(str).tolist() if test["label"].notna().any()
                 else test["image_id"].astype(str).tolist()[:4])
    return cfg


def test_the_stage_writes_test_images_only_and_the_folds_train_on_them_in_no_validation_fold(second_round):
    cfg = second_round
    with pytest.raises(StaleFoldsError, match=r"make pseudo"):
        training_folds(cfg, load_index(cfg))
    pseudo_main(cfg)
    labels = pd.read_csv(pseudo_labels_path(cfg.paths.work, cfg.experiment), dtype={"image_id": str})
    record = read_json(pseudo_labels_path(cfg.paths.work, cfg.experiment).with_suffix(".json"))
    assert record["source"] == "round1" and record["n_normal"] + record["n_defect"] == len(labels) > 0
    assert set(labels["label"]) == {0, 1}
    index = load_index(cfg)
    test_ids = set(index.loc[index["split"] == "test", "image_id"].astype(str))
    assert set(labels["image_id"]) <= test_ids

    plain, folds = read_folds(cfg, index), training_folds(cfg, index)
    added = folds[folds["fold"] == PSEUDO_FOLD]
    assert len(folds) == len(plain) + len(labels)
    assert sorted(added["image_id"]) == sorted(labels["image_id"])
    assert (added["mask_path"] == "").all()  # weak labels: a pseudo defect has no mask
    assert not set(added["image_id"]) & set(plain["image_id"])
    for k in range(cfg.folds.n_splits):  # every validation fold is the plain fold, every training set has them
        assert folds.loc[folds["fold"] == k, "image_id"].tolist() == plain.loc[plain["fold"] == k, "image_id"].tolist()
        assert set(added["image_id"]) <= set(folds.loc[folds["fold"] != k, "image_id"])

    # a pick of a non-test image is refused
    write_csv(pd.DataFrame({"image_id": [plain["image_id"].iloc[0]], "label": [0], "score": [0.0]}),
              pseudo_labels_path(cfg.paths.work, cfg.experiment))
    with pytest.raises(StaleFoldsError, match="not test images"):
        training_folds(cfg, index)


def test_second_round_folds_score_only_their_validation_images_and_go_stale_when_the_pick_changes(second_round,
                                                                                                  capsys):
    from competition.classifier.train import main as train_main
    from competition.classifier.train import run_config
    from competition.zoo.runner import main as zoo_main
    from competition.zoo.runner import zoo_record

    cfg = second_round
    path = pseudo_labels_path(cfg.paths.work, cfg.experiment)
    pseudo_main(cfg)
    labels = pd.read_csv(path, dtype={"image_id": str})
    val = read_folds(cfg).query("fold == 0")
    train_main(cfg, fold="0")
    normals = set(labels.loc[labels["label"] == 0, "image_id"])
    n_normal = int((read_folds(cfg).query("fold != 0")["label"] == 0).sum()) + len(normals)
    printed = capsys.readouterr().out
    assert f"training on {n_normal} normals" in printed  # the classifier's epoch shows every pseudo normal
    assert f"(with {len(normals)} pseudo-normal and {len(labels) - len(normals)} pseudo-defect test images)" in printed
    zoo_main(cfg, model="padim-resnet18", fold="0", force=False)
    for model in (cfg.model.name, "padim-resnet18"):
        oof = pd.read_csv(run_dir(cfg.paths.work, cfg.experiment, model, 0) / "oof.csv", dtype={"image_id": str})
        assert sorted(oof["image_id"]) == sorted(val["image_id"])  # no pseudo-labelled image is scored out of fold
    assert "pseudo_csv" in run_config(cfg)["inputs"] and "pseudo_csv" in zoo_record(cfg, "padim-resnet18")["inputs"]
    fit = pd.read_csv(run_dir(cfg.paths.work, cfg.experiment, "padim-resnet18", 0) / "fit_images.csv",
                      dtype={"image_id": str})
    assert normals <= set(fit["image_id"])  # the zoo fits on the pseudo normals too
    assert not set(labels.loc[labels["label"] == 1, "image_id"]) & set(fit["image_id"])

    # another pick under the same config is another input: the finished folds are refused, not reused
    write_csv(labels.iloc[1:], path)
    with pytest.raises(ConfigChangedError, match="pseudo_csv"):
        zoo_main(cfg, model="padim-resnet18", fold="0", force=False)
    with pytest.raises(ConfigChangedError, match="pseudo_csv"):
        train_main(cfg, fold="0")


def test_the_run_graph_picks_pseudo_labels_before_any_model_trains(second_round):
    jobs = {job.name: job for job in build_jobs(second_round, ["--set", "x=y"])}
    assert jobs["pseudo"].after == ("folds",) and jobs["pseudo"].argv[0] == "pseudo"
    for name, job in jobs.items():
        if job.stage in ("train", "zoo"):
            assert "pseudo" in job.after, name
    plain = load_config(None, [])
    assert "pseudo" not in {job.name for job in build_jobs(plain, [])}


def test_pseudo_masks_keep_the_pixels_the_map_puts_at_or_above_the_threshold(tmp_path):
    from competition.pseudo import write_pseudo_masks

    paths = []
    for name in ("a", "b"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(paths[-1])

    def probability(path, image):
        heat = np.zeros(image.shape[:2], np.float32)
        if path.endswith("a.png"):
            heat[3:6, 10:15] = 0.3  # the map's peak: a defect here, however low the map's own level
            heat[0, 0] = 0.1  # under half the peak
        return heat

    written = write_pseudo_masks(["a", "b"], paths, probability, 0.5, tmp_path / "masks")
    assert list(written) == ["a"]  # b's map is zero everywhere: it stays a weak label
    mask = np.asarray(Image.open(written["a"]))
    expected = np.zeros((12, 20), np.uint8)
    expected[3:6, 10:15] = 255
    np.testing.assert_array_equal(mask, expected)


def test_masked_pseudo_defects_reach_the_training_folds_with_their_masks(second_round):
    from competition.classifier.train import main as train_main

    data, work = Path(second_round.paths.data), Path(second_round.paths.work).parent
    train_main(quick_config(data, work, *TINY_MODEL, "experiment=round1"), fold="all")  # the source's classifier,
    # mask head on: it draws the masks
    cfg = quick_config(data, work, *TINY_MODEL, *SECOND_ROUND, "pseudo.masks=true", "pseudo.mask_threshold=0")
    pseudo_main(cfg)  # threshold 0: every pixel of every pseudo defect (with a map above 0) is in its mask
    labels = pd.read_csv(pseudo_labels_path(cfg.paths.work, cfg.experiment), dtype={"image_id": str},
                         keep_default_na=False)
    defects, normals = labels[labels["label"] == 1], labels[labels["label"] == 0]
    assert len(defects) and (defects["mask_path"] != "").all() and (defects["mask_sha1"] != "").all()
    assert (normals["mask_path"] == "").all()
    index = load_index(cfg).set_index("image_id")
    for row in defects.itertuples():
        mask = np.asarray(Image.open(row.mask_path))
        assert mask.shape == np.asarray(Image.open(index.loc[row.image_id, "path"])).shape[:2] and mask.min() == 255
    folds = training_folds(cfg, load_index(cfg))
    added = folds[folds["fold"] == PSEUDO_FOLD].set_index("image_id")
    assert (added.loc[defects["image_id"], "mask_path"] == defects["mask_path"].to_numpy()).all()
    assert read_json(pseudo_labels_path(cfg.paths.work, cfg.experiment).with_suffix(".json"))["n_defect_masks"] == \
        len(defects)



def test_a_second_round_whose_zoo_ignores_the_pick_copies_the_first_rounds_folds(second_round, tiny_data, tmp_path):
    from competition.zoo.runner import main as zoo_main
    from competition.zoo.runner import zoo_record

    first = quick_config(tiny_data, tmp_path, *TINY_MODEL, "experiment=round1")
    zoo_main(first, model="padim-resnet18", fold="0", force=False)
    source = run_dir(first.paths.work, "round1", "padim-resnet18", 0)

    cfg = quick_config(tiny_data, tmp_path, *TINY_MODEL, *SECOND_ROUND, "pseudo.zoo=false")
    pseudo_main(cfg)
    labels = pd.read_csv(pseudo_labels_path(cfg.paths.work, cfg.experiment), dtype={"image_id": str})
    assert (labels["label"] == 0).any()
    assert zoo_record(cfg, "padim-resnet18") == zoo_record(first, "padim-resnet18")  # no pseudo in the record
    assert len(training_folds(cfg, load_index(cfg), pseudo=False)) == len(read_folds(cfg))

    zoo_main(cfg, model="padim-resnet18", fold="0", force=False)
    copied = run_dir(cfg.paths.work, cfg.experiment, "padim-resnet18", 0)
    for name in ("oof.csv", "test.csv", "fit_images.csv", "summary.json"):
        assert (copied / name).read_bytes() == (source / name).read_bytes(), name
    assert not copied.with_name("fold0.copying").exists()
    # fold 1 has no finished source fold: it is fitted, on the training folds' images alone
    zoo_main(cfg, model="padim-resnet18", fold="1", force=False)
    fit = pd.read_csv(run_dir(cfg.paths.work, cfg.experiment, "padim-resnet18", 1) / "fit_images.csv",
                      dtype={"image_id": str})
    assert len(fit) and not set(labels["image_id"]) & set(fit["image_id"])
    # a source fold fitted with another config is another fit: not copied
    other = quick_config(tiny_data, tmp_path, *TINY_MODEL, "experiment=round3", "pseudo.enabled=true",
                         "pseudo.source=round1", "pseudo.zoo=false", "zoo.image_size=48")
    zoo_main(other, model="padim-resnet18", fold="0", force=False)
    summary = read_json(run_dir(other.paths.work, "round3", "padim-resnet18", 0) / "summary.json")
    assert summary["config"]["zoo"]["image_size"] == 48
