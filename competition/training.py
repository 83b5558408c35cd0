"""The one training engine: `fit` runs the epochs of every model that trains (the classifier,
pretraining, the zoo's trained models) and owns the mechanics, so kill, resume and config changes
behave the same everywhere. Lightning's split: the model supplies its step and its validation.

`fit` owns: float16 autocast with a GradScaler (CUDA only; the CPU trains in float32), gradient
accumulation, gradient clipping, the non-finite loss check, the per-step schedule, the best epoch
by `CheckpointTracker` (with the tie rule), best.pt and last.pt, history.csv, early stopping and
resume from last.pt with the RNG states, so a resumed run ends exactly as an uninterrupted one::

    result = fit(model, optimizer, epoch_batches, training_step,
                 EngineConfig(epochs=10, grad_clip=5.0, out=run_folder, record=results_record),
                 device=device, validate=validate, scheduler=scheduler,
                 tracker=CheckpointTracker(metric="val_macro_f1", tie_metric="val_loss"))

`epoch_batches(epoch)` gives that epoch's batches (seeded by the epoch, with a length);
`training_step(batch)` returns the loss, or a dict whose "loss" is backpropagated and whose other
entries are logged; `validate()` returns the epoch's metrics. Files and messages count epochs from 1.

best.pt is written before last.pt: a run killed in between re-runs that epoch and rewrites both,
so best.pt never describes an epoch that last.pt has not recorded. Every file goes through
`artifacts.save_checkpoint` (atomic) and is read with `weights_only=True`.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from competition.artifacts import UnreadableFileError, load_checkpoint, save_checkpoint, write_csv
from competition.runtime import autocast
from competition.stage import ANOTHER_EXPERIMENT, refuse_changed

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
    try:
        state = load_checkpoint(path, map_location=map_location)
    except UnreadableFileError as exc:
        raise UnreadableFileError(f"{exc}; delete it to start this run again, or pass --force") from None
    return restore_training_state(state, path, model=model,
                                  optimizer=optimizer, scheduler=scheduler, scaler=scaler, tracker=tracker,
                                  restore_rng=restore_rng)


def restore_training_state(state: dict[str, Any], path: str | Path, *, model: nn.Module,
                           optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                           scaler: Any = None, tracker: CheckpointTracker | None = None,
                           restore_rng: bool = True) -> ResumedState:
    """`load_training_state` for a state already read from `path` (named in errors)."""
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


# ---------------------------------------------------------------- the engine

class Batches(Iterable, Sized, Protocol):
    """One epoch's batches with a length (a DataLoader): the last one closes an accumulation window."""


@dataclass
class EngineConfig:
    """How `fit` trains; each trainer fills it from its own config section."""
    epochs: int
    name: str = "train"  # names the progress bar, the epoch lines and the errors
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    accumulate_steps: int = 1  # batches per optimizer step
    amp: bool = True  # float16 autocast and a GradScaler, CUDA only
    cpu_amp: str = "off"  # bfloat16 autocast on the CPU: off | bf16 | auto (with bfloat16 hardware: runtime.cpu_bf16)
    patience: int = 0  # early stopping: epochs in a row without a new best; 0 disables
    out: str | Path | None = None  # best.pt, last.pt, history.csv; None keeps the run in memory
    record: dict[str, Any] | None = None  # results-relevant config, in last.pt and best.pt; resuming checks it
    elsewhere: str = ANOTHER_EXPERIMENT  # the second way out when a resume is refused
    validate_first: bool = False  # a row for epoch 0: validate() before any training
    validate_from: int = 1  # first epoch (from 1) validated, and so eligible for best.pt; the last always is
    shown_metrics: tuple[str, ...] = ()  # printed in each epoch line
    progress: bool = True  # a tqdm bar per epoch and a line per epoch


