"""The shared training machinery: the tie rule, early stopping, RNG capture, resumable state, LR schedule."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from competition.artifacts import load_checkpoint
from competition.training import (
    CheckpointTracker,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)


def test_tie_rule_replaces_best_when_f1_ties_and_loss_improves():
    tracker = CheckpointTracker(metric="val_macro_f1", tie_metric="val_loss")
    history = [
        {"val_macro_f1": 0.80, "val_loss": 0.50},  # 0: first
        {"val_macro_f1": 0.90, "val_loss": 0.60},  # 1: F1 improves although loss is worse
        {"val_macro_f1": 0.90, "val_loss": 0.40},  # 2: tie on F1, better loss -> replaces
        {"val_macro_f1": 0.90, "val_loss": 0.45},  # 3: tie on F1, worse loss -> kept
        {"val_macro_f1": 0.85, "val_loss": 0.10},  # 4: worse F1, whatever the loss -> kept
    ]
    improved = [tracker.update(epoch, m).improved for epoch, m in enumerate(history)]
    assert improved == [True, True, True, False, False]
    assert tracker.best_epoch == 2
    assert tracker.best_metrics["val_loss"] == pytest.approx(0.40)
    assert tracker.epochs_without_improvement == 2


def test_tie_decision_names_the_reason():
    tracker = CheckpointTracker()
    tracker.update(0, {"val_macro_f1": 1.0, "val_loss": 0.3})
    decision = tracker.update(1, {"val_macro_f1": 1.0, "val_loss": 0.2})
    assert decision.improved and "tied" in decision.reason and "val_loss" in decision.reason


def test_nan_metric_never_beats_a_number():
    tracker = CheckpointTracker(metric="val_auroc", tie_metric=None)
    assert tracker.update(0, {"val_auroc": math.nan}).improved
    assert tracker.update(1, {"val_auroc": 0.5}).improved
    assert not tracker.update(2, {"val_auroc": math.nan}).improved
    assert tracker.best_epoch == 1


def test_min_mode_and_early_stopping():
    tracker = CheckpointTracker(metric="loss", tie_metric=None, mode="min")
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.7]):
        tracker.update(epoch, {"loss": loss})
    assert tracker.best_epoch == 1
    assert tracker.should_stop(2) and not tracker.should_stop(3) and not tracker.should_stop(0)


def test_tracker_state_round_trip_and_mismatch():
    tracker = CheckpointTracker()
    tracker.update(0, {"val_macro_f1": 0.7, "val_loss": 0.4})
    copy = CheckpointTracker()
    copy.load_state_dict(tracker.state_dict())
    assert copy.update(1, {"val_macro_f1": 0.7, "val_loss": 0.5}).improved is False
    other = CheckpointTracker(metric="val_auroc")
    with pytest.raises(ValueError, match="val_auroc"):
        other.load_state_dict(tracker.state_dict())


def test_rng_state_round_trip_restores_every_generator():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=12)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4)  # draws from the global RNG, like dropout does
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_training_state_resume_continues_identically(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    _train_steps(model, optimizer, scheduler, 4)
    tracker = CheckpointTracker()
    tracker.update(0, {"val_macro_f1": 0.5, "val_loss": 1.0})
    path = save_training_state(tmp_path / "last.pt", epoch=0, model=model, optimizer=optimizer,
                               scheduler=scheduler, tracker=tracker, extra={"note": "x", "n": 3})
    _train_steps(model, optimizer, scheduler, 4)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model2, optimizer2, scheduler2 = _model_and_optimizer(123)  # different init, as after a crash
    torch.manual_seed(777)  # and a different global RNG
    tracker2 = CheckpointTracker()
    resumed = load_training_state(path, model=model2, optimizer=optimizer2, scheduler=scheduler2,
                                  tracker=tracker2)
    assert resumed.next_epoch == 1 and resumed.extra == {"note": "x", "n": 3}
    assert tracker2.best_epoch == 0
    assert scheduler2.last_epoch == scheduler.last_epoch - 4
    _train_steps(model2, optimizer2, scheduler2, 4)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def test_training_state_is_weights_only_and_missing_file_is_none(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer(0)
    path = save_training_state(tmp_path / "last.pt", epoch=3, model=model, optimizer=optimizer,
                               scheduler=scheduler)
    assert load_checkpoint(path)["epoch"] == 3  # weights_only=True load succeeds
    assert load_training_state(tmp_path / "nope.pt", model=model) is None
    with pytest.raises(ValueError, match="tracker"):
        load_training_state(path, model=model, tracker=CheckpointTracker())


def test_warmup_cosine_shape():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=20) for s in range(21)]
    assert factors[0] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(factors[:4], factors[1:5]))  # rising during warmup
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # decaying afterwards
    assert factors[20] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(0, 0, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 0, 10, min_factor=0.1) == pytest.approx(0.1)
