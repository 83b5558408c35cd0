"""The trained zoo models (STFPM, Reverse Distillation, EfficientAD, DRAEM, FastFlow, CFlow, U-Flow):
their data pipelines, optimiser and schedule, and validation AUROC inside the training folds, run by
the project's one training engine (`competition.training.fit`: best checkpoint by that AUROC,
`history.csv`, atomic `best.pt`/`last.pt`, exact resume).

Why a validation signal: the held-out fold must stay untouched, so the best epoch is chosen on the
`ValidationSet` the runner builds inside the training folds (`zoo.validation.split_validation`: a
held-out slice of the training normals, the same images with a painted defect, and the training
folds' real defects). Its AUROC (painted and real also apart) goes to `history.csv` every epoch.

Two data pipelines, never mixed. Training: the training normals are decoded and fitted to the
canvas once, then every sample goes through `training_sample(image, rng)` (albumentations from the
`augment` hyperparameter, a model's own synthetic anomalies, ...). Evaluation (validation,
calibration, scoring): the frame's `ImageSet.tensors` and nothing else. Both fit images to the
canvas by the settings' one geometry (`zoo.resize`: square stretch or letterbox; with tiles the
model only ever sees tiles) and hand the network RGB in [0, 1]; networks that want ImageNet
statistics normalise inside (`components.normalise.ImageNormalise`).

How to add a trained model (see models/stfpm.py for a short one)::

    @dataclass
    class MyParams(TrainParams, BackboneParams):    # the loop's hyperparameters with this model's defaults
        epochs: int = 20
        my_width: int = 64

    class My(TrainedAnomalyModel):
        family = "my"
        params_class = MyParams
        def build_model(self) -> nn.Module:              # MyModel: every module, frozen parts included
            return MyModel(...)
        def training_step(self, batch) -> Tensor:        # batch: dict of tensors on the device
            return loss                                  # or {"loss": total, "l2": ..., ...}
        def score_batch(self, images) -> tuple[Tensor, Tensor]:  # eval mode, no grad, (B,3,S,S) in [0,1]
            return scores (B,), maps (B, S, S)
    register("my-resnet18", My, "one line", epochs=10)

Optional hooks: `training_sample` (per-sample data, e.g. painted anomalies; default: the augmented
image as {"image": tensor}), `parameters_to_train`, `build_optimizer` (default from the
`optimizer` hyperparameter), `before_training` (once per fresh fit, e.g. teacher distillation),
`calibrate` (before each validation and after the fit, on the held-out clean normals, e.g. map
quantiles), `fit_summary` (facts for summary.json), `before_sampling` (every fit, in the main process:
the canvas-sized training images, e.g. to build a transplant bank). `self.model` holds every module, so one
state_dict is the whole fitted model; statistics the scoring needs are registered buffers.

Supervised models: a model whose `uses_defects` is true (a ClassVar, or a property of its params) gets
`fit(normals, validation, defects)`, a `DefectSet` of the training folds' real defects with their masks
(None where only the image label is known). Each defect is one more sample of every epoch, drawn
through `defect_sample(image, mask, rng)` (same keys as `training_sample`, one batch mixes both);
`augmented_with_mask` applies the `augment` pipeline to an image and its mask alike. The runner
holds a share of those defects back for the validation set (`zoo.validation.split_defects`), so no
defect is both trained on and judged on.

Determinism and resume: per-sample randomness is `np.random.default_rng([seed, epoch, index])`
and the batch order comes from a generator seeded by (seed, epoch), so a run resumed from
`last.pt` continues exactly as an uninterrupted one (torch's own RNG, e.g. dropout, is restored by
the engine). last.pt records `fit_record` (the hyperparameters and the settings the training
depends on); resuming with others refuses, naming them (`zoo.params.lr: ...`). A finished run
re-fitted in the same run_dir resumes at its end: it reloads best.pt without training (the runner's
`--force` clears the folder first).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from competition.metrics import auroc
from competition.preprocess import Geometry, build_albumentations, fit_mask_to_canvas, fit_to_canvas
from competition.runtime import autocast, to_channels_last, to_device_images
from competition.stage import json_form
from competition.training import CheckpointTracker, EngineConfig, fit, warmup_cosine_schedule
from competition.zoo.api import AnomalyModel, DefectSet, ImageSet, ValidationSet, unit_tensor
from competition.zoo.components.features import calibrate_backbones
from competition.zoo.validation import split_validation


@dataclass
class TrainParams:
    """Hyperparameters of the loop itself; every trained model's params dataclass extends it with its own defaults."""

    epochs: int = 10
    steps_per_epoch: int = 0  # 0 = one pass over the training normals
    batch_size: int = 8  # training batch (scoring uses the run's zoo.batch_size)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-2
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "constant"
    warmup_epochs: float = 0.0  # warmup_cosine only
    milestones: tuple[float, ...] = ()  # multistep: fractions of all steps where lr *= gamma
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    augment: list[dict[str, Any]] = field(default_factory=list)  # albumentations [{name: HorizontalFlip, p: 0.5}]
    patience: int = 0  # stop after this many epochs without a better validation AUROC; 0 = off


