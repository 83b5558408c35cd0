"""The classifier's fold on tiny data: outputs, resume equivalence, the tie rule in the loop, early
stopping, the stage rules (skip, refuse a changed config, neutral keys, --force), and the mask head
learning from real and painted masks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import config_with_folds

import competition.classifier.train as train_module
import competition.training as training_module
from competition.artifacts import load_checkpoint, read_json, run_dir
from competition.classifier.data import DEFECT, PAINTED, ImageStore, TrainDataset, fold_rows
from competition.classifier.model import build_classifier, pool_top_share
from competition.classifier.train import mask_loss, train_fold
from competition.folds import load_index, read_folds

TINY_MODEL = ["model.name=test_efficientnet", "model.image_size=32", "train.batch_size=8", "train.threads=1",
              "positives.ratio=0.25", "oversample.defect_ratio=0.5"]


@pytest.fixture
def cfg_factory(tiny_data, tmp_path):
    return lambda name, *overrides: config_with_folds(tiny_data, tmp_path / name, *TINY_MODEL, *overrides)


def _train(cfg, fold: int = 0, force: bool = False):
    index = load_index(cfg)
    return train_fold(cfg, fold, read_folds(cfg, index), index[index["split"] == "test"], ImageStore(32),
                      torch.device("cpu"), force=force)


def _out(cfg, fold: int = 0):
    return run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)


def test_a_fold_writes_every_output(cfg_factory):
    cfg = cfg_factory("run", "train.epochs=2")
    summary = _train(cfg)
    out = _out(cfg)
    for name in ("oof.csv", "test.csv", "history.csv", "summary.json", "config.yaml", "best.pt", "last.pt",
                 "curves.png", "roc_pr.png", "confusion.png"):
        assert (out / name).is_file(), name
    folds, index = read_folds(cfg), load_index(cfg)
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    test = pd.read_csv(out / "test.csv", dtype={"image_id": str})
    val = folds[folds["fold"] == 0]
    assert list(oof.columns) == ["image_id", "label", "score"] and list(test.columns) == ["image_id", "score"]
    assert sorted(oof["image_id"]) == sorted(val["image_id"])
    assert list(test["image_id"]) == list(index.loc[index["split"] == "test", "image_id"])
    assert oof["score"].between(0, 1).all() and test["score"].between(0, 1).all()
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]  # counted from 1, as printed
    for column in ("train_loss", "val_loss", "val_accuracy", "val_auroc", "val_macro_f1", "val_macro_f1_at_05",
                   "val_threshold", "best_changed"):
        assert column in history
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == summary["best_epoch"] == read_json(out / "summary.json")["best_epoch"]
    # oof.csv comes from best.pt: its validation loss is the one recorded for the chosen epoch
    logits = np.log(oof["score"] / (1 - oof["score"]))  # back to logits
    metrics = train_module.validation_metrics(oof["label"].to_numpy(), logits.to_numpy())
    assert metrics["val_loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_oof_csv_is_best_pt_scoring_the_validation_images(cfg_factory, tta):
    """Without TTA oof.csv reuses the best epoch's validation logits; with TTA it scores afresh: either way
    it is what best.pt gives the validation images through the evaluation pipeline."""
    cfg = cfg_factory(f"oof-{tta}", "train.epochs=3", f"train.tta={tta}")
    _train(cfg)
    out = _out(cfg)
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    _, val_rows = fold_rows(read_folds(cfg, load_index(cfg)), 0)
    assert list(oof["image_id"]) == list(val_rows["image_id"].astype(str))
    model = train_module.load_fold_classifier(cfg, out, torch.device("cpu"))
    scores = train_module.image_scores(model, val_rows["path"].astype(str).tolist(), cfg, ImageStore(32),
                                       torch.device("cpu"))
    np.testing.assert_allclose(oof["score"].to_numpy(), scores, rtol=1e-5, atol=1e-7)


def test_finished_fold_is_skipped_unless_forced_and_config_changes_are_refused(cfg_factory):
    cfg = cfg_factory("skip", "train.epochs=1")
    _train(cfg)
    best = _out(cfg) / "best.pt"
    stamp = best.stat().st_mtime_ns
    _train(cfg)
    assert best.stat().st_mtime_ns == stamp
    # speed-only keys are neutral: the finished fold is reused as it is
    _train(cfg_factory("skip", "train.epochs=1", "train.threads=2", "train.cache_images=false",
                       "train.num_workers=0", "oversample.mode=cached", "device=cpu"))
    assert best.stat().st_mtime_ns == stamp
    changed = cfg_factory("skip", "train.epochs=1", "train.lr=0.5", "data.skip_unreadable_train=true")
    with pytest.raises(RuntimeError, match=r"data.skip_unreadable_train: False -> True; train.lr: [0-9.]+ -> 0.5"
                                           r".*--force to retrain this fold, or use another `experiment`"):
        _train(changed)
    _train(changed, force=True)
    assert best.stat().st_mtime_ns != stamp
    assert load_checkpoint(best)["config"]["train"]["lr"] == 0.5


class _Killed(Exception):
    pass


def _kill_after_first_epoch(monkeypatch) -> None:
    real_save = training_module.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if kwargs["epoch"] == 0:
            raise _Killed  # killed right after epoch 1's last.pt
    monkeypatch.setattr(training_module, "save_training_state", save_then_die)


def test_a_resumable_fold_with_a_changed_config_is_refused(cfg_factory, monkeypatch):
    cfg = cfg_factory("killed", "train.epochs=2")
    _kill_after_first_epoch(monkeypatch)
    with pytest.raises(_Killed):
        _train(cfg)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"last.pt was written with another config \(train.grad_clip: [0-9.]+ -> 1.0"
                                           r"\).*--force"):
        _train(cfg_factory("killed", "train.epochs=2", "train.grad_clip=1.0"))
    summary = _train(cfg_factory("killed", "train.epochs=2", "train.threads=2"))  # neutral: resumes
    assert summary["epochs_run"] == 2
    history = pd.read_csv(_out(cfg) / "history.csv")
    assert list(history["epoch"]) == [1, 2]


@pytest.mark.parametrize("extra", [(), ("train.ema=true",)], ids=["plain", "ema"])
def test_resume_after_a_kill_ends_like_an_uninterrupted_run(cfg_factory, monkeypatch, extra):
    overrides = ("train.epochs=3", "seed=5", *extra)
    straight = cfg_factory("straight", *overrides)
    _train(straight)

    resumed = cfg_factory("resumed", *overrides)
    _kill_after_first_epoch(monkeypatch)
    with pytest.raises(_Killed):
        _train(resumed)
    assert not (_out(resumed) / "summary.json").exists()
    monkeypatch.undo()
    torch.manual_seed(1234), np.random.seed(1234)  # a fresh process would have other RNG states
    _train(resumed)

    a, b = load_checkpoint(_out(straight) / "best.pt"), load_checkpoint(_out(resumed) / "best.pt")
    assert a["epoch"] == b["epoch"]
    if extra:  # the checkpoints hold the trained weights and their average, which differ
        assert any(k.startswith("average.") for k in a["model"])
        assert not torch.equal(a["model"]["model.backbone.conv_stem.weight"],
                                 a["model"]["average.module.backbone.conv_stem.weight"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in ("oof.csv", "test.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(_out(straight) / name), pd.read_csv(_out(resumed) / name))
    timing = ["train_seconds", "seconds"]
    h_a = pd.read_csv(_out(straight) / "history.csv").drop(columns=timing)
    h_b = pd.read_csv(_out(resumed) / "history.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(h_a, h_b)


def _scripted_validation(monkeypatch, script):
    calls = iter(script)
    monkeypatch.setattr(train_module.FoldTrainer, "validate", lambda self: {
        "val_loss": 0.0, "val_accuracy_at_05": 0.5, "val_macro_f1_at_05": 0.5, "val_auroc": 0.5, "val_aupr": 0.5,
        "val_threshold": 0.5, "val_accuracy": 0.5, **next(calls)})


def test_the_tie_rule_replaces_best_pt_in_the_loop(cfg_factory, monkeypatch):
    cfg = cfg_factory("tie", "train.epochs=4")
    _scripted_validation(monkeypatch, [
        {"val_macro_f1": 0.8, "val_loss": 0.6},
        {"val_macro_f1": 0.9, "val_loss": 0.5},
        {"val_macro_f1": 0.9, "val_loss": 0.3},  # same top F1, better loss: the one to keep
        {"val_macro_f1": 0.9, "val_loss": 0.4},
    ])
    summary = _train(cfg)
    assert summary["best_epoch"] == 3 and load_checkpoint(_out(cfg) / "best.pt")["epoch"] == 3
    history = pd.read_csv(_out(cfg) / "history.csv")
    assert list(history["best_changed"]) == [True, True, True, False]


def test_early_stopping_after_patience(cfg_factory, monkeypatch):
    cfg = cfg_factory("patience", "train.epochs=6", "train.patience=2")
    _scripted_validation(monkeypatch, [{"val_macro_f1": f, "val_loss": 0.5} for f in (0.7, 0.8, 0.6, 0.6, 0.9, 0.9)])
    summary = _train(cfg)
    assert summary["stopped_early"] and summary["epochs_run"] == 4 and summary["best_epoch"] == 2


def test_pool_top_share_is_a_smooth_max():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0, :5] = 4.0
    pooled = pool_top_share(maps, 0.05)  # 5 pixels
    assert pooled.tolist() == [4.0, 0.0]
    assert pool_top_share(maps, 1.0)[0].item() == pytest.approx(0.2)


def test_mask_head_learns_from_real_and_painted_masks(cfg_factory):
    cfg = cfg_factory("mask", "mask_head.enabled=true", "positives.ratio=0.5", "augment.train=[]")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    dataset = TrainDataset(train_rows, cfg, ImageStore(32), with_masks=True)
    real = np.flatnonzero(dataset.plan_source == DEFECT)[:4]
    painted = np.flatnonzero(dataset.plan_source == PAINTED)[:4]
    items = [dataset[int(i)] for i in np.concatenate([real, painted])]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    has_mask = torch.stack([it["has_mask"] for it in items])
    assert has_mask.all() and all(m.sum() > 0 for m in masks)  # real masks and painted masks, all non-empty

    torch.manual_seed(0)
    model = build_classifier(cfg.model, cfg.mask_head)
    out = model.forward_all(images)
    assert out.mask_logits is not None and out.mask_logits.shape[:2] == (8, 1) and out.logit.shape == (8,)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = {"real": [], "painted": []}
    for _ in range(25):
        out = model.forward_all(images)
        loss = mask_loss(out.mask_logits, masks, has_mask)
        optimizer.zero_grad()
        loss.backward()
        assert model.decoder.fuse[-1].weight.grad.abs().sum() > 0
        optimizer.step()
        with torch.no_grad():
            losses["real"].append(float(mask_loss(out.mask_logits[:4], masks[:4], has_mask[:4])))
            losses["painted"].append(float(mask_loss(out.mask_logits[4:], masks[4:], has_mask[4:])))
    for kind, curve in losses.items():
        assert curve[-1] < 0.7 * curve[0], (kind, curve[0], curve[-1])


def test_mask_head_fold_keeps_one_score_per_image(cfg_factory):
    cfg = cfg_factory("maskfold", "mask_head.enabled=true", "train.epochs=1")
    summary = _train(cfg)
    oof = pd.read_csv(_out(cfg) / "oof.csv")
    assert list(oof.columns) == ["image_id", "label", "score"] and oof["score"].between(0, 1).all()
    assert "train_mask_loss" in pd.read_csv(_out(cfg) / "history.csv")
    assert any(k.startswith("decoder.") for k in load_checkpoint(_out(cfg) / "best.pt")["model"])
    assert summary["best_epoch"] == 1


def test_mask_loss_ignores_defects_without_masks():
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    masks = torch.ones(2, 1, 8, 8)
    assert mask_loss(logits, masks, torch.tensor([False, False])).item() == 0.0
    with_one = mask_loss(logits, masks, torch.tensor([True, False]))
    assert with_one.item() > 0
