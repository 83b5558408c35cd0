"""`python -m competition train --fold k|all`: train the classifier on one fold, predict from best.pt.

Per fold, in `<paths.work>/<experiment>/<model.name>/fold<k>/`: config.yaml, last.pt (every epoch,
resumable), best.pt (best validation macro-F1, ties to the lower validation loss), history.csv,
summary.json, oof.csv and test.csv from best.pt, and plots. A finished fold is skipped unless
`--force`; a killed one resumes from last.pt and ends exactly as an uninterrupted run would.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch.utils.data import DataLoader
from tqdm import tqdm

from competition.artifacts import (
    load_checkpoint,
    read_json,
    run_dir,
    save_checkpoint,
    write_csv,
    write_json,
    write_predictions,
    write_yaml,
)
from competition.classifier.data import EvalDataset, ImageStore, TrainDataset, fold_rows
from competition.classifier.model import ClassifierOutput, DefectClassifier, build_classifier
from competition.config import Config
from competition.folds import load_index, parse_fold_arg, read_folds
from competition.metrics import aupr, auroc, best_threshold, binary_metrics
from competition.plots import plot_confusion, plot_roc_pr, plot_training_curves
from competition.runtime import autocast, configure_threads, select_device, seed_everything, to_device_images
from competition.training import CheckpointTracker, load_training_state, save_training_state, warmup_cosine_schedule

log = logging.getLogger(__name__)

# Keys that change how fast a run goes, never what it computes: they may differ on resume.
_NEUTRAL_TRAIN_KEYS = ("num_workers", "threads", "cache_images")


def run_config(cfg: Config) -> dict[str, Any]:
    """The part of the config a fold's results depend on (compared on resume and before skipping)."""
    data = cfg.to_dict()
    train = {k: v for k, v in data["train"].items() if k not in _NEUTRAL_TRAIN_KEYS}
    return {"seed": data["seed"], "data": data["paths"]["data"], "folds": data["folds"], "model": data["model"],
            "train": train, "augment": data["augment"], "oversample": data["oversample"],
            "positives": data["positives"], "mask_head": data["mask_head"]}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _check_same_config(path: Path, old: dict, cfg: Config) -> None:
    diff = _differences(old, run_config(cfg))
    if diff:
        raise RuntimeError(f"{path} was written with a different config ({'; '.join(diff[:5])}). "
                           "Pass --force to retrain this fold, or use another `experiment` name.")


# ---------------------------------------------------------------- losses and prediction

def classification_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float,
                        label_smoothing: float) -> torch.Tensor:
    targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return F.binary_cross_entropy_with_logits(logits.float(), targets,
                                              pos_weight=torch.tensor(pos_weight, device=logits.device))


def mask_loss(mask_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Pixel BCE plus batch soft-Dice against the masks pooled to the map's size (soft targets)."""
    if not bool(has_mask.any()):
        return mask_logits.sum() * 0.0
    logits = mask_logits.float()[has_mask]
    targets = F.adaptive_avg_pool2d(masks[has_mask], logits.shape[-2:])
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (probs * targets).sum() + 1.0) / (probs.sum() + targets.sum() + 1.0)
    return bce + dice


