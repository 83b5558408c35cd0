"""The zoo on the stage runner and the training engine: a finished fold whose results-relevant
config changed is refused with the keys named (neutral keys are not), `--force` refits, a resumed
fit refuses a changed learning rate, and the autoencoder and EfficientAD's teacher distillation
resume exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from competition import training
from competition.config import load_config
from competition.data.textures import make_texture
from competition.stage import ConfigChangedError
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.registry import build_model, register, temporary_entries
from competition.zoo.runner import main
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


def _config(tiny_cfg, *overrides: str):
    sets = {"paths.data": tiny_cfg.paths.data, "paths.work": tiny_cfg.paths.work, "experiment": "stage",
            "folds.n_splits": tiny_cfg.folds.n_splits, "zoo.image_size": 32, "zoo.batch_size": 16,
            "zoo.gallery_size": 0, "zoo.painted_per_fold": 0, "train.threads": 1}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()] + list(overrides))


def _stamp(cfg, name: str):
    from pathlib import Path

    return (Path(cfg.paths.work) / "stage" / name / "fold0" / "summary.json").stat().st_mtime_ns


def test_a_finished_fold_with_a_changed_config_is_refused_naming_the_keys(tiny_cfg):
    name = "patchcore-resnet18"
    main(_config(tiny_cfg), model=name, fold="0", force=False)
    stamp = _stamp(tiny_cfg, name)
    with pytest.raises(ConfigChangedError, match=r"summary.json was written with another config "
                                                 r"\(zoo.image_size: 32 -> 48\)\. Pass --force to refit this fold, "
                                                 r"or use another `experiment` name"):
        main(_config(tiny_cfg, "zoo.image_size=48"), model=name, fold="0", force=False)
    with pytest.raises(ConfigChangedError, match=r"zoo.params.coreset_ratio: 0.1 -> 0.2"):
        main(_config(tiny_cfg, "zoo.params={patchcore-resnet18: {coreset_ratio: 0.2}}"), model=name, fold="0",
             force=False)
    # speed-only keys, the model list and other models' params are not this fold's results
    main(_config(tiny_cfg, "zoo.num_workers=1", "zoo.cache=false", "device=cpu",
                 "zoo.models=[padim-resnet18]", "zoo.params={padim-resnet18: {epsilon: 0.5}}"),
         model=name, fold="0", force=False)
    assert _stamp(tiny_cfg, name) == stamp
    main(_config(tiny_cfg, "zoo.image_size=48"), model=name, fold="0", force=True)
    assert _stamp(tiny_cfg, name) != stamp


class _MeanImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean_image = nn.Parameter(torch.zeros(1, 3, 32, 32))


@dataclass
class _MeanImageParams(TrainParams):
    epochs: int = 3
    batch_size: int = 4
    steps_per_epoch: int = 2
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 0.05


class _MeanImage(TrainedAnomalyModel):
    """A trained model that fits in milliseconds: the mean normal image, anomaly = distance to it."""
    family = "test-stage-mean"
    params_class = _MeanImageParams

    def build_model(self) -> nn.Module:
        return _MeanImageNet()

    def training_step(self, batch):
        return ((batch["image"] - self.model.mean_image) ** 2).mean()

    def score_batch(self, images):
        maps = ((images - self.model.mean_image) ** 2).mean(1)
        return maps.flatten(1).mean(1), maps


class _Killed(Exception):
    pass


def _die_after_first_epoch(monkeypatch) -> None:
    real_save = training.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed
    monkeypatch.setattr(training, "save_training_state", save_then_die)


@pytest.mark.slow
def test_resuming_a_fold_refuses_a_changed_learning_rate(tiny_cfg, monkeypatch):
    with temporary_entries():
        register("test-stage-mean", _MeanImage, "the mean normal image")
        _die_after_first_epoch(monkeypatch)
        with pytest.raises(_Killed):
            main(_config(tiny_cfg), model="test-stage-mean", fold="0", force=False)
        monkeypatch.undo()
        with pytest.raises(ConfigChangedError, match=r"last.pt was written with another config "
                                                     r"\(zoo.params.lr: 0.05 -> 0.5\)\. Pass --force"):
            main(_config(tiny_cfg, "zoo.params={test-stage-mean: {lr: 0.5}}"), model="test-stage-mean", fold="0",
                 force=False)
        main(_config(tiny_cfg, "zoo.num_workers=1"), model="test-stage-mean", fold="0", force=False)
        from competition.artifacts import read_json

        summary = read_json(tiny_cfg.paths.work + "/stage/test-stage-mean/fold0/summary.json")
        assert summary["fit_info"]["resumed_from_epoch"] == 1 and summary["fit_info"]["epochs_run"] == 3
        main(_config(tiny_cfg, "zoo.params={test-stage-mean: {lr: 0.5}}"), model="test-stage-mean", fold="0",
             force=True)
        summary = read_json(tiny_cfg.paths.work + "/stage/test-stage-mean/fold0/summary.json")
        assert summary["fit_info"]["resumed_from_epoch"] is None and summary["params"]["lr"] == 0.5


def _textures(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_texture("tiles", (size, size), rng) for _ in range(n)]


def test_the_autoencoder_validates_and_resumes_exactly(tmp_path, monkeypatch):
    params = {"epochs": 3, "batch_size": 4, "latent_dim": 8, "width": 8, "lr": 1e-3}

    def settings(folder):
        return ZooSettings(image_size=32, batch_size=8, progress=False, run_dir=str(tmp_path / folder))

    normals, test = ImageSet(_textures(20, 32)), ImageSet(_textures(6, 32, seed=1))
    straight = build_model("autoencoder-recon", settings("straight"), params).fit(normals)
    assert straight.fit_info["validation"] == {"normal": 4, "painted": 4, "real": 0}  # 20 % held out
    assert 1 <= straight.fit_info["best_epoch"] <= 3 and straight.fit_info["training_normals"] == 16
    history = pd.read_csv(tmp_path / "straight" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3] and history["val_auroc"].notna().all()

    _die_after_first_epoch(monkeypatch)
    with pytest.raises(_Killed):
        build_model("autoencoder-recon", settings("resumed"), params).fit(normals)
    monkeypatch.undo()
    torch.manual_seed(1234)  # a new process: its global RNG state must not matter
    resumed = build_model("autoencoder-recon", settings("resumed"), params).fit(normals)
    assert resumed.fit_info["resumed_from_epoch"] == 1
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    np.testing.assert_array_equal(resumed.score_samples(test), straight.score_samples(test))


@pytest.mark.slow
def test_the_teacher_distillation_resumes_exactly(tmp_path, monkeypatch):
    params = {"teacher_steps": 6, "teacher_batch_size": 2, "penalty_count": 4, "out_channels": 8}
    normals = np.stack(_textures(6, 64))

    def distil(folder):
        model = build_model("efficientad-s", ZooSettings(image_size=64, batch_size=4, progress=False,
                                                         run_dir=str(tmp_path / folder)), params)
        torch.manual_seed(0)  # as fit does before building the model
        model.model = model.build_model()
        model.before_training(normals)
        return model

    straight = distil("straight")
    assert (tmp_path / "straight" / "teacher" / "last.pt").exists()
    real_save = training.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if kwargs["epoch"] == 2:
            raise _Killed  # after three of the six parts
    monkeypatch.setattr(training, "save_training_state", save_then_die)
    with pytest.raises(_Killed):
        distil("resumed")
    monkeypatch.undo()
    resumed = distil("resumed")
    history = pd.read_csv(tmp_path / "resumed" / "teacher" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5, 6]
    for key, value in straight.model.teacher.state_dict().items():
        assert torch.equal(resumed.model.teacher.state_dict()[key], value), key
    assert torch.equal(resumed.model.teacher_mean, straight.model.teacher_mean)


def test_a_draw_runs_as_its_own_model_with_its_base_params(tiny_cfg):
    """zoo.models may list NAME@K: entry NAME at random draw K, in its own folder, taking NAME's zoo.params
    (its own on top); its scores differ from draw 0's and the stack reads it as one more model."""
    from pathlib import Path

    from competition.ensemble.gather import select_models
    from competition.zoo.registry import get_entry, split_draw

    params = "zoo.params={padim-resnet18: {n_channels: 20}, padim-resnet18@2: {blur_sigma: 2.0}}"
    cfg = _config(tiny_cfg, "zoo.models=[padim-resnet18, padim-resnet18@2]", params)
    main(cfg, model=None, fold="0", force=False)
    root = Path(tiny_cfg.paths.work) / "stage"
    summary = pd.read_json(root / "padim-resnet18@2" / "fold0" / "summary.json", typ="series")
    assert summary["params"]["draw"] == 2 and summary["params"]["n_channels"] == 20
    assert summary["params"]["blur_sigma"] == 2.0
    first, drawn = (pd.read_csv(root / name / "fold0" / "oof.csv")["score"] for name in ("padim-resnet18",
                                                                                       "padim-resnet18@2"))
    assert not np.allclose(first, drawn)
    assert get_entry("padim-resnet18@2").params["draw"] == 2 and split_draw("padim-resnet18") == ("padim-resnet18", 0)
    for bad in ("padim-resnet18@0", "padim-resnet18@x", "autoencoder-recon@1"):
        with pytest.raises(ValueError, match="draw"):
            get_entry(bad)
    main(cfg, model="padim-resnet18@2", fold="all", force=False)  # --model takes a draw too
    main(cfg, model="padim-resnet18", fold="all", force=False)
    assert select_models(cfg) == ["padim-resnet18", "padim-resnet18@2"]
