"""The shared trained-model loop: history.csv, best checkpoint by validation AUROC, exact resume,
and evaluation that never sees the training augmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from competition.artifacts import load_checkpoint
from competition.data.textures import make_texture
from competition.stage import ConfigChangedError
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.registry import get_entry, load_model, register, temporary_entries
from competition.zoo.trained import TrainedAnomalyModel, TrainParams, evaluation_tensors
from competition.zoo.validation import split_validation

SIZE = 32


def _normals(n: int = 24, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet([make_texture("tiles", (SIZE, SIZE), rng) for _ in range(n)])


def _settings(run_dir=None) -> ZooSettings:
    return ZooSettings(image_size=SIZE, batch_size=8, progress=False, run_dir=None if run_dir is None else str(run_dir))


class MeanImageNet(nn.Module):
    """Learns the mean normal image; a pixel's anomaly is its squared distance to it."""

    def __init__(self):
        super().__init__()
        self.mean_image = nn.Parameter(torch.zeros(1, 3, SIZE, SIZE))
        self.sign = nn.Parameter(torch.ones(1))
        self.dropout = nn.Dropout(0.5)


@dataclass
class MeanImageParams(TrainParams):
    epochs: int = 3
    batch_size: int = 4
    lr: float = 0.05
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"


class MeanImageModel(TrainedAnomalyModel):
    family = "test-mean-image"
    params_class = MeanImageParams
    kill_at_step = -1

    def __init__(self, settings=None, **params):
        super().__init__(settings, **params)
        self.seen_training: list[torch.Tensor] = []
        self.seen_scoring: list[torch.Tensor] = []

    def build_model(self) -> nn.Module:
        return MeanImageNet()

    def training_step(self, batch):
        self.seen_training.append(batch["image"].detach().clone())
        if len(self.seen_training) == self.kill_at_step:
            raise KeyboardInterrupt
        return ((self.model.dropout(batch["image"]) - self.model.mean_image) ** 2).mean()

    def score_batch(self, images):
        self.seen_scoring.append(images.detach().clone())
        maps = ((images - self.model.mean_image) ** 2).mean(1) * self.model.sign
        return maps.flatten(1).mean(1), maps


@pytest.fixture
def registered_test_model():
    """The test model as a registry entry for the block of one test (loading finds classes there), then gone."""
    with temporary_entries():
        register("test-mean-image", MeanImageModel, "learns the mean normal image")
        yield
    with pytest.raises(ValueError, match="unknown zoo model"):  # nothing leaks into the global registry
        get_entry("test-mean-image")


def test_history_checkpoints_and_loss_going_down(tmp_path, registered_test_model):
    model = MeanImageModel(_settings(tmp_path)).fit(_normals())
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]  # counted from 1, as printed
    for column in ("train_loss", "val_auroc", "val_auroc_painted", "lr", "seconds"):
        assert column in history.columns
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_auroc_real"].isna().all()  # no real defects were given
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    assert model.fit_info["validation"] == {"normal": 5, "painted": 5, "real": 0}  # round(0.2 * 24)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == model.fit_info["best_epoch"]
    # save / load round trip gives the same scores
    model.save(tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt")
    assert type(again) is MeanImageModel
    np.testing.assert_allclose(again.score_samples(_normals(4, seed=9)), model.score_samples(_normals(4, seed=9)))


def test_real_defects_enter_the_validation_auroc(tmp_path):
    normals, validation = split_validation(_normals(), _normals(3, seed=5), 0.2, seed=0)
    model = MeanImageModel(_settings(), epochs=1).fit(normals, validation)
    assert model.fit_info["validation"] == {"normal": 5, "painted": 5, "real": 3}
    assert model.fit_info["training_normals"] == 19


@dataclass
class SignFlippingParams(TrainParams):
    epochs: int = 4
    batch_size: int = 4
    steps_per_epoch: int = 1
    optimizer: Literal["adamw", "adam", "sgd"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0


class SignFlippingModel(MeanImageModel):
    """SGD on the sign of the score: one step per epoch takes it to +1, 0, -1, 0. Epoch 0 or 2 has
    the best validation AUROC (whichever sign ranks the painted defects higher); the last epoch
    scores every image 0 (AUROC 0.5), so a loop that kept the last weights would fail."""

    family = "test-sign-flipping"
    params_class = SignFlippingParams
    directions = (-1.0, 1.0, 1.0, -1.0)

    def training_step(self, batch):
        direction = self.directions[len(self.seen_training)]
        self.seen_training.append(batch["image"])
        return direction * self.model.sign.sum() + 0.0 * self.model.mean_image.sum()

    def before_training(self, normals):
        with torch.no_grad():
            self.model.mean_image.copy_(torch.from_numpy(normals).permute(0, 3, 1, 2).float().mean(0) / 255)
            self.model.sign.zero_()


def test_best_checkpoint_is_chosen_by_validation_auroc(tmp_path):
    model = SignFlippingModel(_settings(tmp_path)).fit(_normals())
    history = pd.read_csv(tmp_path / "history.csv")
    auc = history["val_auroc"].to_numpy()
    assert auc[1] == auc[3] == 0.5 and auc[0] == pytest.approx(1 - auc[2]) and auc[0] != 0.5
    best = int(np.argmax(auc))
    assert model.fit_info["best_epoch"] == best + 1  # epochs count from 1
    assert model.model.sign.item() == pytest.approx(1.0 if best == 0 else -1.0)  # best weights
    assert load_checkpoint(tmp_path / "last.pt")["model"]["sign"].item() == pytest.approx(0.0)


def test_resume_continues_exactly(tmp_path):
    # Random augmentation, dropout and a schedule: resume must restore every source of randomness.
    params = dict(augment=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "RandomBrightnessContrast", "p": 0.5}],
                  schedule="warmup_cosine", warmup_epochs=1.0, optimizer="adamw")
    straight = MeanImageModel(_settings(tmp_path / "straight"), **params).fit(_normals())

    interrupted = MeanImageModel(_settings(tmp_path / "resumed"), **params)
    interrupted.kill_at_step = 2 * len(straight.seen_training) // 3 + 1  # dies inside epoch 2
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(_normals())
    torch.manual_seed(1234)  # a new process: its global RNG state must not matter
    resumed = MeanImageModel(_settings(tmp_path / "resumed"), **params).fit(_normals())
    assert resumed.fit_info["resumed_from_epoch"] == 2
    assert len(resumed.seen_training) == len(straight.seen_training) // 3  # only the third epoch ran

    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert torch.equal(a["mean_image"], b["mean_image"])
    cols = ["epoch", "train_loss", "val_auroc"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "straight" / "history.csv")[cols],
                                  pd.read_csv(tmp_path / "resumed" / "history.csv")[cols])


