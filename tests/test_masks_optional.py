"""Masks are optional: a dataset without train/defect_masks/, or with masks for some defects only, is
checked with warnings, trains end to end on configs/quick.yaml, and uses the masks that exist."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from competition.artifacts import read_json, run_dir
from competition.classifier.data import DEFECT, ImageStore, TrainDataset, fold_rows
from competition.cli import main as cli_main
from competition.config import load_config
from competition.data.check import check_dataset, format_report
from competition.folds import read_folds, write_folds


def _copy(tiny_data, tmp_path, keep_masks: int | None):
    """The tiny set with `keep_masks` of its masks (None: no defect_masks folder at all)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    masks = sorted((data / "train" / "defect_masks").iterdir())
    if keep_masks is None:
        shutil.rmtree(data / "train" / "defect_masks")
    else:
        for mask in masks[keep_masks:]:
            mask.unlink()
    return data, len(masks)


def test_check_data_warns_about_missing_masks_and_counts_them(tiny_data, tmp_path):
    data, n_defects = _copy(tiny_data, tmp_path / "none", None)
    report = check_dataset(data, progress=False)
    assert report.ok and report.counts["defects with a mask"] == 0
    assert any("no train/defect_masks/" in w and "image labels only" in w for w in report.warnings)
    assert "OK: no problems" in format_report(report)

    data, _ = _copy(tiny_data, tmp_path / "some", 5)
    report = check_dataset(data, progress=False)
    assert report.ok and report.counts["defects with a mask"] == 5
    assert any(f"{n_defects - 5} of {n_defects} defect image(s) without a mask" in w for w in report.warnings)


def test_partly_masked_defects_train_the_mask_head_only_where_a_mask_exists(tiny_data, tmp_path):
    data, _ = _copy(tiny_data, tmp_path, 5)
    cfg = load_config(ROOT / "configs" / "quick.yaml",
                      [f"paths.data={data}", f"paths.work={tmp_path / 'runs'}", "positives.ratio=0.5",
                       "positives.kinds=[transplant]"])
    write_folds(cfg)
    train_rows, val_rows = fold_rows(read_folds(cfg), 0)
    masked = set(train_rows.loc[(train_rows["label"] == 1) & (train_rows["mask_path"] != ""), "path"])
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size), with_masks=True)
    assert set(dataset.defect_bank.source_ids) == masked and dataset.kinds == ["transplant"]
    for position in np.flatnonzero(dataset.plan_source == DEFECT):
        item = dataset[int(position)]
        path = dataset.paths[dataset.plan_row[position]]
        assert bool(item["has_mask"]) == (path in masked)  # no mask: its mask loss is masked out


@pytest.mark.slow
def test_a_dataset_without_masks_trains_end_to_end_on_quick(tiny_data, tmp_path):
    data, _ = _copy(tiny_data, tmp_path, None)
    args = ["--config", str(ROOT / "configs" / "quick.yaml"), "--set", f"paths.data={data}",
            "--set", f"paths.work={tmp_path / 'runs'}", "--set", "train.threads=1",
            "--set", "mask_head.enabled=true", "--set", "positives.kinds=[scratch, transplant, nsa]"]
    assert cli_main(["check-data", "--data", str(data)]) == 0
    assert cli_main(["folds", *args]) == 0
    assert cli_main(["train", *args, "--fold", "0"]) == 0
    assert cli_main(["zoo", *args, "--model", "padim-resnet18", "--fold", "0"]) == 0

    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"paths.data={data}", f"paths.work={tmp_path / 'runs'}"])
    fold0 = read_folds(cfg).query("fold == 0")
    for name in (cfg.model.name, "padim-resnet18"):
        oof = pd.read_csv(run_dir(cfg.paths.work, cfg.experiment, name, 0) / "oof.csv", dtype={"image_id": str})
        assert sorted(oof["image_id"]) == sorted(fold0["image_id"]) and np.isfinite(oof["score"]).all()
    summary = read_json(run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, 0) / "summary.json")
    assert "transplant has no masked defect to move; scratch, nsa stand in" in summary["samples_per_epoch"]