@dataclass
class FitResult:
    """What `fit` did, for the trainer's summary."""
    history: list[dict[str, Any]]  # one row per epoch, as in history.csv
    best_epoch: int | None  # counted from 1; None without a tracker
    stopped_early: bool  # patience ran out before `epochs`
    resumed_after: int | None  # epochs found done in last.pt; None for a fresh run


HISTORY_FILE = "history.csv"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, epoch_batches: Callable[[int], Batches],
        training_step: Callable[[Any], Tensor | dict[str, Tensor]], config: EngineConfig, *,
        device: torch.device, validate: Callable[[], dict[str, float]] | None = None, scheduler: Any = None,
        tracker: CheckpointTracker | None = None, parameters: Iterable[nn.Parameter] | None = None,
        on_fresh_start: Callable[[], None] | None = None,
        after_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        restore_extra_state: Callable[[dict[str, Any]], None] | None = None,
        after_step: Callable[[int], None] | None = None) -> FitResult:
    """Train `model` for `config.epochs` epochs (see the module docstring); with a `tracker` the
    model ends holding the best epoch's weights. `parameters` are clipped (default: the
    optimizer's); `on_fresh_start` runs once before the first epoch of a run not resumed;
    `after_epoch(history)` runs after each epoch's files are written; `extra_state()` (e.g. a
    generator's state) is saved in last.pt after each epoch and handed to `restore_extra_state` on resume;
    `after_step(step)` runs after every optimizer step (e.g. a weight average's update)."""
    out = Path(config.out) if config.out is not None else None
    if tracker is not None and validate is None:
        raise ValueError(f"{config.name}: choosing the best epoch needs a validate callable")
    scaler = grad_scaler(config, device)
    clipped = list(parameters) if parameters is not None else None
    history: list[dict[str, Any]] = []
    resumed = None
    last = out / LAST_FILE if out is not None else None
    if last is not None and last.exists():
        state = load_checkpoint(last, map_location=device)
        if config.record is not None:
            refuse_changed(last, state.get("extra", {}).get("config", {}), config.record, "start it over",
                           config.elsewhere)
        resumed = restore_training_state(state, last, model=model, optimizer=optimizer, scheduler=scheduler,
                                         scaler=scaler, tracker=tracker)
        history = [dict(row) for row in resumed.extra.get("history", [])]
        if restore_extra_state is not None:
            restore_extra_state(resumed.extra.get("state", {}))
        print(f"{config.name}: resuming from {last} after epoch {resumed.next_epoch}/{config.epochs}")
    else:
        if on_fresh_start is not None:
            on_fresh_start()
        if config.validate_first and validate is not None:
            history.append({"epoch": 0, **validate()})
            _report(config, history[-1], "")
            if out is not None:
                write_csv(pd.DataFrame(history), out / HISTORY_FILE)

    best_state: dict[str, Tensor] | None = None
    stopped = False
    for epoch in range(resumed.next_epoch if resumed is not None else 0, config.epochs):
        if tracker is not None and tracker.should_stop(config.patience):
            stopped = True  # patience ran out (also when a resumed run had stopped there)
            break
        began = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update(train_epoch(model, optimizer, epoch_batches(epoch), training_step, config, device=device,
                               scheduler=scheduler, scaler=scaler, epoch=epoch, parameters=clipped,
                               after_step=after_step))
        validated = validate is not None and (epoch + 1 >= config.validate_from or epoch + 1 == config.epochs)
        if validated:
            row.update(validate())
        row["seconds"] = time.perf_counter() - began
        reason = ""
        if tracker is not None and validated:
            decision = tracker.update(epoch + 1, row)
            reason = decision.reason
            if decision.improved:  # best.pt before last.pt: see the module docstring
                if out is not None:
                    save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "metrics": row,
                                     "config": config.record}, out / BEST_FILE)
                else:
                    best_state = copy.deepcopy(model.state_dict())
            row["best_changed"] = decision.improved
        history.append(row)
        if out is not None:
            save_training_state(last, epoch=epoch, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, tracker=tracker, extra={
                                    "config": config.record, "history": history,
                                    "state": extra_state() if extra_state is not None else {}})
            write_csv(pd.DataFrame(history), out / HISTORY_FILE)
        _report(config, row, reason)
        if after_epoch is not None:
            after_epoch(history)

    if tracker is not None:
        if best_state is None and out is not None and (out / BEST_FILE).exists():
            best_state = load_checkpoint(out / BEST_FILE, map_location=device)["model"]
        if best_state is not None:
            model.load_state_dict(best_state)
    if stopped and config.progress:
        print(f"{config.name}: early stop, {config.patience} epoch(s) without a better checkpoint")
    return FitResult(history=history, best_epoch=tracker.best_epoch if tracker is not None else None,
                     stopped_early=stopped, resumed_after=resumed.next_epoch if resumed is not None else None)