def test_evaluation_never_sees_the_augmentation():
    # Training always flips and darkens; validation and scoring must see the images as they are.
    augment = [{"name": "HorizontalFlip", "p": 1.0},
               {"name": "RandomBrightnessContrast", "brightness_limit": [-0.3, -0.3], "contrast_limit": 0, "p": 1.0}]
    normals = _normals()
    kept, validation = split_validation(normals, None, 0.2, seed=0)
    model = MeanImageModel(_settings(), epochs=1, augment=augment).fit(kept, validation)
    assert torch.cat(model.seen_training).mean() < evaluation_tensors(kept, SIZE).mean() - 0.1

    seen_validation = torch.cat(model.seen_scoring)
    expected = evaluation_tensors(validation.images, SIZE)
    assert torch.equal(seen_validation[:len(expected)], expected)

    model.seen_scoring.clear()
    test = _normals(5, seed=3)
    prediction = model.predict(test)
    assert torch.equal(torch.cat(model.seen_scoring), evaluation_tensors(test, SIZE))
    assert torch.equal(evaluation_tensors(test, SIZE)[0], torch.from_numpy(test.read(0)).permute(2, 0, 1) / 255.0)
    assert prediction.scores.shape == (5,) and prediction.maps.shape == (5, SIZE, SIZE)
    assert np.isfinite(prediction.scores).all()


def test_a_refit_resumes_at_the_end_and_refuses_changed_hyperparameters(tmp_path):
    MeanImageModel(_settings(tmp_path), epochs=2).fit(_normals())
    again = MeanImageModel(_settings(tmp_path), epochs=2).fit(_normals())
    assert again.fit_info["resumed_from_epoch"] == 2 and not again.seen_training  # resumed at its end
    with pytest.raises(ConfigChangedError, match=r"last.pt was written with another config \(zoo.params.lr: "
                                                 r"0.05 -> 0.5\)"):
        MeanImageModel(_settings(tmp_path), epochs=2, lr=0.5).fit(_normals())
    with pytest.raises(ConfigChangedError, match=r"zoo.image_size: 32 -> 64"):
        settings = ZooSettings(image_size=64, batch_size=8, progress=False, run_dir=str(tmp_path))
        MeanImageModel(settings, epochs=2).fit(_normals())
    neutral = ZooSettings(image_size=SIZE, batch_size=8, progress=False, run_dir=str(tmp_path), num_workers=1,
                          channels_last=False)
    assert MeanImageModel(neutral, epochs=2).fit(_normals()).fit_info["resumed_from_epoch"] == 2