# Share of the training normals held out when `fit` gets no ValidationSet (direct API use); the
# runner holds out `zoo.validation_share` itself.
DEFAULT_VALIDATION_SHARE = 0.2


def fit_record(model: AnomalyModel) -> dict[str, Any]:
    """What a zoo model's training depends on, keyed as in the config (`seed`, `zoo.image_size`,
    `zoo.params.lr`, ...): last.pt keeps it, and a resume with another one refuses."""
    s = model.settings
    zoo = {"image_size": s.image_size, "batch_size": s.batch_size, "mean": s.mean, "std": s.std, "amp": s.amp,
           "backbone_weights": s.backbone_weights, "params": model.get_params()}
    if s.cpu_amp != "off":  # only when on, so records of full-precision runs stay as they were
        zoo["cpu_amp"] = s.cpu_amp
    # Geometry keys only off the square default, so records of square runs stay as they were.
    if s.resize != "square":
        zoo["resize"] = s.resize
    if s.tiles:
        zoo["tiles"] = {"enabled": True, "size": s.tile_size, "overlap": s.tile_overlap, "scale": s.tile_scale}
    return json_form({"seed": s.seed, "zoo": zoo})


# ---------------------------------------------------------------- the two data pipelines

def evaluation_tensors(images: ImageSet, image_size: int, resize: str = "square") -> Tensor:
    """The evaluation pipeline, all at once: (N, 3, S, S) in [0, 1], each image fitted to the canvas
    (`resize`: square or letterbox, as `ImageSet.tensors`), no augmentation ever."""
    view = images.tensors(image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=resize)
    if len(view) == 0:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.stack([view[i][1] for i in range(len(view))])


def decode_resized(images: ImageSet, image_size: int, progress: bool = False, resize: str = "square") -> np.ndarray:
    """(N, S, S, 3) uint8: the training normals, decoded and fitted to the canvas once for the whole fit
    (`resize` as `evaluation_tensors`, so training and scoring see the same geometry)."""
    geometry = Geometry(image_size=image_size, resize=resize)
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    for i in tqdm(range(len(images)), desc="decode", disable=not progress, leave=False):
        out[i] = fit_to_canvas(images.read(i), geometry)[0]
    return out


def build_augmentation(spec: list[dict[str, Any]], key: str):
    """albumentations.Compose from [{name: HorizontalFlip, p: 0.5}, ...]; None when empty."""
    if not spec:
        return None
    import albumentations as A

    return A.Compose(build_albumentations(spec, key))