def _batch_size(batch: Any) -> int:
    """Images in a batch: the length of its first tensor (a dict's, a tuple's, or the batch itself)."""
    if isinstance(batch, Tensor):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch
    return next((len(v) for v in values if isinstance(v, Tensor)), 0)


def grad_scaler(config: EngineConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast; disabled (every call a no-op) on the CPU or without amp."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.amp)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches,
                training_step: Callable[[Any], Tensor | dict[str, Tensor]], config: EngineConfig, *,
                device: torch.device, scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
                epoch: int = 0, parameters: list[nn.Parameter] | None = None,
                after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One epoch of `fit`'s steps (also what bench/train_speed.py times): mean losses per batch as
    train_loss and train_<name>, then train_images, train_seconds and the learning rate after it."""
    started = time.perf_counter()
    scaler = scaler if scaler is not None else grad_scaler(config, device)
    clipped = parameters if parameters is not None else [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    accumulate, total = config.accumulate_steps, len(batches)
    sums: dict[str, float] = {}
    steps = images = 0
    bar = tqdm(batches, total=total, desc=f"{config.name} epoch {epoch + 1}/{config.epochs}", leave=False,
               unit="batch", disable=not config.progress)
    for step, batch in enumerate(bar):
        with autocast(device, config.amp, config.cpu_amp):
            output = training_step(batch)
        losses = output if isinstance(output, dict) else {"loss": output}
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{config.name}: the training loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; "
                f"lower the learning rate (now {optimizer.param_groups[0]['lr']:.3g}) or clip gradients")
        scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
        if (step + 1) % accumulate == 0 or step + 1 == total:
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(clipped, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step(step)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        steps += 1
        images += _batch_size(batch)
        # refresh=False: tqdm's iterator writes its count back only when it prints, so a forced refresh here
        # would redraw a stale count ("0/52" for seconds); the postfix shows at the bar's next own print
        bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}",
                        img_s=f"{images / (time.perf_counter() - started):.1f}", refresh=False)
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {("train_loss" if key == "loss" else f"train_{key}"): value / max(steps, 1)
                           for key, value in sums.items()}
    row.update({"train_images": images, "train_seconds": seconds, "lr": optimizer.param_groups[0]["lr"]})
    return row


def _report(config: EngineConfig, row: dict[str, Any], reason: str) -> None:
    """One line per epoch: loss and speed, the shown metrics, and the tracker's decision."""
    if not config.progress:
        return
    epoch = int(row["epoch"])
    parts = [f"{config.name} epoch {epoch}/{config.epochs}:" if epoch > 0 else f"{config.name} before training:"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.4f} ({row['train_images'] / max(row['train_seconds'], 1e-9):.1f} "
                     f"img/s, {row['train_seconds']:.0f} s)")
    shown = [f"{key} {row[key]:.4f}" for key in config.shown_metrics if key in row]
    if shown:
        parts.append("| " + ", ".join(shown))
    if reason:
        parts.append(f"| {reason}")
    print(" ".join(parts))
