"""Bare-model throughput in the contiguous (NCHW) and channels_last (NHWC) layouts, training and scoring:
does `train.channels_last` / `zoo.channels_last` pay on this machine? Random batches, no data pipeline
(`bench/train_speed.py` times the real one).

    .venv/bin/python bench/channels_last.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from competition.classifier.segdec import SegDecNet
from competition.config import SegDecConfig


def images_per_second(model: torch.nn.Module, size: int, batch: int, train: bool, channels_last: bool,
                      repeats: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    model.train(train)
    optimizer = torch.optim.AdamW(model.parameters())

    def step() -> None:
        if not train:
            with torch.inference_mode():
                model(x)
            return
        optimizer.zero_grad()
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else sum(o.float().mean() for o in out)
        out.float().sum().backward()
        optimizer.step()

    step()  # warm-up: oneDNN picks its kernels
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {  # name: (builder, input side, batch)
        "segdec (real.yaml) 160 px": (lambda: SegDecNet(SegDecConfig()), 160, 16),
        "efficientnet_b0 96 px": (lambda: timm.create_model("efficientnet_b0", num_classes=1), 96, 32),
        "resnet18 features 128 px": (lambda: timm.create_model("resnet18", features_only=True,
                                                                out_indices=(1, 2, 3)), 128, 32),
    }
    print(f"{args.threads} thread(s); images/s, NCHW -> NHWC")
    for train in (True, False):
        for name, (build, size, batch) in models.items():
            nchw, nhwc = (images_per_second(build(), size, batch, train, layout, args.repeats)
                          for layout in (False, True))
            print(f"{name:28s} {'train' if train else 'score'} {nchw:7.1f} -> {nhwc:7.1f}  x{nhwc / nchw:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
