"""Device, threads and seeds: the same code runs on a 2-core CPU and on CUDA (AMP on CUDA, bfloat16 autocast on
CPUs with bfloat16 hardware when asked, channels_last on both)."""
from __future__ import annotations

import functools
import os
import random
from contextlib import nullcontext

import numpy as np
import torch


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is available; use auto or cpu")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def configure_threads(threads: int = 0) -> int:
    """Use every core for intra-op work on CPU (0 = all); returns the count in force."""
    n = threads if threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@functools.cache
def cpu_bf16(mode: str = "off") -> bool:
    """Whether CPU work runs under bfloat16 autocast (`train.cpu_amp`, `zoo.cpu_amp`): always for `bf16`; for
    `auto` only where the CPU multiplies bfloat16 in hardware (`cpu_has_bf16`). There SegDecNet's training pipeline
    ran 1.7x faster on 2 cores (bench/train_speed.py) and its scoring 1.8-2.6x (bench/channels_last.py --precision;
    that script's training figures before this version left SegDecNet's segmentation out of the backward pass, so
    its 2.2-2.4x for training is not a measurement of the real step). Elsewhere bfloat16 is emulated
    and slower than float32, and depthwise-convolution networks (EfficientNet) train slower even with it, so the
    default is off."""
    if mode == "auto":
        return cpu_has_bf16()
    return mode == "bf16"


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic in hardware: Intel's AMX tiles (Sapphire Rapids on) or the
    AVX-512 BF16 dot products (Cooper Lake, AMD Zen 4 on), both of which oneDNN's convolutions use. The AMX-only
    probe of an earlier version left `auto` off on an AMD EPYC with AVX-512 BF16, where `configs/real.yaml` then
    ran deeppcb in float32: 44.6 min end to end instead of about 30 (README, "Real data")."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_precision(mode: str = "off") -> str:
    """What CPU work computes in under `train.cpu_amp` / `zoo.cpu_amp` = `mode`, for a stage's first line: `auto` on
    a CPU without bfloat16 hardware says so, since there `configs/real.yaml` runs far over its 40-minute budget
    (README, "The 40-minute budget needs bfloat16 hardware")."""
    if cpu_bf16(mode):
        return "bfloat16 autocast"
    return "float32, no bfloat16 hardware" if mode == "auto" else "float32"


def autocast(device: torch.device, enabled: bool = True, cpu: str = "off"):
    """float16 autocast on CUDA when `enabled` (`amp`); bfloat16 autocast on the CPU when `cpu_bf16(cpu)`;
    otherwise a no-op context (full precision, exact)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and cpu_bf16(cpu):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def to_device_images(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """A (B, C, H, W) batch on `device`, in channels_last when asked: on CUDA (tensor cores) and on CPU alike,
    where oneDNN's NHWC convolutions and pooling run 1.1-1.6x faster on 2 cores (bench/channels_last.py)."""
    batch = batch.to(device, non_blocking=True)
    if channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def to_channels_last(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """The module's 4-D weights in channels_last (the layout `to_device_images` gives its inputs)."""
    return module.to(memory_format=torch.channels_last) if enabled else module