def decode_masks(defects: DefectSet, image_size: int, resize: str = "square") -> list[np.ndarray | None]:
    """The defects' masks fitted to the canvas as their images are ((S, S) uint8 {0, 255}; None stays None)."""
    import cv2

    geometry = Geometry(image_size=image_size, resize=resize)
    out: list[np.ndarray | None] = []
    for i, mask in enumerate(defects.masks):
        if mask is None:
            out.append(None)
            continue
        mask = np.asarray(mask)
        mask = mask.max(axis=2) if mask.ndim == 3 else mask
        height, width = defects.images.shape(i)
        if mask.shape != (height, width):  # a mask saved at another size than its image
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        out.append(np.where(fit_mask_to_canvas(mask, geometry)[0] > 0, 255, 0).astype(np.uint8))
    return out


class TrainingSamples(Dataset):
    """Training normals through the model's `training_sample`, then (a model that `uses_defects`) the real
    defects through its `defect_sample`, with per-(epoch, index) randomness."""

    def __init__(self, images: np.ndarray, model: TrainedAnomalyModel, seed: int, defects: np.ndarray | None = None,
                 defect_masks: list[np.ndarray | None] | None = None):
        self.images, self.model, self.seed, self.epoch = images, model, seed, 0
        self.defects = defects if defects is not None else np.zeros((0,) + images.shape[1:], np.uint8)
        self.defect_masks = list(defect_masks) if defect_masks is not None else [None] * len(self.defects)

    def __len__(self) -> int:
        return len(self.images) + len(self.defects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if index < len(self.images):
            return self.model.training_sample(self.images[index], rng)
        index -= len(self.images)
        return self.model.defect_sample(self.defects[index], self.defect_masks[index], rng)


# ---------------------------------------------------------------- the model face

class TrainedAnomalyModel(AnomalyModel):
    """An AnomalyModel whose `fit` trains `self.model` with the shared loop (see the module doc)."""

    params_class = TrainParams
    params: TrainParams
    uses_validation = True

    # ---- what a model supplies
    def build_model(self) -> nn.Module:
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

    def defect_sample(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> dict[str, Any]:
        """One training sample from a real defect (a model that `uses_defects`): uint8 (S, S, 3) on the canvas
        and its (S, S) uint8 {0, 255} mask, or None where only the image label is known. Its keys must be
        those of `training_sample`'s (one batch mixes both)."""
        raise NotImplementedError(f"{self.family}: uses_defects needs a defect_sample")

    def before_sampling(self, normals: np.ndarray, defects: np.ndarray, defect_masks: list[np.ndarray | None]) -> None:
        """Every fit (fresh or resumed), in the main process, before any training sample is drawn: the canvas-
        sized normals, real defects and their masks (none for a model that does not `uses_defects`)."""

    def augmented(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`image` through the `augment` pipeline (training only), seeded from `rng`."""
        return self.augmented_with_mask(image, None, rng)[0]

    def augmented_with_mask(self, image: np.ndarray, mask: np.ndarray | None,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """`image` and its mask through the `augment` pipeline, the same geometric changes on both."""
        if not hasattr(self, "_augmentation"):
            self._augmentation = build_augmentation(self.params.augment, f"{self.family}.augment")
        if self._augmentation is None:
            return image, mask
        self._augmentation.set_random_seed(int(rng.integers(2**31)))
        if mask is None:
            return self._augmentation(image=image)["image"], None
        out = self._augmentation(image=image, mask=mask)
        return out["image"], out["mask"]

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        if p.optimizer == "sgd":
            return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        optimiser = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
        return optimiser(params, lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)

    def before_training(self, normals: np.ndarray) -> None:
        """Once before the first epoch of a fresh fit (not on resume); normals: (N, S, S, 3) uint8."""

    def calibrate(self, normals: Tensor) -> None:
        """Before every validation and after the fit: held-out clean normals (N, 3, S, S) in [0, 1]."""

    def fit_summary(self) -> dict[str, Any]:
        """Facts for the run's summary.json (e.g. where penalty images came from)."""
        return {}

    # ---- AnomalyModel
    def _fit(self, images: ImageSet, validation: ValidationSet | None, defects: DefectSet | None = None) -> None:
        if validation is None:
            images, validation = split_validation(images, None, DEFAULT_VALIDATION_SHARE, self.settings.seed)
        report = fit_network(self, images, validation, defects)
        self.fit_info.update(report)
        self.fit_info.update(self.fit_summary())

    def _predict(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        self.model.eval()
        scores, maps = [], []
        view = images.tensors(self.settings.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                              resize=self.settings.resize)
        loader = DataLoader(view, batch_size=self.settings.batch_size, num_workers=self.settings.num_workers)
        for _, batch in tqdm(loader, desc=f"score {self.family}", disable=not self.settings.progress, leave=False):
            batch_scores, batch_maps = self._score_tensor(batch)
            scores.append(batch_scores)
            if with_maps:
                maps.append(batch_maps)
        return np.concatenate(scores), (np.concatenate(maps) if with_maps else None)

    @torch.no_grad()
    def _score_tensor(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        images = to_device_images(images, self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp, self.settings.cpu_amp):
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


# ---------------------------------------------------------------- the loop

class CycledBatches:
    """`steps` batches, cycling through the loader as often as needed: an epoch of a fixed length."""

    def __init__(self, loader: DataLoader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        done = 0
        while done < self.steps:
            for batch in self.loader:
                yield batch
                done += 1
                if done == self.steps:
                    return


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    return {key: (to_device_images(value, device, channels_last) if value.ndim == 4 else value.to(device))
            if isinstance(value, Tensor) else value for key, value in batch.items()}


def _build_scheduler(model: TrainedAnomalyModel, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = model.params.epochs * steps_per_epoch
    if model.params.schedule == "warmup_cosine":
        return warmup_cosine_schedule(optimizer, int(model.params.warmup_epochs * steps_per_epoch), total)
    if model.params.schedule == "multistep":
        milestones = sorted({max(1, int(round(float(m) * total))) for m in model.params.milestones})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=model.params.gamma)
    if model.params.schedule != "constant":
        raise ValueError(f"{model.family}: schedule {model.params.schedule!r} is not one of constant, warmup_cosine, "
                         "multistep")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def _constant(step: int) -> float:
    return 1.0


def fit_network(model: TrainedAnomalyModel, images: ImageSet, validation: ValidationSet,
                defects: DefectSet | None = None) -> dict[str, Any]:
    """Train `model.model` on the normal `images` (and, for a model that `uses_defects`, the labelled real
    `defects`: each is one more sample of every epoch, through `defect_sample`) with `training.fit`; keep
    the epoch with the best validation AUROC (ties: the lower training loss).

    With `settings.run_dir`, the engine writes `history.csv`, `best.pt` and `last.pt` there and
    resumes from `last.pt`. The model ends holding the best epoch's weights, calibrated on the
    held-out normals. Returns facts for summary.json (best epoch, its validation AUROC, timings,
    validation counts).
    """
    settings, p = model.settings, model.params
    device = model.device
    seed = settings.seed
    size = settings.image_size
    train_images = decode_resized(images, size, settings.progress, settings.resize)
    validation_images = evaluation_tensors(validation.images, size, settings.resize)
    kinds = np.asarray(validation.kinds if validation.kinds else ["normal"] * len(validation), dtype=object)
    labels = np.asarray(validation.labels, int)
    validation_normals = validation_images[torch.from_numpy(kinds == "normal")]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.model is None:
            model.model = model.build_model()
    calibrate_backbones(model.model.to(device), train_images, settings)  # healthy random backbones only
    network = to_channels_last(model.model.to(device), settings.channels_last)
    trained = model.parameters_to_train()
    optimizer = model.build_optimizer(trained)
    defect_images = defect_masks = None
    if defects is not None:
        defect_images = decode_resized(defects.images, size, settings.progress, settings.resize)
        defect_masks = decode_masks(defects, size, settings.resize)
        model.before_sampling(train_images, defect_images, defect_masks)
    else:
        model.before_sampling(train_images, train_images[:0], [])
    dataset = TrainingSamples(train_images, model, seed, defect_images, defect_masks)
    batch_size = min(int(p.batch_size), len(dataset))
    steps_per_epoch = int(p.steps_per_epoch) or max(1, len(dataset) // batch_size)
    scheduler = _build_scheduler(model, optimizer, steps_per_epoch)
    tracker = CheckpointTracker(metric="val_auroc", tie_metric="train_loss", mode="max", tie_mode="min")
    setup_seconds = 0.0

    def before_training() -> None:
        nonlocal setup_seconds
        setup_start = time.perf_counter()
        torch.manual_seed(seed)
        model.before_training(train_images)
        setup_seconds = time.perf_counter() - setup_start

    def epoch_batches(epoch: int) -> CycledBatches:
        dataset.epoch = epoch
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                            drop_last=True, num_workers=settings.num_workers)
        return CycledBatches(loader, steps_per_epoch)

    def training_step(batch: dict[str, Any]) -> Tensor | dict[str, Tensor]:
        return model.training_step(_to_device(batch, device, settings.channels_last))

    def validate() -> dict[str, float]:
        if len(validation_images) == 0:
            return validation_aurocs(np.zeros(0), labels, kinds)
        _calibrate(model, validation_normals)
        return validation_aurocs(model.score_tensors(validation_images)[0], labels, kinds)

    engine = EngineConfig(epochs=int(p.epochs), name=model.family, grad_clip=float(p.grad_clip), **settings.precision(),
                          patience=int(p.patience), out=settings.run_dir, record=fit_record(model),
                          shown_metrics=("val_auroc",), progress=settings.progress)
    started = time.perf_counter()
    result = fit(network, optimizer, epoch_batches, training_step, engine, device=device, validate=validate,
                 scheduler=scheduler, tracker=tracker, parameters=trained, on_fresh_start=before_training)
    _calibrate(model, validation_normals)
    epoch_times = [row["train_seconds"] for row in result.history]
    facts = {} if defects is None else {"training_defects": len(defects),
                                        "training_defects_with_mask": sum(m is not None for m in defects.masks)}
    return {
        "best_epoch": result.best_epoch,
        "best_val_auroc": tracker.best_metrics.get("val_auroc", math.nan),
        "epochs_run": len(result.history),
        "train_seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else math.nan,
        "setup_seconds": setup_seconds,  # before_training, e.g. EfficientAD's teacher distillation
        "fit_seconds": time.perf_counter() - started,
        "resumed_from_epoch": result.resumed_after,
        "training_normals": len(train_images),
        "validation": {kind: int((kinds == kind).sum()) for kind in ("normal", "painted", "real")},
        **facts,
    }


@torch.no_grad()
def _calibrate(model: TrainedAnomalyModel, normals: Tensor) -> None:
    model.model.eval()
    if len(normals):
        model.calibrate(normals.to(model.device))


def validation_aurocs(scores: np.ndarray, labels: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Validation AUROC overall, on painted defects only and on real defects only (NaN when absent)."""
    nan = {"val_auroc": math.nan, "val_auroc_painted": math.nan, "val_auroc_real": math.nan}
    if len(scores) == 0 or not np.all(np.isfinite(scores)):
        return nan
    metrics = {"val_auroc": auroc(labels, scores)}
    normal = kinds == "normal"
    for kind in ("painted", "real"):
        keep = normal | (kinds == kind)
        metrics[f"val_auroc_{kind}"] = auroc(labels[keep], scores[keep]) if (kinds == kind).any() else math.nan
    return metrics
