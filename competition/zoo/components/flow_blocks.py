"""Invertible building blocks shared by the zoo's normalizing flows (FastFlow, CFlow, U-Flow, CS-Flow),
with their frozen feature input and the likelihood map of FastFlow and U-Flow.

`AllInOneCoupling` follows FrEIA's AllInOneBlock (Ardizzone et al., the block all three papers
use): a soft-clamped affine coupling whose subnet sees the first half of the channels (plus an
optional condition), then a learned per-channel global affine (ActNorm-like), then a fixed random
channel permutation (hard) or rotation (soft). Written here so the zoo needs no FrEIA dependency.
`CrossScaleCoupling` is CS-Flow's block: a Glow-style coupling over three feature scales at once,
whose subnets exchange information between neighbouring scales.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.normalise import ImageNormalise

SubnetConstructor = Callable[[int, int], nn.Module]
GlobalAffineType = Literal["SOFTPLUS", "SIGMOID", "EXP"]

LOG_2PI = math.log(2.0 * math.pi)


class AllInOneCoupling(nn.Module):
    """One flow step on tensors shaped (batch, channels, *spatial); spatial may be empty.

    forward(x, cond) -> (y, log|det J|) per sample; `inverse` undoes it exactly (up to float error).
    The subnet gets `channels - channels // 2 + cond_channels` channels and must return
    `2 * (channels // 2)` (log-scale and shift for the second half), same spatial shape.
    """

    def __init__(self, channels: int, subnet_constructor: SubnetConstructor, *, cond_channels: int = 0,
                 affine_clamping: float = 2.0, global_affine_init: float = 1.0,
                 global_affine_type: GlobalAffineType = "SOFTPLUS", permute_soft: bool = False,
                 seed: int | None = None):
        super().__init__()
        if channels < 2:
            raise ValueError(f"AllInOneCoupling needs at least 2 channels to split, got {channels}")
        self.channels = channels
        self.split_first = channels - channels // 2
        self.split_second = channels // 2
        self.cond_channels = cond_channels
        self.permute_soft = permute_soft
        self.clamp = float(affine_clamping)
        self.global_affine_type = global_affine_type
        self.subnet = subnet_constructor(self.split_first + cond_channels, 2 * self.split_second)

        # Global scale parameterised so that activation(init value) == global_affine_init.
        if global_affine_type == "SOFTPLUS":
            raw = 2.0 * math.log(math.exp(0.5 * 10.0 * global_affine_init) - 1.0)
        elif global_affine_type == "SIGMOID":
            raw = 2.0 - math.log(10.0 / global_affine_init - 1.0)
        elif global_affine_type == "EXP":
            raw = math.log(global_affine_init)
        else:
            raise ValueError(f"global_affine_type {global_affine_type!r}: use SOFTPLUS, SIGMOID or EXP")
        self.global_scale = nn.Parameter(torch.full((channels,), float(raw)))
        self.global_offset = nn.Parameter(torch.zeros(channels))

        # Fixed mixing between blocks: a permutation matrix, or a random rotation (|det| = 1 either way).
        rng = np.random.default_rng(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        if permute_soft:
            from scipy.stats import special_ortho_group

            w = special_ortho_group.rvs(channels, random_state=rng)
        else:
            w = np.eye(channels)[rng.permutation(channels)]
        # Stored in float32, a rotation is orthogonal to ~1e-7 only: its |det| and inverse are that close to exact.
        self.register_buffer("w_perm", torch.as_tensor(w, dtype=torch.float32))

    # ---------------------------------------------------------------- pieces

    def _scale(self) -> torch.Tensor:
        s = self.global_scale
        if self.global_affine_type == "SOFTPLUS":
            return 0.1 * F.softplus(s, beta=0.5)
        if self.global_affine_type == "SIGMOID":
            return 10.0 * torch.sigmoid(s - 2.0)
        return torch.exp(s)

    @staticmethod
    def _channelwise(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2)))

    def _mix(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """y[:, i] = sum_j w[i, j] x[:, j] for any trailing dims; a permutation is a gather, not a matmul."""
        if not self.permute_soft:
            return x.index_select(1, w.argmax(1))
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x)

    def _subnet_out(self, x1: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"this coupling block expects a condition with {self.cond_channels} channels")
            x1 = torch.cat([x1, cond], dim=1)
        a = self.subnet(x1) * 0.1
        log_scale = self.clamp * torch.tanh(a[:, : self.split_second])
        return log_scale, a[:, self.split_second:]

    # ---------------------------------------------------------------- directions

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = torch.split(x, [self.split_first, self.split_second], dim=1)
        log_scale, shift = self._subnet_out(x1, cond)
        y = torch.cat([x1, x2 * torch.exp(log_scale) + shift], dim=1)
        log_det = log_scale.flatten(1).sum(1)
        scale = self._scale()
        y = y * self._channelwise(scale, y) + self._channelwise(self.global_offset, y)
        positions = y[0, 0].numel()  # spatial size (1 for vectors)
        log_det = log_det + positions * torch.log(scale).sum()
        return self._mix(y, self.w_perm), log_det

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x with forward(x) == (y, log_det); returns (x, -log_det)."""
        y = self._mix(y, self.w_perm.T)
        scale = self._scale()
        y = (y - self._channelwise(self.global_offset, y)) / self._channelwise(scale, y)
        positions = y[0, 0].numel()
        y1, y2 = torch.split(y, [self.split_first, self.split_second], dim=1)
        log_scale, shift = self._subnet_out(y1, cond)
        x = torch.cat([y1, (y2 - shift) * torch.exp(-log_scale)], dim=1)
        log_det = -log_scale.flatten(1).sum(1) - positions * torch.log(scale).sum()
        return x, log_det


