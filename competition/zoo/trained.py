"""The training loop every trained zoo model shares (STFPM, Reverse Distillation, EfficientAD,
DRAEM, FastFlow, CFlow, U-Flow): optimiser, schedule, tqdm bar, validation AUROC inside the
training folds, best checkpoint by it, `history.csv`, atomic `best.pt`/`last.pt` and exact resume.

Why a validation signal: the held-out fold must stay untouched, so the best epoch is chosen on the
`ValidationSet` the runner builds inside the training folds (`zoo.validation.split_validation`: a
held-out slice of the training normals, the same images with a painted defect, and the training
folds' real defects). Its AUROC (painted and real also apart) goes to `history.csv` every epoch.

Two data pipelines, never mixed. Training: the training normals are decoded and resized once,
then every sample goes through `training_sample(image, rng)` (albumentations from the `augment`
hyperparameter, a model's own synthetic anomalies, ...). Evaluation (validation, calibration,
scoring): the frame's `ImageSet.tensors` resize and nothing else. Both hand the network RGB in
[0, 1]; networks that want ImageNet statistics normalise inside (`ImageNormalise`).

How to add a trained model (see stfpm.py for a short one)::

    class MyModel(TrainedAnomalyModel):
        family = "mymodel"
        DEFAULTS = {**train_defaults(epochs=20, lr=1e-3), "backbone": "resnet18"}
        def build_network(self) -> nn.Module:            # every module, frozen parts included
            return MyNetwork(...)
        def training_step(self, batch) -> Tensor:        # batch: dict of tensors on the device
            return loss                                  # or {"loss": total, "l2": ..., ...}
        def score_batch(self, images) -> tuple[Tensor, Tensor]:  # eval mode, no grad, (B,3,S,S) in [0,1]
            return scores (B,), maps (B, S, S)
    register("mymodel-resnet18", MyModel, "one line", epochs=10)

Optional hooks: `training_sample` (per-sample data, e.g. painted anomalies; default: the augmented
image as {"image": tensor}), `parameters_to_train`, `build_optimizer` (default from the
`optimizer` hyperparameter), `before_training` (once per fresh fit, e.g. teacher distillation),
`calibrate` (before each validation and after the fit, on the held-out clean normals, e.g. map
quantiles), `fit_summary` (facts for summary.json). `self.network` holds every module, so one
state_dict is the whole fitted model; statistics the scoring needs are registered buffers.

Determinism and resume: per-sample randomness is `np.random.default_rng([seed, epoch, index])`
and the batch order comes from a generator seeded by (seed, epoch), so a run resumed from
`last.pt` continues exactly as an uninterrupted one (torch's own RNG, e.g. dropout, is restored by
`training.load_training_state`). A finished run re-fitted in the same run_dir resumes at its end:
it reloads best.pt without training, unless the folder holds the runner's summary.json (a
finished fold refitted with --force), which starts the training over.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from competition.artifacts import load_checkpoint, save_checkpoint, write_csv
from competition.metrics import auroc
from competition.runtime import autocast, to_device_images
from competition.training import CheckpointTracker, load_training_state, save_training_state, warmup_cosine_schedule
from competition.zoo.base import AnomalyModel, ImageSet, ValidationSet, resize_image, unit_tensor
from competition.zoo.validation import split_validation

HISTORY_FILE = "history.csv"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"

# Hyperparameters of the loop itself; every trained model's DEFAULTS starts with these.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "steps_per_epoch": 0,  # 0 = one pass over the training normals
    "batch_size": 8,  # training batch (scoring uses the run's zoo.batch_size)
    "optimizer": "adamw",  # adamw | adam | sgd
    "lr": 1.0e-3,
    "weight_decay": 1.0e-2,
    "momentum": 0.9,  # sgd only
    "betas": (0.9, 0.999),  # adam / adamw
    "schedule": "constant",  # constant | warmup_cosine | multistep
    "warmup_epochs": 0.0,  # warmup_cosine only
    "milestones": (),  # multistep: fractions of all steps where lr *= gamma
    "gamma": 0.1,
    "grad_clip": 0.0,  # max gradient norm; 0 disables
    "augment": [],  # albumentations [{name: HorizontalFlip, p: 0.5}, ...], training samples only
    "patience": 0,  # stop after this many epochs without a better validation AUROC; 0 = off
}

# Share of the training normals held out when `fit` gets no ValidationSet (direct API use); the
# runner holds out `zoo.validation_share` itself.
DEFAULT_VALIDATION_SHARE = 0.2

# The runner's mark of a finished fold: refitting such a fold (--force) starts over, it does not resume.
FINISHED_MARK = "summary.json"


def train_defaults(**changes: Any) -> dict[str, Any]:
    """TRAIN_DEFAULTS with a model's own values (its paper's, CPU-sized)."""
    unknown = sorted(set(changes) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training hyperparameter(s) {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    return {**TRAIN_DEFAULTS, **changes}


# ---------------------------------------------------------------- the two data pipelines

def evaluation_tensors(images: ImageSet, image_size: int) -> Tensor:
    """The evaluation pipeline, all at once: resized (N, 3, S, S) in [0, 1], no augmentation ever."""
    view = images.tensors(image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if len(view) == 0:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.stack([view[i][1] for i in range(len(view))])


def decode_resized(images: ImageSet, image_size: int, progress: bool = False) -> np.ndarray:
    """(N, S, S, 3) uint8: the training normals, decoded and resized once for the whole fit."""
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i in tqdm(range(len(images)), desc="decode", disable=not progress, leave=False):
        out[i] = resize_image(images.read(i), image_size)
    return out


def build_augmentation(spec: list[dict[str, Any]]):
    """albumentations.Compose from [{name: HorizontalFlip, p: 0.5}, ...]; None when empty."""
    if not spec:
        return None
    import albumentations as A

    transforms = []
    for item in spec:
        item = dict(item)
        name = item.pop("name", None)
        if not name or not hasattr(A, name):
            raise ValueError(f"augment: {name!r} is not an albumentations transform (e.g. HorizontalFlip)")
        transforms.append(getattr(A, name)(**item))
    return A.Compose(transforms)


class ImageNormalise(nn.Module):
    """(x - mean) / std inside the network, so both pipelines hand over plain [0, 1] RGB."""

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class TrainingSamples(Dataset):
    """Training normals through the model's `training_sample`, with per-(epoch, index) randomness."""

    def __init__(self, images: np.ndarray, model: "TrainedAnomalyModel", seed: int):
        self.images, self.model, self.seed, self.epoch = images, model, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.model.training_sample(self.images[index], rng)


