"""Classifier throughput: the real pipeline (decode, resize, oversampling, painting, augmentation,
DataLoader, model) against the bare model on random tensors of the same shape, train and eval.

Target: on CPU, the pipeline reaches at least 80% of the bare model's images/s at the default config.

    .venv/bin/python bench/train_speed.py --set paths.data=/tmp/small          # default config
    .venv/bin/python bench/train_speed.py --config configs/quick.yaml --set paths.data=/tmp/tiny --batches 5

Each figure is the median of `--repeats` timed passes over `--batches` batches, after one warm-up
pass; "cold" is the first training pass with an empty image cache (decoding included). On a shared
machine wall-clock figures move with the neighbours' load; the images per CPU-second of this
process (all its threads) move much less, so both are printed.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from torch.utils.data import DataLoader

from competition.classifier.data import EvalDataset, ImageStore, TrainDataset, fold_rows
from competition.classifier.model import build_classifier
from competition.classifier.train import classification_loss, mask_loss
from competition.config import DEFAULT_CONFIG, load_config
from competition.folds import labeled_train, load_index, make_folds
from competition.runtime import autocast, configure_threads, select_device, to_device_images


def _train_step(model, optimizer, scaler, images, labels, masks, has_mask, cfg, device) -> None:
    with autocast(device, cfg.train.amp):
        out = model.forward_all(images)
    loss = classification_loss(out.class_logit, labels, cfg.train.pos_weight, cfg.train.label_smoothing)
    if out.mask_logits is not None:
        loss = loss + cfg.mask_head.loss_weight * mask_loss(out.mask_logits, masks, has_mask)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Wall-clock and process CPU time of a block: `rates(n)` -> (images/s, images per CPU-second)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, images: int) -> tuple[float, float]:
        return images / self.wall, images / max(self.cpu, 1e-9)


def time_pipeline_train(loader, model, optimizer, scaler, cfg, device, batches: int) -> tuple[float, float]:
    model.train()
    seen = 0
    with _Clock() as clock:
        for batch in itertools.islice(loader, batches):
            images = to_device_images(batch["image"], device, cfg.train.channels_last)
            _train_step(model, optimizer, scaler, images, batch["label"].to(device), batch["mask"].to(device),
                        batch["has_mask"].to(device), cfg, device)
            seen += len(images)
        _sync(device)
    return clock.rates(seen)


def time_bare_train(model, optimizer, scaler, cfg, device, batches: int, mask_size: int) -> tuple[float, float]:
    model.train()
    b, s = cfg.train.batch_size, cfg.model.image_size
    images = to_device_images(torch.randn(b, 3, s, s), device, cfg.train.channels_last)
    labels = (torch.arange(b, device=device) % 3 == 0).float()
    masks, has_mask = torch.zeros(b, 1, mask_size, mask_size, device=device), torch.ones(b, dtype=torch.bool, device=device)
    with _Clock() as clock:
        for _ in range(batches):
            _train_step(model, optimizer, scaler, images, labels, masks, has_mask, cfg, device)
        _sync(device)
    return clock.rates(batches * b)


@torch.no_grad()
def time_pipeline_eval(loader, model, cfg, device, batches: int) -> tuple[float, float]:
    model.eval()
    seen = 0
    with _Clock() as clock:
        for images, _ in itertools.islice(loader, batches):
            with autocast(device, cfg.train.amp):
                model(to_device_images(images, device, cfg.train.channels_last))
            seen += len(images)
        _sync(device)
    return clock.rates(seen)


@torch.no_grad()
def time_bare_eval(model, cfg, device, batches: int, batch_size: int) -> tuple[float, float]:
    model.eval()
    s = cfg.model.image_size
    images = to_device_images(torch.randn(batch_size, 3, s, s), device, cfg.train.channels_last)
    with _Clock() as clock:
        for _ in range(batches):
            with autocast(device, cfg.train.amp):
                model(images)
        _sync(device)
    return clock.rates(batches * batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batches", type=int, default=8, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    device = select_device(cfg.device)
    threads = configure_threads(cfg.train.threads)
    index = load_index(cfg)
    train = labeled_train(index)
    train["fold"] = make_folds(train, cfg.folds.n_splits, cfg.seed)["fold"].to_numpy()
    train_rows, _ = fold_rows(train, 0)
    test_paths = index.loc[index["split"] == "test", "path"].astype(str).tolist() or train["path"].astype(str).tolist()

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.model, cfg.mask_head).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.amp)
    with_masks = model.decoder is not None
    mask_size = cfg.model.image_size
    store = ImageStore(cfg.model.image_size, keep=cfg.train.cache_images)
    dataset = TrainDataset(train_rows, cfg, store, with_masks=with_masks)
    eval_batch = cfg.train.batch_size * 2

    def train_loader():
        return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, drop_last=True,
                          num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")

    def eval_loader():
        return DataLoader(EvalDataset(test_paths, cfg.augment, store), batch_size=eval_batch,
                          num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")

    batches = min(args.batches, len(dataset) // cfg.train.batch_size)
    eval_batches = min(args.batches, len(test_paths) // eval_batch) or 1
    print(f"{cfg.model.name} {cfg.model.image_size}px batch {cfg.train.batch_size} on {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, workers {cfg.train.num_workers}, "
          f"mask head {'on' if with_masks else 'off'}; epoch: {dataset.describe()}; "
          f"{batches} train / {eval_batches} eval batches per pass, median of {args.repeats}")

    cold = time_pipeline_train(train_loader(), model, optimizer, scaler, cfg, device, batches)
    store.preload(train_rows["path"].astype(str).tolist() + test_paths)
    time_bare_train(model, optimizer, scaler, cfg, device, 1, mask_size)  # warm-up
    figures = {"train": ([], []), "eval": ([], [])}
    for repeat in range(args.repeats):
        dataset.set_epoch(repeat + 1)
        figures["train"][0].append(time_pipeline_train(train_loader(), model, optimizer, scaler, cfg, device, batches))
        figures["train"][1].append(time_bare_train(model, optimizer, scaler, cfg, device, batches, mask_size))
        figures["eval"][0].append(time_pipeline_eval(eval_loader(), model, cfg, device, eval_batches))
        figures["eval"][1].append(time_bare_eval(model, cfg, device, eval_batches, eval_batch))
    print(f"{'':<6} {'pipeline img/s':>15} {'bare model img/s':>17} {'ratio':>7}   "
          f"{'pipeline img/cpu-s':>18} {'bare img/cpu-s':>15} {'ratio':>7}")
    for name, (pipeline, bare) in figures.items():
        p, b = (statistics.median(r[0] for r in pipeline), statistics.median(r[1] for r in pipeline)), \
               (statistics.median(r[0] for r in bare), statistics.median(r[1] for r in bare))
        print(f"{name:<6} {p[0]:>15.1f} {b[0]:>17.1f} {p[0] / b[0]:>7.1%}   {p[1]:>18.1f} {b[1]:>15.1f} {p[1] / b[1]:>7.1%}")
    print(f"train, first pass with an empty image cache (decoding included): {cold[0]:.1f} img/s, "
          f"{cold[1]:.1f} img/cpu-s")


if __name__ == "__main__":
    main()
