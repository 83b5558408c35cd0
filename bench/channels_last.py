"""Bare-model throughput in the contiguous (NCHW) and channels_last (NHWC) layouts, training and scoring:
does `train.channels_last` / `zoo.channels_last` pay on this machine? With `--precision`, float32 against
bfloat16 autocast, both in NHWC: does `train.cpu_amp` / `zoo.cpu_amp` pay (CPUs with AMX tiles or AVX-512 BF16)? Random
batches, no data pipeline (`bench/train_speed.py` times the real one).

    .venv/bin/python bench/channels_last.py --threads 2
    .venv/bin/python bench/channels_last.py --threads 2 --precision
"""
from __future__ import annotations

import argparse
import contextlib
import time

import timm
import torch

from competition.classifier.segdec import SegDecNet
from competition.config import SegDecConfig


def images_per_second(model: torch.nn.Module, size: int, batch: int, train: bool, channels_last: bool,
                      repeats: int, bf16: bool = False) -> float:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    model.train(train)
    optimizer = torch.optim.AdamW(model.parameters())
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        if not train:
            with torch.inference_mode(), precision():
                model(x)
            return
        optimizer.zero_grad()
        with precision():
            # SegDecNet's decision reads its segmentation detached, so a loss on the decision alone would never
            # step the segmentation sub-network: its training step is both outputs' loss, as segdec_losses' is
            out = (lambda o: o.logit.float().mean() + o.mask_logits.float().mean())(model.forward_all(x)) \
                if isinstance(model, SegDecNet) else model(x)
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
    parser.add_argument("--precision", action="store_true", help="float32 -> bfloat16 autocast, both NHWC")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {  # name: (builder, input side, batch)
        "segdec (real.yaml) 160 px": (lambda: SegDecNet(SegDecConfig()), 160, 16),
        "efficientnet_b0 96 px": (lambda: timm.create_model("efficientnet_b0", num_classes=1), 96, 32),
        "resnet18 features 128 px": (lambda: timm.create_model("resnet18", features_only=True,
                                                                out_indices=(1, 2, 3)), 128, 32),
    }
    # (channels_last, bf16) before -> after
    before, after = ((True, False), (True, True)) if args.precision else ((False, False), (True, False))
    change = "float32 -> bfloat16 (NHWC)" if args.precision else "NCHW -> NHWC"
    print(f"{args.threads} thread(s); images/s, {change}")
    for train in (True, False):
        for name, (build, size, batch) in models.items():
            old, new = (images_per_second(build(), size, batch, train, layout, args.repeats, bf16)
                        for layout, bf16 in (before, after))
            print(f"{name:28s} {'train' if train else 'score'} {old:7.1f} -> {new:7.1f}  x{new / old:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