# ---------------------------------------------------------------- the model face

class TrainedAnomalyModel(AnomalyModel):
    """An AnomalyModel whose `fit` trains `self.network` with the shared loop (see the module doc)."""

    DEFAULTS = dict(TRAIN_DEFAULTS)
    uses_validation = True
    network: nn.Module | None = None

    # ---- what a model supplies
    def build_network(self) -> nn.Module:
        """Every module of the model (random or local weights), on the CPU."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Loss for one batch of `training_sample`s (on the device); a dict needs a "loss" key."""
        raise NotImplementedError

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Eval mode, no grad: (B, 3, S, S) in [0, 1] -> (scores (B,), maps (B, S, S))."""
        raise NotImplementedError

    # ---- optional hooks
    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """One training sample from a uint8 (S, S, 3) normal image; default: the augmented image."""
        return {"image": unit_tensor(self.augmented(image, rng))}

    def augmented(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`image` through the `augment` pipeline (training only), seeded from `rng`."""
        if not hasattr(self, "_augmentation"):
            self._augmentation = build_augmentation(self.augment)
        if self._augmentation is None:
            return image
        self._augmentation.set_random_seed(int(rng.integers(2**31)))
        return self._augmentation(image=image)["image"]

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"{self.family}: optimizer {self.optimizer!r} is not one of adamw, adam, sgd")
        optimiser = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return optimiser(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def before_training(self, normals: np.ndarray) -> None:
        """Once before the first epoch of a fresh fit (not on resume); normals: (N, S, S, 3) uint8."""

    def calibrate(self, normals: Tensor) -> None:
        """Before every validation and after the fit: held-out clean normals (N, 3, S, S) in [0, 1]."""

    def fit_summary(self) -> dict[str, Any]:
        """Facts for the run's summary.json (e.g. where penalty images came from)."""
        return {}

    # ---- AnomalyModel
    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        if validation is None:
            images, validation = split_validation(images, None, DEFAULT_VALIDATION_SHARE, self.settings.seed)
        report = fit_network(self, images, validation)
        self.fit_info.update(report)
        self.fit_info.update(self.fit_summary())

    def _predict(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        self.network.eval()
        scores, maps = [], []
        view = images.tensors(self.settings.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        loader = DataLoader(view, batch_size=self.settings.batch_size, num_workers=self.settings.num_workers)
        for _, batch in tqdm(loader, desc=f"score {self.family}", disable=not self.settings.progress, leave=False):
            batch_scores, batch_maps = self._score_tensor(batch)
            scores.append(batch_scores)
            if with_maps:
                maps.append(batch_maps)
        return np.concatenate(scores), (np.concatenate(maps) if with_maps else None)

    @torch.no_grad()
    def _score_tensor(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.network.eval()
        images = to_device_images(images, self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp):
            scores, maps = self.score_batch(images)
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of an evaluation tensor (N, 3, S, S) in [0, 1], batch by batch."""
        step = self.settings.batch_size
        parts = [self._score_tensor(images[i:i + step]) for i in range(0, len(images), step)]
        size = self.settings.image_size
        if not parts:
            return np.zeros(0, np.float32), np.zeros((0, size, size), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def fitted_state(self) -> dict[str, Any]:
        return {"network": self.network.state_dict()}

    def load_fitted_state(self, state: dict[str, Any]) -> None:
        self.network = self.build_network()
        self.network.load_state_dict(state["network"])
        self.network.to(self.device).eval()


# ---------------------------------------------------------------- the loop

def _batches(loader: DataLoader, steps: int) -> Iterator[dict[str, Any]]:
    """`steps` batches, cycling through the loader as often as needed."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    return {key: (to_device_images(value, device, channels_last) if value.ndim == 4 else value.to(device))
            if isinstance(value, Tensor) else value for key, value in batch.items()}


def _build_scheduler(model: TrainedAnomalyModel, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = model.epochs * steps_per_epoch
    if model.schedule == "warmup_cosine":
        return warmup_cosine_schedule(optimizer, int(model.warmup_epochs * steps_per_epoch), total)
    if model.schedule == "multistep":
        milestones = sorted({max(1, int(round(float(m) * total))) for m in model.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=model.gamma)
    if model.schedule != "constant":
        raise ValueError(f"{model.family}: schedule {model.schedule!r} is not one of constant, warmup_cosine, multistep")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def _constant(step: int) -> float:
    return 1.0


def fit_network(model: TrainedAnomalyModel, images: ImageSet, validation: ValidationSet) -> dict[str, Any]:
    """Train `model.network` on the normal `images`; keep the epoch with the best validation AUROC.

    With `settings.run_dir`, writes `history.csv`, `best.pt` and `last.pt` there and resumes from
    `last.pt`. The model ends holding the best epoch's weights, calibrated on the held-out normals.
    Returns facts for summary.json (best epoch, its validation AUROC, timings, validation counts).
    """
    settings = model.settings
    device = model.device
    seed = settings.seed
    size = settings.image_size
    train_images = decode_resized(images, size, settings.progress)
    validation_images = evaluation_tensors(validation.images, size)
    kinds = np.asarray(validation.kinds if validation.kinds else ["normal"] * len(validation), dtype=object)
    labels = np.asarray(validation.labels, int)
    validation_normals = validation_images[torch.from_numpy(kinds == "normal")]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.network is None:
            model.network = model.build_network()
    network = model.network.to(device)
    if device.type == "cuda" and settings.channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = model.build_optimizer(model.parameters_to_train())
    batch_size = min(int(model.batch_size), len(train_images))
    steps_per_epoch = int(model.steps_per_epoch) or max(1, len(train_images) // batch_size)
    scheduler = _build_scheduler(model, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and settings.amp else None
    tracker = CheckpointTracker(metric="val_auroc", tie_metric="train_loss", mode="max", tie_mode="min")

    out = Path(settings.run_dir) if settings.run_dir else None
    history: list[dict[str, float]] = []
    best_state: dict[str, Tensor] | None = None
    resumed = None
    if out is not None and (out / FINISHED_MARK).exists():
        for name in (LAST_FILE, BEST_FILE, HISTORY_FILE):  # a finished fold fitted again: --force
            (out / name).unlink(missing_ok=True)
    if out is not None:
        resumed = load_training_state(out / LAST_FILE, model=network, optimizer=optimizer, scheduler=scheduler,
                                      scaler=scaler, tracker=tracker, map_location=device)
    if resumed is not None:
        history = [dict(row) for row in resumed.extra.get("history", [])]
        start_epoch = resumed.next_epoch
    setup_seconds = 0.0
    if resumed is None:
        setup_start = time.perf_counter()
        torch.manual_seed(seed)
        model.before_training(train_images)
        setup_seconds = time.perf_counter() - setup_start
        start_epoch = 0

    dataset = TrainingSamples(train_images, model, seed)
    started = time.perf_counter()
    for epoch in range(start_epoch, int(model.epochs)):
        epoch_start = time.perf_counter()
        dataset.epoch = epoch
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                            drop_last=True, num_workers=settings.num_workers)
        network.train()
        sums: dict[str, float] = {}
        bar = tqdm(_batches(loader, steps_per_epoch), total=steps_per_epoch, leave=False,
                   desc=f"{model.family} epoch {epoch + 1}/{model.epochs}", disable=not settings.progress)
        for batch in bar:
            batch = _to_device(batch, device, settings.channels_last)
            with autocast(device, settings.amp):
                output = model.training_step(batch)
            losses = output if isinstance(output, dict) else {"loss": output}
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{model.family}: training loss became {loss.item()} in epoch {epoch}; "
                                         f"lower lr (now {model.lr}) or set grad_clip")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if model.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters_to_train(), model.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        train_seconds = time.perf_counter() - epoch_start

        row: dict[str, float] = {"epoch": epoch}
        row.update({("train_loss" if k == "loss" else f"train_{k}"): v / steps_per_epoch for k, v in sums.items()})
        row.update(_validate(model, validation_images, validation_normals, labels, kinds))
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        row["train_seconds"] = train_seconds
        row["seconds"] = time.perf_counter() - epoch_start
        decision = tracker.update(epoch, row)
        history.append(row)
        if decision.improved:
            best_state = copy.deepcopy(network.state_dict())
            if out is not None:
                save_checkpoint({"model": best_state, "epoch": epoch, "metrics": row}, out / BEST_FILE)
        if out is not None:
            save_training_state(out / LAST_FILE, epoch=epoch, model=network, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, tracker=tracker, extra={"history": history})
            write_csv(pd.DataFrame(history), out / HISTORY_FILE)
        if settings.progress:
            tqdm.write(f"{model.family} epoch {epoch + 1}/{model.epochs}: loss {row.get('train_loss', math.nan):.4f}, "
                       f"val AUROC {row['val_auroc']:.4f} ({train_seconds:.1f}s); {decision.reason}")
        if tracker.should_stop(int(model.patience)):
            break

    if best_state is None and out is not None and (out / BEST_FILE).exists():
        best_state = load_checkpoint(out / BEST_FILE, map_location=device)["model"]
    if best_state is not None:
        network.load_state_dict(best_state)
    _calibrate(model, validation_normals)
    epoch_times = [row["train_seconds"] for row in history]
    return {
        "best_epoch": tracker.best_epoch,
        "best_val_auroc": tracker.best_metrics.get("val_auroc", math.nan),
        "epochs_run": len(history),
        "train_seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else math.nan,
        "setup_seconds": setup_seconds,  # before_training, e.g. EfficientAD's teacher distillation
        "fit_seconds": time.perf_counter() - started + setup_seconds,
        "resumed_from_epoch": resumed.epoch if resumed else None,
        "training_normals": len(train_images),
        "validation": {kind: int((kinds == kind).sum()) for kind in ("normal", "painted", "real")},
    }


@torch.no_grad()
def _calibrate(model: TrainedAnomalyModel, normals: Tensor) -> None:
    model.network.eval()
    if len(normals):
        model.calibrate(normals.to(model.device))


def _validate(model: TrainedAnomalyModel, images: Tensor, normals: Tensor, labels: np.ndarray,
              kinds: np.ndarray) -> dict[str, float]:
    """Validation AUROC overall, on painted defects only and on real defects only (NaN when absent)."""
    nan = {"val_auroc": math.nan, "val_auroc_painted": math.nan, "val_auroc_real": math.nan}
    if len(images) == 0:
        return nan
    _calibrate(model, normals)
    scores, _ = model.score_tensors(images)
    if not np.all(np.isfinite(scores)):
        return nan
    metrics = {"val_auroc": auroc(labels, scores)}
    normal = kinds == "normal"
    for kind in ("painted", "real"):
        keep = normal | (kinds == kind)
        metrics[f"val_auroc_{kind}"] = auroc(labels[keep], scores[keep]) if (kinds == kind).any() else math.nan
    return metrics
