"""`python -m competition train --fold k|all`: train the supervised model (a timm classifier, or SegDecNet
when `model.name` is segdec) on one fold, predict from best.pt.

Per fold, in `<paths.work>/<experiment>/<model.name>/fold<k>/`: config.yaml, last.pt (every epoch,
resumable), best.pt (best validation macro-F1, ties to the lower validation loss), history.csv,
summary.json, oof.csv and test.csv from best.pt, and plots. A finished fold is skipped unless
`--force`; a killed one resumes from last.pt and ends exactly as an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch.utils.data import DataLoader
from tqdm import tqdm

from competition.artifacts import load_checkpoint, run_dir, write_json, write_predictions, write_yaml
from competition.classifier.data import (
    EvalDataset,
    ImageStore,
    TrainDataset,
    build_eval_transform,
    classifier_geometry,
    fold_rows,
    scoring_store,
)
from competition.classifier.model import ClassifierOutput, DefectClassifier, WeightAveraged, build_classifier
from competition.classifier.segdec import SegDecNet, segdec_losses
from competition.config import SEGDEC_NAME, Config
from competition.folds import PSEUDO_FOLD, check_stage_inputs, fold_inputs, load_index, parse_fold_arg, training_folds
from competition.metrics import aupr, auroc, best_threshold, binary_metrics
from competition.plots import plot_confusion, plot_maps_gallery, plot_roc_pr, plot_training_curves
from competition.preprocess import canvas_to_image, cut_tiles, fit_to_canvas, stitch_maps
from competition.runtime import (
    autocast,
    configure_threads,
    cpu_precision,
    seed_everything,
    select_device,
    to_channels_last,
    to_device_images,
)
from competition.stage import RunFolder, results_config
from competition.training import CheckpointTracker, EngineConfig, FitResult, fit, warmup_cosine_schedule
from competition.tta import TtaMode, dihedral, tta_views

log = logging.getLogger(__name__)

# The config sections a fold's results depend on (less `stage.NEUTRAL_KEYS`).
# `mask_head` configures the timm classifier's decoder, `segdec` the segmentation-decision network: a run
# depends on the one its model.name selects. `pseudo` joins them when on (older runs' records stay valid).
RESULTS_KEYS = ("seed", "data", "folds", "model", "train", "augment", "oversample", "positives")


def run_config(cfg: Config) -> dict[str, Any]:
    """The part of the config a fold's results depend on (compared on resume and before skipping)."""
    record = results_config(cfg, RESULTS_KEYS + (("segdec",) if is_segdec(cfg) else ("mask_head",))
                            + (("pseudo",) if cfg.pseudo.enabled else ()))
    return {**record, "inputs": fold_inputs(cfg)}


def is_segdec(cfg: Config) -> bool:
    return cfg.model.name == SEGDEC_NAME


def build_model(cfg: Config) -> torch.nn.Module:
    """The supervised model `model.name` selects: SegDecNet, or a timm classifier (with its mask head)."""
    if is_segdec(cfg):
        if cfg.model.pretrained not in (False, None, ""):
            raise ValueError("model.name segdec trains from scratch; set model.pretrained: false")
        return SegDecNet(cfg.segdec)
    return build_classifier(cfg.model, cfg.mask_head)


# ---------------------------------------------------------------- losses and prediction

def classification_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float,
                        label_smoothing: float) -> torch.Tensor:
    targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return F.binary_cross_entropy_with_logits(logits.float(), targets,
                                              pos_weight=torch.tensor(pos_weight, device=logits.device))


