"""Training machinery shared by every model that trains for epochs (the classifier, the zoo's STFPM,
EfficientAD, DRAEM, pretraining): best/last checkpoints with the tie rule, resumable state, RNG
capture, and the warmup-cosine learning-rate schedule.

How a training loop uses it::

    tracker = CheckpointTracker(metric="val_macro_f1", tie_metric="val_loss")   # max F1, then min loss
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps)
    resumed = load_training_state(out / "last.pt", model=model, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler, tracker=tracker)
    start = resumed.next_epoch if resumed else 0          # RNG states are restored as well
    for epoch in range(start, epochs):
        ...train, validate -> metrics (a dict with the two keys the tracker reads)...
        decision = tracker.update(epoch, metrics)
        if decision.improved:
            save_checkpoint({"model": model.state_dict(), "epoch": epoch, "metrics": metrics}, out / "best.pt")
        save_training_state(out / "last.pt", epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler, tracker=tracker)
        print(f"epoch {epoch}: {decision.reason}")
        if tracker.should_stop(patience):
            break

Write best.pt before last.pt: a run killed in between then re-runs that epoch and rewrites both,
so best.pt never describes an epoch that last.pt has not recorded. Every file goes through
`artifacts.save_checkpoint` (atomic) and is read with `weights_only=True`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from competition.artifacts import load_checkpoint, save_checkpoint

Mode = Literal["max", "min"]


# ---------------------------------------------------------------- best checkpoint and the tie rule

@dataclass
class Decision:
    """What `CheckpointTracker.update` decided for one epoch, and why (printed in the epoch line)."""
    improved: bool
    reason: str


@dataclass
class CheckpointTracker:
    """Chooses the best epoch by `metric`; on a tie (within `tol`) a better `tie_metric` wins.

    The tie rule is the point: on a small validation fold many epochs reach the same top macro-F1,
    and a later epoch with a lower validation loss is the better model. Without it the first epoch
    to reach the top score would be kept forever. NaN counts as the worst value.
    """
    metric: str = "val_macro_f1"
    tie_metric: str | None = "val_loss"
    mode: Mode = "max"
    tie_mode: Mode = "min"
    tol: float = 1e-9
    best_epoch: int = -1
    best_value: float | None = None
    best_tie_value: float | None = None
    epochs_without_improvement: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _better(new: float, old: float | None, mode: Mode, tol: float) -> int:
        """+1 if `new` beats `old`, 0 on a tie, -1 if worse (NaN is the worst value)."""
        new_nan = new is None or math.isnan(new)
        old_nan = old is None or math.isnan(old)
        if new_nan or old_nan:
            return 0 if new_nan and old_nan else (-1 if new_nan else 1)
        diff = new - old if mode == "max" else old - new
        return 1 if diff > tol else (-1 if diff < -tol else 0)

    def update(self, epoch: int, metrics: dict[str, float]) -> Decision:
        if self.metric not in metrics:
            raise KeyError(f"CheckpointTracker: metrics lack {self.metric!r}; got {sorted(metrics)}")
        value = float(metrics[self.metric])
        tie_value = float(metrics[self.tie_metric]) if self.tie_metric else None
        if self.best_epoch < 0:
            return self._accept(epoch, metrics, value, tie_value, f"first epoch ({self.metric} {value:.4f})")
        cmp = self._better(value, self.best_value, self.mode, self.tol)
        if cmp > 0:
            return self._accept(epoch, metrics, value, tie_value,
                                f"{self.metric} improved {self.best_value:.4f} -> {value:.4f}")
        if cmp == 0 and self.tie_metric:
            if self._better(tie_value, self.best_tie_value, self.tie_mode, self.tol) > 0:
                return self._accept(epoch, metrics, value, tie_value,
                                    f"{self.metric} tied at {value:.4f} and {self.tie_metric} improved "
                                    f"{self.best_tie_value:.4f} -> {tie_value:.4f}")
        self.epochs_without_improvement += 1
        return Decision(False, f"kept epoch {self.best_epoch} ({self.metric} {self.best_value:.4f}"
                               + (f", {self.tie_metric} {self.best_tie_value:.4f}" if self.tie_metric else "")
                               + f"; {self.epochs_without_improvement} epoch(s) without improvement)")

    def _accept(self, epoch: int, metrics: dict[str, float], value: float, tie_value: float | None,
                reason: str) -> Decision:
        self.best_epoch, self.best_value, self.best_tie_value = epoch, value, tie_value
        self.best_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.epochs_without_improvement = 0
        return Decision(True, f"best.pt <- epoch {epoch}: {reason}")

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without a new best (0 disables)."""
        return patience > 0 and self.epochs_without_improvement >= patience

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "metric", "tie_metric", "mode", "tie_mode", "tol", "best_epoch", "best_value",
            "best_tie_value", "epochs_without_improvement", "best_metrics")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("metric"), state.get("tie_metric")) != (self.metric, self.tie_metric):
            raise ValueError(f"tracker state selects by {state.get('metric')!r}/{state.get('tie_metric')!r}, "
                             f"this run by {self.metric!r}/{self.tie_metric!r}")
        for key, value in state.items():
            setattr(self, key, value)


# ---------------------------------------------------------------- RNG states

def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states, in weights_only-safe types."""
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}}
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np_state = {**np_state, "state": {**np_state["state"],
                                      "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ---------------------------------------------------------------- resumable training state

@dataclass
class ResumedState:
    """What `load_training_state` found: the epoch to start from, and the caller's extras."""
    epoch: int
    extra: dict[str, Any]

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1


def save_training_state(path: str | Path, *, epoch: int, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                        scaler: Any = None, tracker: CheckpointTracker | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
    """Write everything needed to continue after `epoch` (atomically): weights, optimizer,
    scheduler, AMP scaler, tracker, RNG states and the caller's `extra` (plain values and tensors)."""
    state: dict[str, Any] = {
        "epoch": int(epoch),
        "model": model.state_dict(),
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if tracker is not None:
        state["tracker"] = tracker.state_dict()
    return save_checkpoint(state, path)


def load_training_state(path: str | Path, *, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                        scaler: Any = None, tracker: CheckpointTracker | None = None,
                        restore_rng: bool = True, map_location: Any = "cpu") -> ResumedState | None:
    """Restore a `save_training_state` file into the given objects; None if `path` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    state = load_checkpoint(path, map_location=map_location)
    model.load_state_dict(state["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler),
                         ("tracker", tracker)):
        if target is None:
            continue
        if name not in state:
            raise ValueError(f"{path} holds no {name} state; it was not written by save_training_state "
                             f"with a {name}")
        target.load_state_dict(state[name])
    if restore_rng:
        restore_rng_state(state["rng"])
    return ResumedState(epoch=int(state["epoch"]), extra=state.get("extra", {}))


# ---------------------------------------------------------------- learning-rate schedule

def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate: linear from 1/(warmup+1) up to 1 over `warmup_steps`,
    then a half cosine down to `min_factor` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """A picklable lambda for LambdaLR (its state is three numbers)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float):
        self.warmup_steps, self.total_steps, self.min_factor = warmup_steps, total_steps, min_factor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_factor)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: call `scheduler.step()` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps, min_factor))