_TTA_FLIPS: list[tuple[int, ...]] = [(), (3,), (2,), (2, 3)]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device, cfg: Config,
                   tta: bool = False, desc: str = "predict") -> np.ndarray:
    """Image logits in dataset order; with `tta`, the mean logit over horizontal/vertical flips."""
    model.eval()
    flips = _TTA_FLIPS if tta else _TTA_FLIPS[:1]
    out = np.zeros(len(loader.dataset), np.float64)
    for images, index in tqdm(loader, desc=desc, leave=False):
        images = to_device_images(images, device, cfg.train.channels_last)
        total = 0.0
        for dims in flips:
            with autocast(device, cfg.train.amp):
                logits = model(torch.flip(images, dims) if dims else images)
            total = total + logits.float()
        out[index.numpy()] = (total / len(flips)).cpu().numpy()
    return out


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
    """Everything one fold needs, built once: data, model, optimizer, schedule, scaler, tracker."""

    def __init__(self, cfg: Config, fold: int, folds: pd.DataFrame, test_rows: pd.DataFrame, store: ImageStore,
                 device: torch.device):
        self.cfg, self.fold, self.device, self.store = cfg, fold, device, store
        self.out = run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)
        train_rows, self.val_rows = fold_rows(folds, fold)
        self.test_rows = test_rows.reset_index(drop=True)
        seed_everything(cfg.seed + fold)
        self.model: DefectClassifier = build_classifier(cfg.model, cfg.mask_head).to(device)
        if device.type == "cuda" and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.with_masks = self.model.decoder is not None
        self.train_set = TrainDataset(train_rows, cfg, store, with_masks=self.with_masks)
        t = cfg.train
        self.drop_last = len(self.train_set) > t.batch_size  # no 1-image BatchNorm batch at the end
        n_batches = (len(self.train_set) // t.batch_size if self.drop_last
                     else math.ceil(len(self.train_set) / t.batch_size))
        self.steps_per_epoch = math.ceil(n_batches / t.accumulate_steps)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = warmup_cosine_schedule(self.optimizer, int(round(t.warmup_epochs * self.steps_per_epoch)),
                                                t.epochs * self.steps_per_epoch)
        self.use_amp = device.type == "cuda" and t.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.tracker = CheckpointTracker(metric=t.monitor, tie_metric="val_loss")

    def loader(self, dataset, batch_size: int, drop_last: bool = False) -> DataLoader:
        workers = self.cfg.train.num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          drop_last=drop_last, pin_memory=self.device.type == "cuda")

    def eval_loader(self, rows: pd.DataFrame) -> DataLoader:
        dataset = EvalDataset(rows["path"].astype(str).tolist(), self.cfg.augment, self.store)
        return self.loader(dataset, self.cfg.train.batch_size * 2)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        self.train_set.set_epoch(epoch)
        loader = self.loader(self.train_set, t.batch_size, self.drop_last)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"train_loss": 0.0, "train_mask_loss": 0.0}
        seen, start = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"fold {self.fold} epoch {epoch + 1}/{t.epochs}", leave=False, unit="batch")
        for step, batch in enumerate(bar):
            images = to_device_images(batch["image"], self.device, t.channels_last)
            labels = batch["label"].to(self.device, non_blocking=True)
            with autocast(self.device, t.amp):
                output: ClassifierOutput = self.model.forward_all(images)
            loss = classification_loss(output.class_logit, labels, t.pos_weight, t.label_smoothing)
            total = loss
            if output.mask_logits is not None:
                seg = mask_loss(output.mask_logits, batch["mask"].to(self.device, non_blocking=True),
                                batch["has_mask"].to(self.device, non_blocking=True))
                total = loss + cfg.mask_head.loss_weight * seg
                sums["train_mask_loss"] += float(seg.detach()) * len(labels)
            self.scaler.scale(total / t.accumulate_steps).backward()
            if (step + 1) % t.accumulate_steps == 0 or step + 1 == len(loader):
                if t.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            sums["train_loss"] += float(loss.detach()) * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{sums['train_loss'] / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
        elapsed = time.perf_counter() - start
        out = {k: v / max(seen, 1) for k, v in sums.items()}
        if not self.with_masks:
            out.pop("train_mask_loss")
        out.update({"train_images": seen, "train_seconds": elapsed, "lr": self.optimizer.param_groups[0]["lr"]})
        return out

    def validate(self) -> dict[str, float]:
        labels = self.val_rows["label"].astype(int).to_numpy()
        logits = predict_logits(self.model, self.eval_loader(self.val_rows), self.device, self.cfg, desc="validate")
        return validation_metrics(labels, logits)

    # -- the whole fold

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        last, best = self.out / "last.pt", self.out / "best.pt"
        history: list[dict[str, Any]] = []
        start_epoch, stopped = 0, False
        resumed = load_training_state(last, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      scaler=self.scaler, tracker=self.tracker, map_location=self.device) \
            if last.exists() and self._resumable(last) else None
        if resumed is not None:
            history, stopped = list(resumed.extra["history"]), bool(resumed.extra["stopped"])
            start_epoch = resumed.next_epoch
            print(f"fold {self.fold}: resuming from {last} after epoch {resumed.epoch + 1}/{t.epochs}")
        write_yaml(cfg.to_dict(), self.out / "config.yaml")
        print(f"fold {self.fold}: training on {self.train_set.describe()} per epoch; validating on "
              f"{len(self.val_rows)} images ({int(self.val_rows['label'].sum())} defect); device {self.device}")
        epoch = start_epoch
        while epoch < t.epochs and not stopped:
            # files and messages count epochs from 1; `epoch` (the loop index) is 0-based
            metrics = {"epoch": epoch + 1, **self.train_epoch(epoch), **self.validate()}
            decision = self.tracker.update(epoch + 1, metrics)
            if decision.improved:  # best.pt before last.pt: see competition.training
                save_checkpoint({"model": self.model.state_dict(), "epoch": epoch + 1, "metrics": metrics,
                                 "config": cfg.to_dict()}, best)
            metrics["best_changed"] = decision.improved
            history.append(metrics)
            stopped = self.tracker.should_stop(t.patience)
            save_training_state(last, epoch=epoch, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, scaler=self.scaler, tracker=self.tracker,
                                extra={"config": run_config(cfg), "history": history, "stopped": stopped})
            write_csv(pd.DataFrame(history), self.out / "history.csv")
            print(f"fold {self.fold} epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f} "
                  f"({metrics['train_images'] / metrics['train_seconds']:.1f} img/s) | val loss "
                  f"{metrics['val_loss']:.4f} acc {metrics['val_accuracy_at_05']:.3f} AUROC {metrics['val_auroc']:.3f} "
                  f"F1@0.5 {metrics['val_macro_f1_at_05']:.3f} F1 {metrics['val_macro_f1']:.3f} "
                  f"(thr {metrics['val_threshold']:.3f}) | {decision.reason}")
            if stopped:
                print(f"fold {self.fold}: early stop, {t.patience} epoch(s) without a better checkpoint")
            epoch += 1
        return self.finish(history, stopped)

    def _resumable(self, last: Path) -> bool:
        state = load_checkpoint(last)
        _check_same_config(last, state.get("extra", {}).get("config", {}), self.cfg)
        return True

    def finish(self, history: list[dict[str, Any]], stopped: bool) -> dict[str, Any]:
        """Predictions from best.pt (oof.csv, test.csv), plots and summary.json."""
        cfg = self.cfg
        best = load_checkpoint(self.out / "best.pt", map_location=self.device)
        self.model.load_state_dict(best["model"])
        labels = self.val_rows["label"].astype(int).to_numpy()
        oof_logits = predict_logits(self.model, self.eval_loader(self.val_rows), self.device, cfg, cfg.train.tta,
                                    desc="oof")
        test_logits = predict_logits(self.model, self.eval_loader(self.test_rows), self.device, cfg, cfg.train.tta,
                                     desc="test") if len(self.test_rows) else np.zeros(0)
        oof = pd.DataFrame({"image_id": self.val_rows["image_id"].astype(str), "label": labels,
                            "score": expit(oof_logits)})
        test = pd.DataFrame({"image_id": self.test_rows["image_id"].astype(str), "score": expit(test_logits)})
        write_predictions(oof, test, self.out)
        threshold, _ = best_threshold(labels, oof["score"])
        oof_metrics = {**binary_metrics(labels, oof["score"], threshold), "auroc": auroc(labels, oof["score"]),
                       "aupr": aupr(labels, oof["score"]),
                       "macro_f1_at_05": binary_metrics(labels, oof["score"], 0.5)["macro_f1"]}
        title = f"{cfg.experiment} / {cfg.model.name} / fold {self.fold}"
        frame = pd.DataFrame(history)
        plot_training_curves(frame, self.out / "curves.png", title, best_epoch=self.tracker.best_epoch)
        plot_roc_pr(labels, oof["score"], self.out / "roc_pr.png", title)
        plot_confusion(labels, oof["score"], threshold, self.out / "confusion.png",
                       f"fold {self.fold}, threshold {threshold:.3g}: macro-F1 {oof_metrics['macro_f1']:.3f}")
        summary = {
            "fold": self.fold,
            "model": cfg.model.name,
            "best_epoch": self.tracker.best_epoch,
            "epochs_run": len(history),
            "stopped_early": stopped,
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


_FOLD_FILES = ("summary.json", "oof.csv", "test.csv", "history.csv", "best.pt", "last.pt", "config.yaml",
               "curves.png", "roc_pr.png", "confusion.png")


def train_fold(cfg: Config, fold: int, folds: pd.DataFrame, test_rows: pd.DataFrame, store: ImageStore,
               device: torch.device, force: bool = False) -> dict[str, Any]:
    out = run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, fold)
    if force:
        for name in _FOLD_FILES:
            (out / name).unlink(missing_ok=True)
    summary_path = out / "summary.json"
    if summary_path.exists() and (out / "oof.csv").exists() and (out / "test.csv").exists():
        summary = read_json(summary_path)
        _check_same_config(summary_path, summary.get("config", {}), cfg)
        print(f"fold {fold}: already trained ({summary_path}); --force retrains it")
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
    folds = read_folds(cfg, index)
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    store = ImageStore(cfg.model.image_size, keep=cfg.train.cache_images)
    if cfg.train.num_workers > 0:  # workers fork after this, sharing the decoded images
        store.preload(list(folds["path"].astype(str)) + list(test_rows["path"].astype(str)))
    print(f"classifier {cfg.model.name} at {cfg.model.image_size}px on {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}; folds {fold_ids}")
    started = time.perf_counter()
    results = [train_fold(cfg, k, folds, test_rows, store, device, force) for k in fold_ids]
    if len(results) > 1:
        table = pd.DataFrame([{"fold": r["fold"], "best_epoch": r["best_epoch"], "auroc": r["oof"]["auroc"],
                               "macro_f1": r["oof"]["macro_f1"]} for r in results])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"trained {len(fold_ids)} fold(s) in {time.perf_counter() - started:.1f} s")