def mask_loss(mask_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel BCE plus batch soft-Dice against the masks pooled to the map's size (soft targets).

    `valid` (B, 1, H, W), 1 on real pixels and 0 on padding, weights both terms: padding has no label."""
    if not bool(has_mask.any()):
        return mask_logits.sum() * 0.0
    logits = mask_logits.float()[has_mask]
    targets = F.adaptive_avg_pool2d(masks[has_mask], logits.shape[-2:])
    if valid is None:
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        probs = torch.sigmoid(logits)
    else:
        weights = F.adaptive_avg_pool2d(valid[has_mask], logits.shape[-2:])
        bce = ((F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).sum()
               / weights.sum().clamp_min(1.0))
        probs, targets = torch.sigmoid(logits) * weights, targets * weights
    dice = 1.0 - (2.0 * (probs * targets).sum() + 1.0) / (probs.sum() + targets.sum() + 1.0)
    return bce + dice


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device, cfg: Config,
                   tta: TtaMode | bool = "none", desc: str = "predict") -> np.ndarray:
    """Image logits in dataset order; with `tta`, the mean logit over its views (competition.tta: flips, or
    all eight flips and quarter turns), of each tile when the dataset holds tiles (`EvalDataset.image_logits`
    then reduces them to one per image)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    views = tta_views(tta)
    out = np.zeros(len(loader.dataset), np.float64)
    for images, index in tqdm(loader, desc=desc, leave=False):
        images = to_device_images(images, device, cfg.train.channels_last)
        total = 0.0
        for k in views:
            with autocast(device, cfg.train.amp, cfg.train.cpu_amp):
                logits = model(dihedral(images, k))
            total = total + logits.float()
        out[index.numpy()] = (total / len(views)).cpu().numpy()
    return loader.dataset.image_logits(out)


def load_fold_classifier(cfg: Config, fold_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """A fold's best.pt as the model that wrote its predictions: `build_model(cfg)` (inside the weight
    average when `train.ema`), in eval mode on `device`. `model(images)` gives (B,) logits."""
    path = Path(fold_dir) / "best.pt"
    if not path.is_file():
        fold = Path(fold_dir).name.removeprefix("fold")
        raise FileNotFoundError(f"{path} does not exist: train the fold first (make train FOLD={fold})")
    # best.pt holds every weight: the initial ones (model.pretrained) need not be at hand any more
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False)))
    if cfg.train.ema:
        model = WeightAveraged(model, cfg.train.ema_decay)
    model.load_state_dict(load_checkpoint(path)["model"])
    return to_channels_last(model.to(device).eval(), cfg.train.channels_last)


def image_scores(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], paths: list[str], cfg: Config,
                 store: ImageStore, device: torch.device, desc: str = "predict") -> np.ndarray:
    """Defect probabilities of the images at `paths` as test.csv holds them: the evaluation pipeline, the
    config's TTA, tiles reduced to one logit per image, then the sigmoid. `model` may also be an exported
    graph's forward (`competition.export.classifier_forward`): any callable from a batch to (B,) logits."""
    if not paths:
        return np.zeros(0)
    return expit(predict_logits(model, eval_loader(paths, cfg, store, device), device, cfg, cfg.train.tta, desc=desc))


