"""Speed of the trained zoo models on the `small` set: setup (e.g. EfficientAD's teacher
distillation), training seconds per epoch and scoring images per second, CPU by default.

    python bench/zoo_speed_trained.py --data /tmp/small                 # every model below, 1 thread
    python bench/zoo_speed_trained.py --data /tmp/small --models stfpm-resnet18 draem --threads 2

Each model trains one epoch of its registry default (the same steps per epoch and batch size as
`python -m competition zoo --model NAME`) on the set's first 320 normal images (4/5 of them, as
one fold's fit would see), then scores the 300 test images. The data set is written with
`python -m competition synth --preset small --out DIR` when DIR does not exist yet.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["stfpm-resnet18", "reverse-distillation-resnet18", "efficientad-s", "efficientad-m", "draem",
          "fastflow-resnet18", "cflow-resnet18", "uflow-resnet18"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/small", help="small-preset competition folder")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--normals", type=int, default=320, help="training normals (one fold's share)")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    from competition.zoo.base import ImageSet, ZooSettings
    from competition.zoo.registry import build_model

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "synth.json").exists():
        from competition.data.synthetic import write_competition

        write_competition(data, preset="small", seed=0)
    normals = ImageSet(sorted((data / "train" / "normal_images").iterdir())[:args.normals])
    test = ImageSet(sorted((data / "test" / "images").iterdir()))

    print(f"device {args.device}, {args.threads} thread(s), {len(normals)} training normals "
          f"(4/5 train, 1/5 validation), {len(test)} test images, {args.image_size} px")
    print(f"{'model':32s} {'setup s':>8s} {'s/epoch':>8s} {'steps':>6s} {'epochs':>6s} {'~fit s':>8s} {'score img/s':>11s}")
    for name in args.models:
        with tempfile.TemporaryDirectory() as run_dir:
            settings = ZooSettings(image_size=args.image_size, batch_size=32, device=args.device, progress=False,
                                   run_dir=run_dir)
            default = build_model(name, settings)
            model = build_model(name, settings, {"epochs": 1})
            model.fit(normals)
            info = model.fit_info
            model.score_samples(test.subset(range(8)))  # warm-up
            start = time.perf_counter()
            model.score_samples(test)
            rate = len(test) / (time.perf_counter() - start)
            steps = int(default.steps_per_epoch) or (info["training_normals"] // min(int(default.batch_size),
                                                                                      info["training_normals"]))
            per_epoch = info["train_seconds_per_epoch"]
            full = info["setup_seconds"] + default.epochs * (info["fit_seconds"] - info["setup_seconds"])
            print(f"{name:32s} {info['setup_seconds']:8.1f} {per_epoch:8.1f} {steps:6d} {default.epochs:6d} "
                  f"{full:8.0f} {rate:11.1f}", flush=True)


if __name__ == "__main__":
    main()