class SequenceFlow(nn.Module):
    """A chain of coupling blocks sharing one optional condition; log-dets add up."""

    def __init__(self, blocks: Sequence[AllInOneCoupling]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = z.new_zeros(z.shape[0])
        for block in reversed(self.blocks):
            z, ld = block.inverse(z, cond)
            log_det = log_det + ld
        return z, log_det


# ---------------------------------------------------------------- subnets

def conv_subnet(kernel_size: int, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """conv-ReLU-conv with 'same' zero padding (FastFlow's and U-Flow's coupling subnet)."""
    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(int(in_channels * hidden_ratio), 1)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding="same"),
        )
    return build


def fc_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Linear-ReLU-Linear (CFlow's subnet: hidden width twice the input)."""
    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(int(in_channels * hidden_ratio), 1)
        return nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))
    return build


# ---------------------------------------------------------------- likelihoods

def gaussian_log_likelihood(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """log p(x) = log N(z; 0, I) + log|det J| per sample, z shaped (batch, ...)."""
    d = z[0].numel()
    return -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * d * LOG_2PI + log_det


def likelihood_map(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) in (0, 1]: mean over scales of the upsampled per-position likelihood exp(-0.5 mean_c z^2).

    anomalib's map for FastFlow and U-Flow: 1 where every latent is 0, towards 0 where a latent is large.
    """
    maps = [F.interpolate(torch.exp(-0.5 * torch.mean(z.float() ** 2, dim=1, keepdim=True)), size=size,
                          mode="bilinear", align_corners=False) for z in latents]
    return torch.stack(maps, dim=-1).mean(-1)[:, 0]


# ---------------------------------------------------------------- the frozen feature input of every flow

class FrozenFeatures(WithFrozenParts):
    """[0, 1] RGB -> the frozen backbone's feature maps (ImageNet-normalised input, eval mode always).

    The flows model the density of these features; the backbone is never trained, so `train()`
    leaves it in eval mode (its BatchNorm statistics stay the pretrained ones).
    """

    frozen_parts = ("backbone",)

    def __init__(self, backbone: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.normalise = ImageNormalise(mean, std)
        self.backbone = freeze(backbone)

    @property
    def channels(self) -> list[int]:
        return list(self.backbone.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.backbone.feature_info.reduction())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [f.float() for f in self.backbone(self.normalise(images))]


# ---------------------------------------------------------------- CS-Flow's cross-scale coupling

class CrossScaleConvolutions(nn.Module):
    """CS-Flow's subnet (Rudolph et al. 2022, Fig. 3): per scale a conv, leaky ReLU and a second conv,
    plus cross-scale terms: each scale adds a conv of the next coarser scale's hidden map upsampled
    (bilinear) and a strided (stride 2) conv of the next finer scale's. Scales are finest first and
    consecutive scales differ by a factor 2 in resolution. Each scale's output is multiplied by a
    learned gamma that starts at 0, so every coupling starts as the identity (the reference's use_gamma).
    """

    def __init__(self, in_channels: int, out_channels: int, n_scales: int, hidden_channels: int,
                 kernel_size: int = 3, leaky_slope: float = 0.1):
        super().__init__()
        pad = kernel_size // 2

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size, padding=pad, stride=stride)

        self.conv_in = nn.ModuleList([conv(in_channels, hidden_channels) for _ in range(n_scales)])
        self.conv_out = nn.ModuleList([conv(hidden_channels, out_channels) for _ in range(n_scales)])
        self.up = nn.ModuleList([conv(hidden_channels, out_channels) for _ in range(n_scales - 1)])  # s+1 -> s
        self.down = nn.ModuleList([conv(hidden_channels, out_channels, 2) for _ in range(n_scales - 1)])  # s -> s+1
        self.gamma = nn.Parameter(torch.zeros(n_scales))
        self.leaky_slope = leaky_slope

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.conv_in, xs)]
        out = [conv(h) for conv, h in zip(self.conv_out, hidden)]
        for s in range(len(xs) - 1):
            finer, coarser = out[s].shape[-2:], out[s + 1].shape[-2:]
            up = F.interpolate(hidden[s + 1], size=finer, mode="bilinear", align_corners=False)
            out[s] = out[s] + self.up[s](up)
            down = self.down[s](hidden[s])
            if down.shape[-2:] != coarser:  # odd sizes: the strided conv rounds up
                down = F.interpolate(down, size=coarser, mode="bilinear", align_corners=False)
            out[s + 1] = out[s + 1] + down
        return [o * g for o, g in zip(out, self.gamma)]


class CrossScaleCoupling(nn.Module):
    """One CS-Flow block on a list of feature maps (finest first), all with `channels` channels.

    A fixed random channel permutation per scale, then the reference's parallel Glow coupling: the
    first half of every scale is transformed affinely with scales and shifts computed jointly from
    the second halves of all scales (one `CrossScaleConvolutions`), then the second halves from the
    transformed first halves (another). Log-scales are soft-clamped to (-clamp, clamp) by
    clamp * 2/pi * atan(s / clamp) (the paper's alpha). forward(xs) -> (ys, log|det J| per sample,
    summed over scales); `inverse` undoes it.
    """

    def __init__(self, channels: int, n_scales: int = 3, hidden_channels: int = 1024, kernel_size: int = 3,
                 clamp: float = 3.0, leaky_slope: float = 0.1, seed: int = 0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"CrossScaleCoupling needs at least 2 channels to split, got {channels}")
        self.split_first = channels // 2
        self.split_second = channels - channels // 2
        self.clamp = float(clamp)
        self.first_from_second = CrossScaleConvolutions(self.split_second, 2 * self.split_first, n_scales,
                                                        hidden_channels, kernel_size, leaky_slope)
        self.second_from_first = CrossScaleConvolutions(self.split_first, 2 * self.split_second, n_scales,
                                                        hidden_channels, kernel_size, leaky_slope)
        rng = np.random.default_rng(seed)
        self.register_buffer("permutation", torch.as_tensor(
            np.stack([rng.permutation(channels) for _ in range(n_scales)]), dtype=torch.long))

    def _log_scale(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * (2.0 / math.pi) * torch.atan(s / self.clamp)

    def _affine(self, subnet: CrossScaleConvolutions, given: Sequence[torch.Tensor],
                split: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = subnet(given)
        return [self._log_scale(o[:, :split]) for o in out], [o[:, split:] for o in out]

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        xs = [x.index_select(1, perm) for x, perm in zip(xs, self.permutation)]
        firsts = [x[:, :self.split_first] for x in xs]
        seconds = [x[:, self.split_first:] for x in xs]
        log_scales, shifts = self._affine(self.first_from_second, seconds, self.split_first)
        firsts = [a * torch.exp(ls) + t for a, ls, t in zip(firsts, log_scales, shifts)]
        log_det = sum(ls.flatten(1).sum(1) for ls in log_scales)
        log_scales, shifts = self._affine(self.second_from_first, firsts, self.split_second)
        seconds = [b * torch.exp(ls) + t for b, ls, t in zip(seconds, log_scales, shifts)]
        log_det = log_det + sum(ls.flatten(1).sum(1) for ls in log_scales)
        return [torch.cat([a, b], dim=1) for a, b in zip(firsts, seconds)], log_det

    def inverse(self, ys: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """xs with forward(xs) == (ys, log_det); returns (xs, -log_det)."""
        firsts = [y[:, :self.split_first] for y in ys]
        seconds = [y[:, self.split_first:] for y in ys]
        log_scales, shifts = self._affine(self.second_from_first, firsts, self.split_second)
        seconds = [(b - t) * torch.exp(-ls) for b, ls, t in zip(seconds, log_scales, shifts)]
        log_det = -sum(ls.flatten(1).sum(1) for ls in log_scales)
        log_scales, shifts = self._affine(self.first_from_second, seconds, self.split_first)
        firsts = [(a - t) * torch.exp(-ls) for a, ls, t in zip(firsts, log_scales, shifts)]
        log_det = log_det - sum(ls.flatten(1).sum(1) for ls in log_scales)
        xs = [torch.cat([a, b], dim=1) for a, b in zip(firsts, seconds)]
        return [x.index_select(1, torch.argsort(perm)) for x, perm in zip(xs, self.permutation)], log_det


class CrossScaleFlow(nn.Module):
    """A chain of `CrossScaleCoupling` blocks over the same list of scales; log-dets add up."""

    def __init__(self, blocks: Sequence[CrossScaleCoupling]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        log_det = xs[0].new_zeros(xs[0].shape[0])
        for block in self.blocks:
            xs, ld = block(xs)
            log_det = log_det + ld
        return list(xs), log_det

    def inverse(self, zs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        log_det = zs[0].new_zeros(zs[0].shape[0])
        for block in reversed(self.blocks):
            zs, ld = block.inverse(zs)
            log_det = log_det + ld
        return list(zs), log_det
