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

from competition.classifier.data import EvalDataset, ImageStore, classifier_geometry, fold_rows
from competition.classifier.train import FoldTrainer
from competition.config import DEFAULT_CONFIG, load_config
from competition.folds import labeled_train, load_index, make_folds
from competition.runtime import autocast, configure_threads, select_device, to_device_images
from competition.training import EngineConfig, grad_scaler, train_epoch


class _FirstBatches:
    """The first `n` batches of a loader, with a length, as the engine takes an epoch's batches."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.loader, self.n)


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


def _time_steps(trainer: FoldTrainer, batches, scaler) -> tuple[float, float]:
    """The engine's real step (autocast, scaler, accumulation, clipping, schedule) over `batches`."""
    t = trainer.cfg.train
    engine = EngineConfig(epochs=1, grad_clip=t.grad_clip, accumulate_steps=t.accumulate_steps, amp=t.amp,
                          cpu_amp=t.cpu_amp, progress=False)
    with _Clock() as clock:
        row = train_epoch(trainer.model, trainer.optimizer, batches, trainer.training_step, engine,
                          device=trainer.device, scheduler=trainer.scheduler, scaler=scaler)
        _sync(trainer.device)
    return clock.rates(row["train_images"])


def time_pipeline_train(trainer: FoldTrainer, loader, scaler, batches: int) -> tuple[float, float]:
    return _time_steps(trainer, _FirstBatches(loader, batches), scaler)


def time_bare_train(trainer: FoldTrainer, scaler, batches: int) -> tuple[float, float]:
    """The same steps on one random batch of the training shape, already in memory."""
    cfg, b, s = trainer.cfg, trainer.cfg.train.batch_size, trainer.cfg.model.image_size
    batch = {"image": to_device_images(torch.randn(b, 3, s, s), trainer.device, cfg.train.channels_last),
             "label": (torch.arange(b) % 3 == 0).float(), "mask": torch.zeros(b, 1, s, s),
             "has_mask": torch.ones(b, dtype=torch.bool)}
    batch = {key: value.to(trainer.device) for key, value in batch.items()}
    return _time_steps(trainer, [batch] * batches, scaler)


@torch.no_grad()
def time_pipeline_eval(loader, model, cfg, device, batches: int) -> tuple[float, float]:
    model.eval()
    seen = 0
    with _Clock() as clock:
        for images, _ in itertools.islice(loader, batches):
            with autocast(device, cfg.train.amp, cfg.train.cpu_amp):
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
            with autocast(device, cfg.train.amp, cfg.train.cpu_amp):
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

    test_rows = index[index["split"] == "test"]
    store = ImageStore(classifier_geometry(cfg), keep=cfg.train.cache_images)
    trainer = FoldTrainer(cfg, 0, train, test_rows, store, device)  # the model, data and optimizer `train` builds
    model, dataset, with_masks = trainer.model, trainer.train_set, trainer.with_masks
    scaler = grad_scaler(EngineConfig(epochs=1, amp=cfg.train.amp), device)
    eval_batch = cfg.train.batch_size * 2

    def train_loader():
        return trainer.loader(dataset, cfg.train.batch_size, drop_last=True)

    def eval_loader():
        return DataLoader(EvalDataset(test_paths, cfg.augment, store), batch_size=eval_batch,
                          num_workers=cfg.train.num_workers, pin_memory=device.type == "cuda")

    batches = min(args.batches, len(dataset) // cfg.train.batch_size)
    eval_batches = min(args.batches, len(test_paths) // eval_batch) or 1
    print(f"{cfg.model.name} {cfg.model.image_size}px batch {cfg.train.batch_size} on {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, workers {cfg.train.num_workers}, "
          f"mask head {'on' if with_masks else 'off'}; epoch: {dataset.describe()}; "
          f"{batches} train / {eval_batches} eval batches per pass, median of {args.repeats}")

    cold = time_pipeline_train(trainer, train_loader(), scaler, batches)
    store.preload(train_rows["path"].astype(str).tolist() + test_paths)
    time_bare_train(trainer, scaler, 1)  # warm-up
    figures = {"train": ([], []), "eval": ([], [])}
    for repeat in range(args.repeats):
        dataset.set_epoch(repeat + 1)
        figures["train"][0].append(time_pipeline_train(trainer, train_loader(), scaler, batches))
        figures["train"][1].append(time_bare_train(trainer, scaler, batches))
        figures["eval"][0].append(time_pipeline_eval(eval_loader(), model, cfg, device, eval_batches))
        figures["eval"][1].append(time_bare_eval(model, cfg, device, eval_batches, eval_batch))
    print(f"{'':<6} {'pipeline img/s':>15} {'bare model img/s':>17} {'ratio':>7}   "
          f"{'pipeline img/cpu-s':>18} {'bare img/cpu-s':>15} {'ratio':>7}")
    for name, (pipeline, bare) in figures.items():
        p, b = (statistics.median(r[0] for r in pipeline), statistics.median(r[1] for r in pipeline)), \
               (statistics.median(r[0] for r in bare), statistics.median(r[1] for r in bare))
        print(f"{name:<6} {p[0]:>15.1f} {b[0]:>17.1f} {p[0] / b[0]:>7.1%}   "
              f"{p[1]:>18.1f} {b[1]:>15.1f} {p[1] / b[1]:>7.1%}")
    print(f"train, first pass with an empty image cache (decoding included): {cold[0]:.1f} img/s, "
          f"{cold[1]:.1f} img/cpu-s")


if __name__ == "__main__":
    main()