def eval_loader(paths: list[str], cfg: Config, store: ImageStore, device: torch.device) -> DataLoader:
    """Validation, test and new images in order, through the evaluation pipeline (nothing random)."""
    return DataLoader(EvalDataset(list(paths), cfg.augment, store), batch_size=cfg.train.batch_size * 2,
                      shuffle=False, num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")


@torch.no_grad()
def predict_map(model: torch.nn.Module, surface: np.ndarray, store: ImageStore, device: torch.device,
                cfg: Config) -> np.ndarray | None:
    """The model's defect-probability map of one stored image, on its surface (`ImageStore.image`): tiles
    stitched back, padding cropped. None for a model without a segmentation output."""
    geometry = store.geometry
    transform = build_eval_transform(cfg.augment)
    boxes = store.boxes_of(surface) if geometry.tiles else None
    pieces = cut_tiles(surface, boxes) if boxes is not None else [surface]
    maps = []
    model.eval()
    for piece in pieces:
        canvas = transform(image=fit_to_canvas(piece, geometry)[0])["image"][None]
        with autocast(device, cfg.train.amp, cfg.train.cpu_amp):
            seg = model.forward_all(to_device_images(canvas, device, cfg.train.channels_last)).mask_logits
        if seg is None:
            return None
        probability = torch.sigmoid(seg.float())[0, 0].cpu().numpy()
        maps.append(canvas_to_image(probability, piece.shape[0], piece.shape[1], geometry))
    return maps[0] if boxes is None else stitch_maps(maps, boxes, surface.shape[:2])


def validation_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Loss, accuracy, AUROC, AUPR and macro-F1 at 0.5 and at the fold's best threshold."""
    scores = expit(logits)
    loss = F.binary_cross_entropy_with_logits(torch.tensor(logits, dtype=torch.float64),
                                              torch.tensor(labels, dtype=torch.float64))
    at_half = binary_metrics(labels, scores, 0.5)
    threshold, f1 = best_threshold(labels, scores)
    at_best = binary_metrics(labels, scores, threshold)
    return {
        "val_loss": float(loss),
        "val_accuracy_at_05": at_half["accuracy"],
        "val_macro_f1_at_05": at_half["macro_f1"],
        "val_auroc": auroc(labels, scores),
        "val_aupr": aupr(labels, scores),
        "val_threshold": threshold,
        "val_accuracy": at_best["accuracy"],
        "val_macro_f1": f1,
    }


# ---------------------------------------------------------------- one fold

class FoldTrainer:
    """Everything one fold needs, built once: data, model, optimizer, schedule, tracker."""

    def __init__(self, cfg: Config, fold: int, folds: pd.DataFrame, test_rows: pd.DataFrame, store: ImageStore,
                 device: torch.device):
        self.cfg, self.fold, self.device, self.store = cfg, fold, device, store
        self.out = run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)
        train_rows, self.val_rows = fold_rows(folds, fold)
        pseudo = train_rows.loc[train_rows["fold"] == PSEUDO_FOLD, "label"]
        self.pseudo_note = (f" (with {int((pseudo == 0).sum())} pseudo-normal and {int((pseudo == 1).sum())} "
                            "pseudo-defect test images)" if len(pseudo) else "")
        self.test_rows = test_rows.reset_index(drop=True)
        if store.geometry != classifier_geometry(cfg):  # a store made for another geometry: decode afresh
            self.store = store = ImageStore(classifier_geometry(cfg), keep=store.keep)
        seed_everything(cfg.seed + fold)
        self.model: DefectClassifier | SegDecNet | WeightAveraged = to_channels_last(build_model(cfg).to(device),
                                                                                     cfg.train.channels_last)
        self.with_masks = is_segdec(cfg) or self.model.decoder is not None
        self.epoch = 0
        trained = self.model.parameters()  # the average (train.ema) is not optimised, only updated
        if cfg.train.ema:
            self.model = WeightAveraged(self.model, cfg.train.ema_decay)
        self.train_set = TrainDataset(train_rows, cfg, store, with_masks=self.with_masks)
        t = cfg.train
        self.drop_last = len(self.train_set) > t.batch_size  # no 1-image BatchNorm batch at the end
        n_batches = (len(self.train_set) // t.batch_size if self.drop_last
                     else math.ceil(len(self.train_set) / t.batch_size))
        self.steps_per_epoch = math.ceil(n_batches / t.accumulate_steps)
        self.optimizer = torch.optim.AdamW(trained, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = warmup_cosine_schedule(self.optimizer, round(t.warmup_epochs * self.steps_per_epoch),
                                                t.epochs * self.steps_per_epoch)
        self.tracker = CheckpointTracker(metric=t.monitor, tie_metric="val_loss")
        self.epochs_trained = 0
        self.val_logits: dict[int, np.ndarray] = {}  # validation logits by epochs trained: oof.csv reuses the best's

    def loader(self, dataset, batch_size: int, drop_last: bool = False) -> DataLoader:
        workers = self.cfg.train.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          drop_last=drop_last, pin_memory=self.device.type == "cuda")

    def eval_loader(self, rows: pd.DataFrame) -> DataLoader:
        return eval_loader(rows["path"].astype(str).tolist(), self.cfg, self.store, self.device)

    def epoch_batches(self, epoch: int) -> DataLoader:
        self.epoch, self.epochs_trained = epoch, epoch + 1
        self.train_set.set_epoch(epoch)
        return self.loader(self.train_set, self.cfg.train.batch_size, self.drop_last)

    def after_step(self, step: int) -> None:
        """After each optimizer step: the weight average follows (its warmup counts global steps)."""
        self.model.update(self.epoch * self.steps_per_epoch + step // self.cfg.train.accumulate_steps + 1)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The image BCE, plus the weighted mask loss when the mask head is on."""
        t = self.cfg.train
        images = to_device_images(batch["image"], self.device, t.channels_last)
        labels = batch["label"].to(self.device, non_blocking=True)
        output: ClassifierOutput = self.model.forward_all(images)
        if is_segdec(self.cfg):  # the paper's balanced segmentation + decision loss
            return segdec_losses(output, batch, self.device, self.epoch, t.epochs, self.cfg.segdec, t.pos_weight)
        loss = classification_loss(output.class_logit, labels, t.pos_weight, t.label_smoothing)
        if output.mask_logits is None:
            return {"loss": loss, "class_loss": loss}
        valid = batch.get("valid")  # padded geometries only
        seg = mask_loss(output.mask_logits, batch["mask"].to(self.device, non_blocking=True),
                        batch["has_mask"].to(self.device, non_blocking=True),
                        None if valid is None else valid.to(self.device, non_blocking=True))
        return {"loss": loss + self.cfg.mask_head.loss_weight * seg, "class_loss": loss, "mask_loss": seg}

    def validate(self) -> dict[str, float]:
        labels = self.val_rows["label"].astype(int).to_numpy()
        logits = predict_logits(self.model, self.eval_loader(self.val_rows), self.device, self.cfg, desc="validate")
        self.val_logits[self.epochs_trained] = logits
        return validation_metrics(labels, logits)

    # -- the whole fold

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        write_yaml(cfg.to_dict(), self.out / "config.yaml")
        print(f"fold {self.fold}: training on {self.train_set.describe()} per epoch{self.pseudo_note}; validating on "
              f"{len(self.val_rows)} images ({int(self.val_rows['label'].sum())} defect); device {self.device}")
        engine = EngineConfig(
            epochs=t.epochs, name=f"fold {self.fold}", grad_clip=t.grad_clip, accumulate_steps=t.accumulate_steps,
            amp=t.amp, cpu_amp=t.cpu_amp, patience=t.patience, validate_from=t.validate_from, out=self.out,
            record=run_config(cfg),
            shown_metrics=("val_loss", "val_accuracy_at_05", "val_auroc", "val_macro_f1_at_05", "val_macro_f1",
                           "val_threshold"))
        result = fit(self.model, self.optimizer, self.epoch_batches, self.training_step, engine, device=self.device,
                     validate=self.validate, scheduler=self.scheduler, tracker=self.tracker,
                     after_step=self.after_step if t.ema else None)
        return self.finish(result)

    def finish(self, result: FitResult) -> dict[str, Any]:
        """Predictions from the best epoch (oof.csv, test.csv), plots and summary.json."""
        cfg, history = self.cfg, result.history
        labels = self.val_rows["label"].astype(int).to_numpy()
        best = self.tracker.best_epoch
        scoring = scoring_store(self.store, cfg)
        if tta_views(cfg.train.tta) == tta_views("none") and scoring is self.store and best in self.val_logits:
            oof_logits = self.val_logits[best]  # the restored best weights scored these in validation already
        else:  # with TTA or a denser scoring grid, or the best epoch validated before a resume
            oof_logits = predict_logits(self.model, eval_loader(self.val_rows["path"].astype(str).tolist(), cfg,
                                                                scoring, self.device),
                                        self.device, cfg, cfg.train.tta, desc="oof")
        test_scores = image_scores(self.model, self.test_rows["path"].astype(str).tolist(), cfg, scoring,
                                   self.device, desc="test")
        oof = pd.DataFrame({"image_id": self.val_rows["image_id"].astype(str), "label": labels,
                            "score": expit(oof_logits)})
        test = pd.DataFrame({"image_id": self.test_rows["image_id"].astype(str), "score": test_scores})
        write_predictions(oof, test, self.out)
        threshold, _ = best_threshold(labels, oof["score"])
        oof_metrics = {**binary_metrics(labels, oof["score"], threshold), "auroc": auroc(labels, oof["score"]),
                       "aupr": aupr(labels, oof["score"]),
                       "macro_f1_at_05": binary_metrics(labels, oof["score"], 0.5)["macro_f1"]}
        title = f"{cfg.experiment} / {cfg.model.name} / fold {self.fold}"
        frame = pd.DataFrame(history)
        plot_training_curves(frame, self.out / "curves.png", title, best_epoch=self.tracker.best_epoch,
                             loss_columns=("train_class_loss", "train_mask_loss", "val_loss"))
        plot_roc_pr(labels, oof["score"], self.out / "roc_pr.png", title)
        plot_confusion(labels, oof["score"], threshold, self.out / "confusion.png",
                       f"fold {self.fold}, threshold {threshold:.3g}: macro-F1 {oof_metrics['macro_f1']:.3f}")
        self.plot_validation_maps(oof, title)
        summary = {
            "fold": self.fold,
            "model": cfg.model.name,
            "best_epoch": self.tracker.best_epoch,
            "epochs_run": len(history),
            "stopped_early": result.stopped_early,
            "monitor": cfg.train.monitor,
            "best_metrics": self.tracker.best_metrics,
            "oof": oof_metrics,
            "tta": cfg.train.tta,
            "train_seconds": float(sum(h["train_seconds"] for h in history)),
            "samples_per_epoch": self.train_set.describe(),
            "config": run_config(cfg),
        }
        write_json(summary, self.out / "summary.json")  # last: its presence marks the fold finished
        print(f"fold {self.fold}: best epoch {self.tracker.best_epoch} -> oof AUROC {oof_metrics['auroc']:.3f} "
              f"macro-F1 {oof_metrics['macro_f1']:.3f} at {threshold:.3f} ({oof_metrics['macro_f1_at_05']:.3f} at 0.5)")
        print(self.out)
        return summary


    def plot_validation_maps(self, oof: pd.DataFrame, title: str, size: int = 12) -> None:
        """maps.png: predicted defect maps of the fold's validation images (its defects first, then the
        highest-scored normals), for a model with a segmentation output."""
        order = oof.assign(path=self.val_rows["path"].astype(str).to_numpy()).sort_values(
            ["label", "score"], ascending=False).head(size)
        images, maps, captions = [], [], []
        for row in order.itertuples():
            surface = self.store.image(row.path)
            probability = predict_map(self.model, surface, self.store, self.device, self.cfg)
            if probability is None:
                return
            images.append(surface)
            maps.append(probability)
            captions.append(f"{row.image_id} {'defect' if row.label else 'normal'} {row.score:.2f}")
        plot_maps_gallery(images, maps, captions, self.out / "maps.png", f"{title}: validation maps")


_FOLD_FILES = ("oof.csv", "test.csv", "history.csv", "best.pt", "last.pt", "config.yaml", "curves.png",
               "roc_pr.png", "confusion.png", "maps.png")


def run_folder(out: Path) -> RunFolder:
    """A fold's outputs: summary.json, written last, marks it finished (with oof.csv and test.csv)."""
    return RunFolder(marker=out / "summary.json", outputs=tuple(out / name for name in _FOLD_FILES),
                     required=(out / "oof.csv", out / "test.csv"), redo="retrain this fold")


def train_fold(cfg: Config, fold: int, folds: pd.DataFrame, test_rows: pd.DataFrame, store: ImageStore,
               device: torch.device, force: bool = False) -> dict[str, Any]:
    out = run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)
    summary = run_folder(out).prepare(run_config(cfg), force)
    if summary is not None:
        print(f"fold {fold}: already trained ({out / 'summary.json'}); --force retrains it")
        return summary
    started = time.perf_counter()
    summary = FoldTrainer(cfg, fold, folds, test_rows, store, device).fit()
    log.info("fold %d took %.1f s", fold, time.perf_counter() - started)
    return summary


