"""Exported graphs against eager torch on an experiment's test images: score parity and speed.

    python bench/export_parity.py --config configs/quick.yaml --set paths.data=DIR --set paths.work=RUNS
    python bench/export_parity.py ... --fold all --threads 2

Reads what `python -m competition export --format onnx|openvino` recorded (`<work>/<experiment>/_export/`).
Per exported (model, fold): the largest absolute score difference of each runtime against eager torch
(classifier: logits of the test images fitted to the canvas; zoo: `predict` scores, and maps) and images per
second eager vs onnxruntime vs openvino, timed on whole batches. Zoo timings include decoding, identical on
both sides; eager zoo scoring runs without the feature cache. Targets: score difference at most 1e-4; the
classifier's runtime
at least 1.5x eager.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from competition import export  # noqa: E402
from competition.artifacts import read_json  # noqa: E402
from competition.config import load_config  # noqa: E402
from competition.folds import load_index  # noqa: E402
from competition.zoo.api import ImageSet  # noqa: E402

WARMUPS = 3  # eager torch's first few calls at a new batch shape are many times slower
REPEATS = 3  # best of: the machine may be shared


def images_per_second(call, arg, n: int) -> float:
    """`n / seconds` of `call(arg)`, best of REPEATS after WARMUPS untimed calls."""
    for _ in range(WARMUPS):
        call(arg)
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        call(arg)
        best = min(best, time.perf_counter() - started)
    return n / best


def full_batches(n: int, batch_size: int) -> int:
    """How many images make whole batches: timing alternating batch shapes measures eager torch's
    re-planning for each new shape rather than its speed."""
    return max(batch_size, n - n % batch_size) if n >= batch_size else n


def classifier_row(cfg, fold_dir: Path, images: ImageSet, runtimes: list[str]) -> dict:
    from competition.classifier.train import load_fold_classifier

    size = cfg.model.image_size
    x = torch.stack([t for _, t in images.tensors(size, cfg.augment.mean, cfg.augment.std)])
    timed_x = x[:full_batches(len(x), cfg.train.batch_size)]

    def logits_of(forward):
        return lambda inputs: torch.cat([forward(b) for b in torch.split(inputs, cfg.train.batch_size)])

    model = load_fold_classifier(cfg, fold_dir, torch.device("cpu"))
    with torch.no_grad():
        eager = logits_of(model)(x)
        row = {"eager img/s": images_per_second(logits_of(model), timed_x, len(timed_x))}
    for runtime in runtimes:
        forward = logits_of(export.classifier_forward(fold_dir, runtime))
        row[f"{runtime} max|d score|"] = float((forward(x) - eager).abs().max())
        row[f"{runtime} img/s"] = images_per_second(forward, timed_x, len(timed_x))
    return row


def zoo_row(fold_dir: Path, images: ImageSet, runtimes: list[str]) -> dict:
    model = export.load_zoo_on_cpu(fold_dir / "model.pt")
    timed_images = images.subset(range(full_batches(len(images), model.settings.batch_size)))
    eager = model.predict(images)
    row = {"eager img/s": images_per_second(model.predict, timed_images, len(timed_images))}
    for runtime in runtimes:
        graph = export.zoo_with_runtime(model, fold_dir, runtime)
        out = graph.predict(images)
        row[f"{runtime} max|d score|"] = float(np.abs(out.scores - eager.scores).max())
        row[f"{runtime} max|d map|"] = float(np.abs(out.maps - eager.maps).max())
        row[f"{runtime} img/s"] = images_per_second(graph.predict, timed_images, len(timed_images))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fold", default="0", help="fold index or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    export_dir = Path(cfg.paths.work) / cfg.experiment / "_export"
    records = {fmt: read_json(export_dir / f"{fmt}.json") for fmt in export.FORMATS
               if (export_dir / f"{fmt}.json").is_file()}
    if not records:
        raise SystemExit(f"no export record in {export_dir}: run `make export FORMAT=onnx` first")
    exported: dict[tuple[str, int, str], set[str]] = {}
    for fmt, record in records.items():
        for r in record["models"]:
            if r["status"] == "exported" and (args.fold == "all" or r["fold"] == int(args.fold)):
                exported.setdefault((r["model"], r["fold"], r["kind"]), set()).add(fmt)
    index = load_index(cfg)
    images = ImageSet.from_frame(index[index["split"] == "test"])
    rows = []
    for (name, fold, kind), formats in sorted(exported.items()):
        runtimes = [rt for rt, fmt in export.RUNTIMES.items() if fmt in formats]
        fold_dir = Path(cfg.paths.work) / cfg.experiment / name / f"fold{fold}"
        row = (classifier_row(cfg, fold_dir, images, runtimes) if kind == "classifier"
               else zoo_row(fold_dir, images, runtimes))
        rows.append({"model": name, "fold": fold, **row})
    import pandas as pd

    table = pd.DataFrame(rows)
    for runtime in export.RUNTIMES:
        if f"{runtime} img/s" in table:
            table[f"{runtime} speedup"] = table[f"{runtime} img/s"] / table["eager img/s"]
    print(f"{len(images)} test images, {args.threads} threads, torch {torch.__version__.split('+')[0]}")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
