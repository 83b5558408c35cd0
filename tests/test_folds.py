"""Folds: stratified, grouped, deterministic, and refused when the dataset changed."""
import shutil

import pandas as pd
import pytest
from conftest import quick_config

from competition.folds import StaleFoldsError, make_folds, parse_fold_arg, read_folds, write_folds


def fake_train(n_normal=90, n_defect=15, groups=None):
    ids = [f"img{i:03d}" for i in range(n_normal + n_defect)]
    return pd.DataFrame({
        "image_id": ids,
        "label": pd.array([0] * n_normal + [1] * n_defect, dtype="Int64"),
        "group": groups if groups is not None else ids,
    })


def test_folds_are_stratified_and_deterministic():
    train = fake_train()
    folds = make_folds(train, n_splits=5, seed=3)
    assert list(folds.columns) == ["image_id", "label", "group", "fold"]
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (folds.groupby("fold")["label"].sum() == 3).all()  # 15 defects / 5 folds
    assert (folds.groupby("fold").size() == 21).all()
    assert folds.equals(make_folds(train, n_splits=5, seed=3))
    assert not folds["fold"].equals(make_folds(train, n_splits=5, seed=4)["fold"])


def test_groups_never_straddle_folds():
    groups = [f"g{i // 3}" for i in range(105)]  # triplets of images from one part
    folds = make_folds(fake_train(groups=groups), n_splits=5, seed=0)
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert (folds.groupby("fold")["label"].sum() > 0).all()


def test_too_few_defects_for_the_fold_count():
    with pytest.raises(ValueError, match="at least 5 defect images .* found 3. Set folds.n_splits=3"):
        make_folds(fake_train(n_defect=3), n_splits=5, seed=0)


def test_parse_fold_arg():
    assert parse_fold_arg("all", 3) == [0, 1, 2]
    assert parse_fold_arg("2", 3) == [2]
    with pytest.raises(ValueError, match="out of range"):
        parse_fold_arg("3", 3)
    with pytest.raises(ValueError, match="'all'"):
        parse_fold_arg("x", 3)


def test_folds_on_tiny_dataset_cover_every_labeled_image(tiny_cfg):
    folds = read_folds(tiny_cfg)
    assert folds["fold"].between(0, tiny_cfg.folds.n_splits - 1).all()
    assert (folds.groupby("fold")["label"].sum() > 0).all()
    assert folds["label"].notna().all() and (folds["split"] == "train").all()


def test_stale_folds_are_refused(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cfg = quick_config(data, tmp_path)
    with pytest.raises(StaleFoldsError, match="make folds"):
        read_folds(cfg)  # never written
    write_folds(cfg)
    read_folds(cfg)
    with pytest.raises(StaleFoldsError, match="folds"):
        read_folds(quick_config(data, tmp_path, "folds.n_splits=4"))
    with pytest.raises(StaleFoldsError, match="seed"):
        read_folds(quick_config(data, tmp_path, "seed=1"))
    # a new normal image appears: the dataset changed
    normals = sorted((data / "train" / "normal_images").iterdir())
    shutil.copy(normals[0], normals[0].with_name("zz_extra.png"))
    with pytest.raises(StaleFoldsError, match="changed"):
        read_folds(cfg)
    write_folds(cfg)
    assert "normal_images/zz_extra.png" in set(read_folds(cfg)["image_id"])


def test_ids_read_back_exactly_as_written(tiny_data, tmp_path):
    # "NA" and leading zeros are ids, not a missing value or a number.
    from competition.folds import load_index

    cfg = quick_config(tiny_data, tmp_path)
    index = load_index(cfg)
    train_rows = index.index[index["split"] == "train"]
    index.loc[train_rows[0], ["image_id", "group"]] = ["NA", "NA"]
    index.loc[train_rows[1], ["image_id", "group"]] = ["0012", "0012"]
    write_folds(cfg, index)
    folds = read_folds(cfg, index)
    assert {"NA", "0012"} <= set(folds["image_id"])
    assert folds["fold"].notna().all()