def main(cfg: Config, fold: str, force: bool = False) -> None:
    """CLI entry point: train fold `fold` ("all" or an integer) of the classifier."""
    fold_ids = parse_fold_arg(fold, cfg.folds.n_splits)
    device = select_device(cfg.device)
    threads = configure_threads(cfg.train.threads)
    index = load_index(cfg)
    folds = training_folds(cfg, index)
    check_stage_inputs(cfg, index)
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    geometry = classifier_geometry(cfg)
    store = ImageStore(geometry, keep=cfg.train.cache_images)
    if cfg.train.num_workers > 0:  # workers fork after this, sharing the decoded images
        store.preload(list(folds["path"].astype(str)) + list(test_rows["path"].astype(str)))
    shape = "" if geometry.is_square else " (" + ", ".join(f"{k} {v}" for k, v in geometry.describe().items()) + ")"
    print(f"classifier {cfg.model.name} at {cfg.model.image_size}px{shape} on {device}"
          f"{f' ({threads} threads, {cpu_precision(cfg.train.cpu_amp)})' if device.type == 'cpu' else ''}; "
          f"folds {fold_ids}")
    started = time.perf_counter()
    results = [train_fold(cfg, k, folds, test_rows, store, device, force) for k in fold_ids]
    if len(results) > 1:
        table = pd.DataFrame([{"fold": r["fold"], "best_epoch": r["best_epoch"], "auroc": r["oof"]["auroc"],
                               "macro_f1": r["oof"]["macro_f1"]} for r in results])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"trained {len(fold_ids)} fold(s) in {time.perf_counter() - started:.1f} s")
