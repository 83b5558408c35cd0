"""The training engine and its parts: the tie rule, RNG capture, resumable state, the LR schedule, and
`fit` itself (accumulation, clipping, the non-finite check, exact resume, best epoch, early stopping,
the resume check of the results-relevant config)."""
from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from competition import runtime, training
from competition.artifacts import load_checkpoint
from competition.stage import ConfigChangedError
from competition.training import (
    CheckpointTracker,
    EngineConfig,
    FitResult,
    capture_rng_state,
    fit,
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


# ---------------------------------------------------------------- the engine

class _Toy:
    """A small regression with dropout (torch's global RNG) and epoch-seeded batches: enough to
    see every mechanic of `fit` on the CPU in milliseconds."""

    def __init__(self, seed: int = 0, lr: float = 0.05, dropout: float = 0.3, batches: int = 4,
                 batch_size: int = 8):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.n_batches, self.batch_size = batches, batch_size
        self.steps: list[int] = []  # optimizer steps seen by the schedule

    def epoch_batches(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(100 + epoch)
        x = torch.randn(self.n_batches * self.batch_size, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        return list(zip(x.split(self.batch_size), y.split(self.batch_size)))

    def training_step(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validate(self) -> dict[str, float]:
        self.model.eval()
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            loss = float(nn.functional.mse_loss(self.model(x), x.sum(dim=1, keepdim=True)))
        return {"val_score": round(-loss, 1), "val_loss": loss}  # rounded: ties happen

    def fit(self, engine: EngineConfig, tracker: CheckpointTracker | None = None, **kwargs) -> FitResult:
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.steps.append(step) or 1.0)
        self.steps.clear()  # LambdaLR's call at construction
        return fit(self.model, self.optimizer, self.epoch_batches, self.training_step, engine,
                   device=torch.device("cpu"), validate=self.validate, scheduler=scheduler, tracker=tracker,
                   **kwargs)


def _tracker() -> CheckpointTracker:
    return CheckpointTracker(metric="val_score", tie_metric="val_loss")


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulated_small_batches_step_like_one_large_batch():
    small = _Toy(dropout=0.0, batches=6, batch_size=4)
    small.fit(EngineConfig(epochs=1, accumulate_steps=2, progress=False))
    large = _Toy(dropout=0.0, batches=3, batch_size=8)  # the same samples, two small batches per large one
    large.fit(EngineConfig(epochs=1, progress=False))
    assert len(small.steps) == len(large.steps) == 3  # one schedule step per optimizer step
    for key, value in _weights(large.model).items():
        torch.testing.assert_close(_weights(small.model)[key], value, rtol=1e-5, atol=1e-6)
    odd = _Toy(dropout=0.0, batches=5, batch_size=4)
    odd.fit(EngineConfig(epochs=1, accumulate_steps=2, progress=False))
    assert len(odd.steps) == 3  # the last, incomplete window still steps


def test_cpu_amp_auto_turns_on_with_either_bfloat16_hardware(monkeypatch):
    """AMX tiles (Intel) or AVX-512 BF16 (Cooper Lake, AMD Zen 4) turn `auto` on; neither leaves it off."""
    for amx, avx512_bf16 in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        runtime.cpu_bf16.cache_clear()
        assert runtime.cpu_bf16("auto") == (amx or avx512_bf16)
        assert runtime.cpu_bf16("bf16") and not runtime.cpu_bf16("off")
        # the stage's first line says which: `auto` without the hardware names the reason it runs float32
        assert runtime.cpu_precision("auto") == ("bfloat16 autocast" if amx or avx512_bf16
                                                 else "float32, no bfloat16 hardware")
        assert runtime.cpu_precision("off") == "float32" and runtime.cpu_precision("bf16") == "bfloat16 autocast"
    runtime.cpu_bf16.cache_clear()


def test_cpu_bfloat16_autocast_computes_in_bfloat16_and_keeps_float32_weights():
    layer = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with runtime.autocast(torch.device("cpu"), enabled=True, cpu="bf16"):
        assert layer(x).dtype == torch.bfloat16
    for mode in ("off", "bf16", "auto"):  # amp (CUDA's float16) never acts on the CPU
        with runtime.autocast(torch.device("cpu"), enabled=True, cpu=mode):
            expected = torch.bfloat16 if runtime.cpu_bf16(mode) else torch.float32
            assert layer(x).dtype == expected
    assert runtime.cpu_bf16("bf16") and not runtime.cpu_bf16("off")
    full, half = _Toy(dropout=0.0), _Toy(dropout=0.0)
    history_full = full.fit(EngineConfig(epochs=3, progress=False)).history
    history_half = half.fit(EngineConfig(epochs=3, cpu_amp="bf16", progress=False)).history
    weights_full, weights_half = _weights(full.model), _weights(half.model)
    assert all(w.dtype == torch.float32 for w in weights_half.values())
    assert any(not torch.equal(weights_full[k], weights_half[k]) for k in weights_full)  # bf16 rounding acted
    assert history_half[-1]["train_loss"] < 0.5 * history_half[0]["train_loss"]  # and it still learns
    assert history_half[-1]["train_loss"] == pytest.approx(history_full[-1]["train_loss"], rel=0.2)


def test_gradient_clipping_bounds_the_update():
    toy = _Toy(dropout=0.0, lr=1.0, batches=1)
    before = _weights(toy.model)
    toy.fit(EngineConfig(epochs=1, grad_clip=0.01, progress=False))
    step = torch.cat([(after - before[k]).flatten() for k, after in _weights(toy.model).items()])
    assert float(step.norm()) == pytest.approx(0.01, rel=1e-4)  # SGD, lr 1: the update is the clipped gradient
    unclipped = _Toy(dropout=0.0, lr=1.0, batches=1)
    unclipped.fit(EngineConfig(epochs=1, progress=False))
    step = torch.cat([(after - before[k]).flatten() for k, after in _weights(unclipped.model).items()])
    assert float(step.norm()) > 0.1


def test_a_non_finite_loss_stops_with_the_epoch_and_step():
    toy = _Toy()
    real_step = toy.training_step
    calls = []

    def step(batch):
        calls.append(1)
        return real_step(batch) * (math.nan if len(calls) == 7 else 1.0)  # epoch 2, step 3 (4 steps per epoch)

    with pytest.raises(FloatingPointError, match=r"train: the training loss became nan in epoch 2, step 3"):
        fit(toy.model, toy.optimizer, toy.epoch_batches, step, EngineConfig(epochs=3, progress=False),
            device=torch.device("cpu"))


class _Killed(Exception):
    pass


def test_resume_ends_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = _Toy()
    straight.fit(EngineConfig(epochs=4, out=tmp_path / "straight", grad_clip=1.0, progress=False), _tracker())

    killed = _Toy()
    real_save = training.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if kwargs["epoch"] == 1:
            raise _Killed
    monkeypatch.setattr(training, "save_training_state", save_then_die)
    engine = EngineConfig(epochs=4, out=tmp_path / "resumed", grad_clip=1.0, progress=False)
    with pytest.raises(_Killed):
        killed.fit(engine, _tracker())
    monkeypatch.undo()

    resumed = _Toy(seed=99)  # another initialisation and another global RNG state, as after a restart
    result = resumed.fit(engine, _tracker())
    assert result.resumed_after == 2
    for key, value in _weights(straight.model).items():
        assert torch.equal(_weights(resumed.model)[key], value), key
    a, b = (load_checkpoint(tmp_path / name / "best.pt") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timing = ["train_seconds", "seconds"]
    h_a = pd.read_csv(tmp_path / "straight" / "history.csv").drop(columns=timing)
    h_b = pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(h_a, h_b)
    assert list(h_b["epoch"]) == [1, 2, 3, 4]


def test_the_tie_rule_picks_best_pt_and_the_model_ends_holding_it(tmp_path):
    toy = _Toy()
    scripted = iter([{"val_score": 0.8, "val_loss": 0.6}, {"val_score": 0.9, "val_loss": 0.5},
                     {"val_score": 0.9, "val_loss": 0.3}, {"val_score": 0.9, "val_loss": 0.4}])
    snapshots = []
    result = fit(toy.model, toy.optimizer, toy.epoch_batches, toy.training_step,
                 EngineConfig(epochs=4, out=tmp_path, progress=False), device=torch.device("cpu"),
                 validate=lambda: next(scripted), tracker=_tracker(),
                 after_epoch=lambda history: snapshots.append(_weights(toy.model)))
    assert result.best_epoch == 3 and [row["best_changed"] for row in result.history] == [True, True, True, False]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    for key, value in snapshots[2].items():  # epoch 3's weights, not the last epoch's
        assert torch.equal(toy.model.state_dict()[key], value), key
    assert not torch.equal(snapshots[3]["0.weight"], snapshots[2]["0.weight"])


def test_without_a_folder_the_best_epoch_is_kept_in_memory():
    toy = _Toy()
    scripted = iter([{"val_score": 0.9, "val_loss": 0.5}, {"val_score": 0.5, "val_loss": 0.1}])
    snapshots = []
    fit(toy.model, toy.optimizer, toy.epoch_batches, toy.training_step, EngineConfig(epochs=2, progress=False),
        device=torch.device("cpu"), validate=lambda: next(scripted), tracker=_tracker(),
        after_epoch=lambda history: snapshots.append(_weights(toy.model)))
    assert all(torch.equal(toy.model.state_dict()[k], v) for k, v in snapshots[0].items())


def test_early_stopping_and_a_stopped_run_does_not_train_on(tmp_path):
    scores = [0.7, 0.8, 0.6, 0.6, 0.9, 0.9]
    toy = _Toy()
    scripted = iter({"val_score": s, "val_loss": 0.5} for s in scores)
    engine = EngineConfig(epochs=6, patience=2, out=tmp_path, progress=False)
    result = fit(toy.model, toy.optimizer, toy.epoch_batches, toy.training_step, engine, device=torch.device("cpu"),
                 validate=lambda: next(scripted), tracker=_tracker())
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 2

    again = _Toy()
    result = fit(again.model, again.optimizer, again.epoch_batches, lambda batch: 1 / 0, engine,
                 device=torch.device("cpu"), validate=lambda: 1 / 0, tracker=_tracker())
    assert result.stopped_early and result.resumed_after == 4 and len(result.history) == 4


def test_resume_refuses_a_changed_record_but_not_a_neutral_key(tmp_path, monkeypatch):
    record = {"train": {"lr": 0.05, "threads": 1}, "seed": 1}
    toy = _Toy()
    toy.fit(EngineConfig(epochs=1, out=tmp_path, record=record, progress=False), _tracker())
    changed = {"train": {"lr": 0.5, "threads": 1}, "seed": 1}
    with pytest.raises(ConfigChangedError, match=r"last.pt was written with another config "
                                                 r"\(train.lr: 0.05 -> 0.5\)\. Pass --force"):
        _Toy().fit(EngineConfig(epochs=2, out=tmp_path, record=changed, progress=False), _tracker())
    neutral = {"train": {"lr": 0.05, "threads": 2}, "seed": 1}
    result = _Toy().fit(EngineConfig(epochs=2, out=tmp_path, record=neutral, progress=False), _tracker())
    assert result.resumed_after == 1 and len(result.history) == 2
    assert load_checkpoint(tmp_path / "last.pt")["extra"]["config"] == neutral


def test_validate_first_adds_an_epoch_zero_row(tmp_path):
    toy = _Toy()
    result = toy.fit(EngineConfig(epochs=2, out=tmp_path, validate_first=True, progress=False))
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert "train_loss" not in result.history[0] and "val_loss" in result.history[0]
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2] and history["train_loss"].iloc[1:].notna().all()


def test_validation_starts_at_validate_from_and_the_last_epoch_is_always_validated(tmp_path):
    calls = []
    scripted = iter([{"val_score": 0.5, "val_loss": 0.5}, {"val_score": 0.4, "val_loss": 0.5}])
    toy = _Toy()
    result = fit(toy.model, toy.optimizer, toy.epoch_batches, toy.training_step,
                 EngineConfig(epochs=5, out=tmp_path, validate_from=4, progress=False), device=torch.device("cpu"),
                 validate=lambda: calls.append(1) or next(scripted), tracker=_tracker())
    assert len(calls) == 2 and ["val_score" in row for row in result.history] == [False, False, False, True, True]
    assert result.best_epoch == 4  # an epoch never validated is never best
    last_only = _Toy().fit(EngineConfig(epochs=3, validate_from=9, progress=False), _tracker())
    assert ["val_score" in row for row in last_only.history] == [False, False, True] and last_only.best_epoch == 3
