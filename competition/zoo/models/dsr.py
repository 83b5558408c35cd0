"""DSR (Zavrtanik, Kristan & Skočaj, ECCV 2022, "DSR - A dual subspace re-projection network for surface
anomaly detection"), after the authors' code (VitjanZ/DSR_anomaly_detection).

Three stages, on [0, 1] images (no ImageNet normalisation):
1. Discrete latent model (general object appearance): a two-level VQ-VAE (VQ-VAE-2 layout). The
   high-resolution encoder gives F at 1/4 of the image, the low-resolution encoder F_lo at 1/8; F_lo is
   quantised with codebook K_lo, upsampled, joined with F and quantised with K_hi; the general appearance
   decoder turns (Q_lo upsampled, Q_hi) back into an image. Codebooks learn by exponential moving averages
   (decay 0.99), the encoders and decoder by L2 reconstruction + 0.25 x commitment. Then frozen.
2. Object-specific decoder and anomaly detection module, on near-in-distribution anomalies made in the
   quantised space: inside a Perlin mask (image resolution, threshold 0.5, half of the samples), each
   position's code is replaced by a code drawn at random among those ranked between the nearest 5 % and
   the nearest (strength x K) of the codebook, strength ~ U(0.2, 1) per image, in Q_lo (then Q_hi is
   re-quantised from it and altered too), in Q_lo only or in Q_hi only (at random, as the reference). Two
   subspace restriction networks (encoder-decoders, InstanceNorm) project the anomalous Q_lo / Q_hi back
   to normal features, which are re-quantised and decoded by the object-specific decoder; the anomaly
   detection module (a U-Net) reads (object-specific image, general appearance image of the anomalous
   codes) and outputs the anomaly mask. Loss: L2(restored features, clean codes) for both levels
   + 10 x L2(object-specific image, input) + focal loss (gamma 2) of the mask against the anomaly mask
   max-pooled to the altered level's grid. Adam lr 2e-4, batch 8, lr x0.1 at 80 %; the object-specific
   decoder and the detection module start from N(0, 0.02) convolution weights, as the reference.
3. Upsampling module (a U-Net over the two images and the detection mask), trained with focal loss on
   images with DRAEM-style Perlin anomalies (`painters.perlin_anomaly`) while everything else stays frozen.
Scoring: map = the upsampling module's anomaly softmax at canvas size; score = the maximum of the anomaly
detection module's mask after a `mean_filter` x `mean_filter` mean filter (the authors' evaluation code:
21 at 256 px).

Deviations from the paper and the reference code, and why:
- stage 1: the paper trains the VQ-VAE once on ImageNet and reuses it for every category. Offline there is
  no ImageNet, and the zoo's `fit` sees the training normals only (no unlabeled test images), so here it
  trains per fit on the training normals, mixed with generated textures of families the dataset does not
  use (`vq_general_share` of the samples; `textures.OTHER_FAMILIES`) as a stand-in for ImageNet's general
  appearance: trained on one surface alone, codes "far" from the originals still look like that surface,
  and the code-replacement anomalies of stage 2 become invisible;
- stage 1 fights codebook collapse, which in-domain training on few images brings at once (one or two
  codes in use): the codebooks start from k-means of the first batch's encoder outputs (the reference:
  N(0, 1) codes), and a code no position of `dead_code_steps` batches in a row picked restarts at a random
  encoder output of the batch (SoundStream's rule). summary.json's `codebook` gives the codes
  in use, their share and the perplexity of both codebooks on the training normals;
- the reference draws 8000 samples an "epoch" (1000 steps of batch 8): `dsr-paper` keeps that with
  `steps_per_epoch`; the CPU entry `dsr` is narrower (fewer channels and codes) and trains a few passes of
  each stage (its description says how many against the paper's);
- the best stage-2 epoch is kept by the validation AUROC inside the training folds, as every trained zoo
  model (`competition.zoo.trained`); the reference keeps the last epoch;
- stage 3's anomalies are `painters.perlin_anomaly` (an augmented generated texture at opacity 0.1 - 1 in
  the project's Perlin mask), as the DRAEM entry; the reference pastes a flat random colour at opacity
  0.2 - 1;
- training images are rotated by up to 90 degrees with reflected borders (the reference: 40 % of them,
  with black corners), as the DRAEM entry; `augment` changes it;
- the focal losses are taken of the masks' logits through one softmax (the authors' code applies its focal
  loss to the softmax output, the same function); image sizes must be multiples of 32, at least 64.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler

from competition.training import EngineConfig, FitResult, fit
from competition.zoo.api import ImageSet, ValidationSet, unit_tensor
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.maps import mean_filter_maps
from competition.zoo.models.draem import focal_loss
from competition.zoo.registry import register
from competition.zoo.trained import (
    DEFAULT_VALIDATION_SHARE,
    CycledBatches,
    TrainedAnomalyModel,
    TrainingSamples,
    TrainParams,
    decode_resized,
    fit_record,
)
from competition.zoo.validation import split_validation

STAGES = ("vqvae", "detection", "upsampling")


def _paper_augmentation() -> list[dict[str, Any]]:
    # the reference rotates 40 % of the training images by up to 90 degrees (imgaug Affine); reflection
    # instead of black corners, as the DRAEM entry, so corners are not taught as normal
    return [{"name": "Rotate", "limit": 90, "border_mode": 4, "p": 0.4}]


@dataclass
class DSRParams(TrainParams):
    # Stage 2 is the loop's `epochs`. The reference: batch 8, Adam 2e-4, 100 epochs of 1000 steps (its dataset
    # draws 8000 samples an epoch), lr x0.1 at 80 %; stage 3 then trains `upsampling_epochs` = 50 more at a
    # constant 2e-4 (its lr milestones lie beyond its last epoch). Stage 1 has no reference figure: the paper's
    # VQ-VAE is trained once on ImageNet; here `vq_epochs` in-domain.
    epochs: int = 100
    steps_per_epoch: int = 1000  # stages 1-3 alike; 0 = one pass over the training normals
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "multistep"
    milestones: tuple[float, ...] = (0.8,)
    gamma: float = 0.1
    augment: list[dict[str, Any]] = field(default_factory=_paper_augmentation)
    vq_epochs: int = 100  # stage 1, in-domain (the paper: pretrained on ImageNet)
    vq_lr: float = 2.0e-4
    # share of stage 1's samples that are generated textures of families the dataset does not use, for the
    # general appearance the paper's ImageNet gives (0 = the training normals only)
    vq_general_share: float = 0.5
    upsampling_epochs: int = 50
    upsampling_lr: float = 2.0e-4
    embedding_dim: int = 128
    num_embeddings: int = 4096  # per codebook (K_lo and K_hi)
    num_hiddens: int = 128
    num_residual_layers: int = 2
    num_residual_hiddens: int = 64
    detection_width: int = 64  # base width of the anomaly detection and upsampling U-Nets
    commitment_cost: float = 0.25
    codebook_decay: float = 0.99
    dead_code_steps: int = 10  # restart a code no position of this many batches in a row picked; 0 = never
    latent_anomaly_strength: float = 0.2  # least share of the codebook the replacement codes are drawn from
    anomaly_probability: float = 0.5  # share of training samples given an anomaly (stages 2 and 3)
    mean_filter: int = 21
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "vq_epochs", "upsampling_epochs", "embedding_dim", "num_hiddens",
                    "num_residual_hiddens", "detection_width", "mean_filter"):
            if getattr(self, key) < 1:
                raise ValueError(f"dsr: {key} must be at least 1, got {getattr(self, key)}")
        if self.num_embeddings < 20:
            raise ValueError(f"dsr: num_embeddings must be at least 20 (codes beyond the nearest 5 % are drawn), "
                             f"got {self.num_embeddings}")
        if self.num_hiddens % 2:
            raise ValueError(f"dsr: num_hiddens must be even, got {self.num_hiddens}")
        if self.mean_filter % 2 == 0:
            raise ValueError(f"dsr: mean_filter must be odd, got {self.mean_filter}")
        if not 0.0 < self.latent_anomaly_strength <= 1.0:
            raise ValueError(f"dsr: latent_anomaly_strength must lie in (0, 1], got {self.latent_anomaly_strength}")
        if not 0.0 <= self.vq_general_share < 1.0:
            raise ValueError(f"dsr: vq_general_share must lie in [0, 1), got {self.vq_general_share}")
        if not 0.0 <= self.anomaly_probability <= 1.0:
            raise ValueError(f"dsr: anomaly_probability must lie in [0, 1], got {self.anomaly_probability}")
        if self.dead_code_steps < 0:
            raise ValueError(f"dsr: dead_code_steps must be at least 0 (0 never restarts), got {self.dead_code_steps}")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ValueError(f"dsr: codebook_decay must lie in (0, 1), got {self.codebook_decay}")
        for key in ("lr", "vq_lr", "upsampling_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"dsr: {key} must be positive, got {getattr(self, key)}")


# ---------------------------------------------------------------- stage 1: the discrete latent model

def kmeans(points: Tensor, k: int, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of (N, D) `points` from k random points (torch's RNG); an emptied cluster restarts at a
    random point. Returns (centres (k, D), the points per centre (k,))."""
    n = points.shape[0]
    picks = torch.randperm(n)[:k] if n >= k else torch.randint(n, (k,))
    centres = points[picks.to(points.device)].clone()
    counts = torch.zeros(k, device=points.device)
    for _ in range(iterations):
        assigned = nearest_code(points, centres)
        counts = torch.bincount(assigned, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, assigned, points)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        empty = int((~filled).sum())
        if empty:
            centres[~filled] = points[torch.randint(n, (empty,)).to(points.device)]
    return centres, counts


def nearest_code(flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code (squared L2) of every row of (N, D) `flat`."""
    distances = (flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.T
    return distances.argmin(1)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a straight-through gradient. In training mode the codebook learns by
    exponential moving averages (VQ-VAE-2; the reference's `VectorQuantizerEMA`), starts from k-means of the
    first batch's encoder outputs, and restarts dead codes (no position of the last `dead_code_steps` batches
    picked them) at random encoder outputs of the batch. In eval mode it is a plain lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_steps: int = 10):
        super().__init__()
        codebook = torch.randn(num_embeddings, embedding_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_weight", codebook.clone())
        self.register_buffer("initialised", torch.zeros(()))
        self.register_buffer("idle_steps", torch.zeros(num_embeddings, dtype=torch.long))  # batches since last picked
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # codes restarted so far
        self.decay, self.eps, self.dead_code_steps = float(decay), float(eps), int(dead_code_steps)

    def nearest(self, flat: Tensor) -> Tensor:
        return nearest_code(flat, self.codebook)

    @torch.no_grad()
    def learn(self, flat: Tensor) -> None:
        """One moving-average step on the (N, D) encoder outputs of a batch."""
        size = self.codebook.shape[0]
        if not bool(self.initialised):
            centres, counts = kmeans(flat, size)
            self.codebook.copy_(centres)
            self.ema_cluster_size.copy_(counts)
            self.ema_weight.copy_(centres * counts[:, None])
            self.initialised.fill_(1.0)
        codes = self.nearest(flat)
        counts = torch.bincount(codes, minlength=size).float()
        sums = torch.zeros_like(self.ema_weight).index_add_(0, codes, flat)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_weight.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_weight / smoothed[:, None])
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.idle_steps >= self.dead_code_steps if self.dead_code_steps > 0 else torch.zeros_like(counts > 0)
        if dead.any():
            picks = flat[torch.randint(flat.shape[0], (int(dead.sum()),)).to(flat.device)]
            self.codebook[dead] = picks
            self.ema_weight[dead] = picks
            self.ema_cluster_size[dead] = 1.0
            self.idle_steps[dead] = 0
            self.restarts += int(dead.sum())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) -> (quantised, straight-through, (B, D, h, w); commitment loss)."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        if self.training:
            self.learn(flat.detach())
        codes = self.nearest(flat)
        quantised = self.codebook[codes].view(b, h, w, d).permute(0, 3, 1, 2)
        commitment = F.mse_loss(z.float(), quantised.detach())
        return z + (quantised - z).detach(), commitment

    @torch.no_grad()
    def usage(self, z: Tensor) -> dict[str, float]:
        """Codes in use on encoder outputs (B, D, h, w): their count, share of the codebook, and perplexity."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        counts = torch.bincount(self.nearest(flat), minlength=self.codebook.shape[0]).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        used = int((counts > 0).sum())
        return {"codes": self.codebook.shape[0], "used": used, "used_share": used / self.codebook.shape[0],
                "perplexity": float(perplexity), "restarts": int(self.restarts)}


class Residual(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, layers: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(*[Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


class DiscreteLatentModel(nn.Module):
    """Two-level VQ-VAE: image -> (Q_lo at 1/8, Q_hi at 1/4) and the general appearance decoder."""

    def __init__(self, num_hiddens: int = 128, num_residual_layers: int = 2, num_residual_hiddens: int = 64,
                 num_embeddings: int = 4096, embedding_dim: int = 128, decay: float = 0.99,
                 dead_code_steps: int = 10):
        super().__init__()
        h, r, rh, d = num_hiddens, num_residual_layers, num_residual_hiddens, embedding_dim
        self.encoder_hi = nn.Sequential(nn.Conv2d(3, h // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(h // 2, h, 4, 2, 1),
                                        nn.ReLU(), nn.Conv2d(h, h, 3, padding=1), _residual_stack(h, r, rh))
        self.encoder_lo = nn.Sequential(nn.Conv2d(h, h, 4, 2, 1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1),
                                        _residual_stack(h, r, rh))
        self.pre_quantise_lo = nn.Conv2d(h, d, 1)
        self.pre_quantise_hi = nn.Conv2d(h + d, d, 1)
        self.quantise_lo = VectorQuantizer(num_embeddings, d, decay, dead_code_steps=dead_code_steps)
        self.quantise_hi = VectorQuantizer(num_embeddings, d, decay, dead_code_steps=dead_code_steps)
        self.upsample_lo = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.decoder = nn.Sequential(nn.Conv2d(2 * d, h, 3, padding=1), _residual_stack(h, r, rh),
                                     nn.ConvTranspose2d(h, h // 2, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(h // 2, 3, 4, 2, 1))

    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """Encoder outputs and codes: enc_hi, z_lo, q_lo, z_hi, q_hi, and the commitment loss."""
        enc_hi = self.encoder_hi(images)
        z_lo = self.pre_quantise_lo(self.encoder_lo(enc_hi))
        q_lo, commit_lo = self.quantise_lo(z_lo)
        z_hi = self.pre_quantise_hi(torch.cat([enc_hi, self.upsample_lo(q_lo)], 1))
        q_hi, commit_hi = self.quantise_hi(z_hi)
        return {"enc_hi": enc_hi, "z_lo": z_lo, "q_lo": q_lo, "z_hi": z_hi, "q_hi": q_hi,
                "commitment": commit_lo + commit_hi}

    @torch.no_grad()
    def codebook_usage(self, images: Tensor) -> dict[str, dict[str, float]]:
        """Codebook use of both levels on `images` (eval mode): codes used, their share, perplexity."""
        codes = self.encode(images)
        return {"lo": self.quantise_lo.usage(codes["z_lo"]), "hi": self.quantise_hi.usage(codes["z_hi"])}

    def decode(self, q_lo: Tensor, q_hi: Tensor) -> Tensor:
        return self.decoder(torch.cat([self.upsample_lo(q_lo), q_hi], 1))

    def requantise_hi(self, enc_hi: Tensor, q_lo: Tensor) -> tuple[Tensor, Tensor]:
        """(z_hi, q_hi) of the high level given (possibly altered) low-level codes."""
        z_hi = self.pre_quantise_hi(torch.cat([enc_hi, self.upsample_lo(q_lo)], 1))
        return z_hi, self.quantise_hi(z_hi)[0]


def replace_with_distant_codes(z: Tensor, q: Tensor, codebook: Tensor, mask: Tensor, strength: Tensor,
                               skip_share: float = 0.05) -> tuple[Tensor, Tensor]:
    """Near-in-distribution anomalies in a quantised map: inside `mask` (B, 1, H, W, max-pooled to q's grid)
    each position's code becomes one drawn uniformly (torch's RNG) among the codes ranked from the nearest
    `skip_share` of the codebook to the nearest `strength` (B,) share, by distance to the unquantised z.
    Returns (the altered codes (B, D, h, w), the grid mask (B, 1, h, w))."""
    b, d, h, w = q.shape
    size = codebook.shape[0]
    flat = z.float().permute(0, 2, 3, 1).reshape(b, h * w, d)
    book = codebook.float()
    replaced = torch.empty(b, h * w, d, device=q.device)
    rows = torch.arange(h * w, device=q.device)
    for k in range(b):
        distances = (flat[k] ** 2).sum(1, keepdim=True) + (book ** 2).sum(1) - 2 * flat[k] @ book.T
        top = max(1, min(int(float(strength[k]) * size) + 1, size - 1))
        skip = min(int(size * skip_share), top - 1)
        ranked = torch.topk(distances, top, dim=1, largest=False).indices[:, skip:]
        pick = torch.randint(ranked.shape[1], (h * w,)).to(q.device)
        replaced[k] = book[ranked[rows, pick]]
    replaced = replaced.view(b, h, w, d).permute(0, 3, 1, 2).to(q.dtype)
    grid_mask = F.adaptive_max_pool2d(mask.float(), (h, w)).to(q.dtype)
    return grid_mask * replaced + (1 - grid_mask) * q, grid_mask


# ---------------------------------------------------------------- stages 2 and 3: the re-projection networks

def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())


class SubspaceRestriction(nn.Module):
    """Encoder-decoder without skips (3 levels): possibly anomalous codes -> normal non-quantised features."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(_conv_block(w, w), nn.MaxPool2d(2), _conv_block(w, 2 * w), nn.MaxPool2d(2),
                                     _conv_block(2 * w, 4 * w))
        self.decoder = nn.Sequential(_up_block(4 * w, 2 * w), _conv_block(2 * w, 2 * w), _up_block(2 * w, w),
                                     _conv_block(w, w), nn.Conv2d(w, w, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class ObjectSpecificDecoder(nn.Module):
    """(Q_lo upsampled, Q_hi) -> image: two conv blocks with max-pools, then the VQ-VAE decoder's layout."""

    def __init__(self, embedding_dim: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int):
        super().__init__()
        c, h = 2 * embedding_dim, num_hiddens

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.InstanceNorm2d(cin), nn.ReLU(),
                                 nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())

        self.net = nn.Sequential(
            block(c, 2 * c), nn.MaxPool2d(2), block(2 * c, 4 * c), nn.MaxPool2d(2), nn.Conv2d(4 * c, 64, 1),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, h, 3, padding=1), _residual_stack(h, num_residual_layers, num_residual_hiddens),
            nn.ConvTranspose2d(h, h // 2, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(h // 2, 3, 4, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UNet(nn.Module):
    """U-Net with InstanceNorm, 3 max-pools (widths w, 2w, 4w, 4w), skip connections, `out_channels` logits."""

    def __init__(self, in_channels: int, out_channels: int = 2, width: int = 64):
        super().__init__()
        w = width
        self.down = nn.ModuleList([_conv_block(in_channels, w), _conv_block(w, 2 * w), _conv_block(2 * w, 4 * w),
                                   _conv_block(4 * w, 4 * w)])
        self.up = nn.ModuleList([_up_block(4 * w, 4 * w), _up_block(4 * w, 2 * w), _up_block(2 * w, w)])
        self.merge = nn.ModuleList([_conv_block(8 * w, 4 * w), _conv_block(4 * w, 2 * w), _conv_block(2 * w, w)])
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], 1))
        return self.out(x)


def _small_normal_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)


class DSRModel(WithFrozenParts):
    """[0, 1] images -> (scores (B,), maps (B, S, S)); the stages' training passes as methods. The discrete
    latent model stays in eval mode through `train()` (its codebooks learn only while stage 1 trains it)."""

    frozen_parts = ("discrete",)

    def __init__(self, embedding_dim: int = 128, num_embeddings: int = 4096, num_hiddens: int = 128,
                 num_residual_layers: int = 2, num_residual_hiddens: int = 64, detection_width: int = 64,
                 decay: float = 0.99, mean_filter: int = 21, dead_code_steps: int = 10):
        super().__init__()
        self.discrete = DiscreteLatentModel(num_hiddens, num_residual_layers, num_residual_hiddens, num_embeddings,
                                            embedding_dim, decay, dead_code_steps)
        self.restrict_lo = SubspaceRestriction(embedding_dim)
        self.restrict_hi = SubspaceRestriction(embedding_dim)
        self.object_decoder = ObjectSpecificDecoder(embedding_dim, num_hiddens, num_residual_layers,
                                                    num_residual_hiddens)
        self.detection = UNet(6, 2, detection_width)
        self.upsampling = UNet(8, 2, detection_width)
        self.mean_filter = int(mean_filter)
        for part in (self.object_decoder, self.detection):  # the reference's initialisation of these two
            part.apply(_small_normal_init)

    # -- stage 1
    def vqvae_loss(self, images: Tensor, commitment_cost: float) -> dict[str, Tensor]:
        codes = self.discrete.encode(images)
        reconstruction = self.discrete.decode(codes["q_lo"], codes["q_hi"]).float()
        l2 = F.mse_loss(reconstruction, images.float())
        return {"loss": l2 + commitment_cost * codes["commitment"], "l2": l2, "commitment": codes["commitment"]}

    # -- stages 2 and 3 share the re-projection
    def restored(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(restored non-quantised lo, hi features, the object-specific decoder's image)."""
        lo, hi = self.restrict_lo(q_lo), self.restrict_hi(q_hi)
        requantised_lo, requantised_hi = self.discrete.quantise_lo(lo)[0], self.discrete.quantise_hi(hi)[0]
        image = self.object_decoder(torch.cat([self.discrete.upsample_lo(requantised_lo), requantised_hi], 1))
        return lo, hi, image

    def detection_loss(self, images: Tensor, mask: Tensor, strength: Tensor, choice: Tensor,
                       focal_gamma: float = 2.0) -> dict[str, Tensor]:
        """Stage 2 on a batch: `mask` (B, 1, S, S) where codes are altered, `strength` (B, 2) of the lo and hi
        replacements, `choice` (B, 2): (alter both levels, else alter lo only) as 0/1."""
        with torch.no_grad():
            d = self.discrete
            codes = d.encode(images)
            q_lo, q_hi = codes["q_lo"], codes["q_hi"]
            lo_anomalous, mask_lo = replace_with_distant_codes(codes["z_lo"], q_lo, d.quantise_lo.codebook, mask,
                                                               strength[:, 0])
            # both levels: the high level re-quantised from the altered low level, then altered itself
            z_hi_shifted, q_hi_shifted = d.requantise_hi(codes["enc_hi"], lo_anomalous)
            hi_both, _ = replace_with_distant_codes(z_hi_shifted, q_hi_shifted, d.quantise_hi.codebook, mask,
                                                    strength[:, 1])
            hi_only, mask_hi = replace_with_distant_codes(codes["z_hi"], q_hi, d.quantise_hi.codebook, mask,
                                                          strength[:, 1])
            both = choice[:, 0].view(-1, 1, 1, 1).to(q_lo.dtype)
            lo_only = choice[:, 1].view(-1, 1, 1, 1).to(q_lo.dtype)
            altered_lo = both * lo_anomalous + (1 - both) * (lo_only * lo_anomalous + (1 - lo_only) * q_lo)
            altered_hi = both * hi_both + (1 - both) * (lo_only * q_hi + (1 - lo_only) * hi_only)
            general = d.decode(altered_lo, altered_hi)
            size = images.shape[-2:]
            mask_lo = F.interpolate(mask_lo.float(), size=size, mode="nearest")
            mask_hi = F.interpolate(mask_hi.float(), size=size, mode="nearest")
            lo_mask_used = torch.maximum(both, lo_only).float()
            true_mask = lo_mask_used * mask_lo + (1 - lo_mask_used) * mask_hi
        lo, hi, specific = self.restored(altered_lo, altered_hi)
        logits = self.detection(torch.cat([specific.detach(), general], 1))
        features = F.mse_loss(hi.float(), q_hi.float()) + F.mse_loss(lo.float(), q_lo.float())
        image = 10 * F.mse_loss(specific.float(), images.float())
        focal = focal_loss(logits, true_mask, focal_gamma)
        return {"loss": features + image + focal, "features": features, "image": image, "focal": focal}

    def anomaly_masks(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(detection logits, upsampling logits, the detection softmax), at the image's size."""
        d = self.discrete
        codes = d.encode(images)
        general = d.decode(codes["q_lo"], codes["q_hi"])
        _, _, specific = self.restored(codes["q_lo"], codes["q_hi"])
        detection = self.detection(torch.cat([specific, general], 1))
        detection_softmax = torch.softmax(detection.float(), 1)
        upsampled = self.upsampling(torch.cat([specific, general, detection_softmax.to(specific.dtype)], 1))
        return detection, upsampled, detection_softmax

    def upsampling_loss(self, images: Tensor, mask: Tensor, focal_gamma: float = 2.0) -> dict[str, Tensor]:
        with torch.no_grad():
            d = self.discrete
            codes = d.encode(images)
            general = d.decode(codes["q_lo"], codes["q_hi"])
            _, _, specific = self.restored(codes["q_lo"], codes["q_hi"])
            detection_softmax = torch.softmax(self.detection(torch.cat([specific, general], 1)).float(), 1)
        upsampled = self.upsampling(torch.cat([specific, general, detection_softmax.to(specific.dtype)], 1))
        focal = focal_loss(upsampled, mask, focal_gamma)
        return {"loss": focal, "focal": focal}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _, upsampled, detection_softmax = self.anomaly_masks(images)
        smoothed = mean_filter_maps(detection_softmax[:, 1], self.mean_filter)
        return smoothed.flatten(1).amax(1), torch.softmax(upsampled.float(), 1)[:, 1]


# ---------------------------------------------------------------- the model face

class DSR(TrainedAnomalyModel):
    family = "dsr"
    params_class = DSRParams
    params: DSRParams
    stage = "detection"  # which stage's samples `training_sample` draws

    def build_model(self) -> nn.Module:
        p = self.params
        return DSRModel(int(p.embedding_dim), int(p.num_embeddings), int(p.num_hiddens), int(p.num_residual_layers),
                        int(p.num_residual_hiddens), int(p.detection_width), float(p.codebook_decay),
                        int(p.mean_filter), int(p.dead_code_steps))

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Stage 2's; the discrete latent model stays frozen (stage 1 unfreezes it while it trains)."""
        m = self.model
        for parameter in m.discrete.parameters():
            parameter.requires_grad_(False)
        return [p for part in (m.object_decoder, m.restrict_lo, m.restrict_hi, m.detection) for p in part.parameters()]

    # ---- data
    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        from competition.data.painters import _perlin_mask, perlin_anomaly

        image = self.augmented(image, rng)
        anomalous = rng.random() < float(self.params.anomaly_probability)
        if self.stage == "vqvae":
            if rng.random() < float(self.params.vq_general_share):  # general appearance: a foreign texture
                from competition.data.textures import OTHER_FAMILIES, make_texture

                family = OTHER_FAMILIES[int(rng.integers(len(OTHER_FAMILIES)))]
                image = make_texture(family, image.shape[:2], rng)
            return {"image": unit_tensor(image)}
        if self.stage == "upsampling":
            mask = np.zeros(image.shape[:2], np.uint8)
            if anomalous:
                image, mask = perlin_anomaly(image, rng)
            return {"image": unit_tensor(image), "mask": torch.from_numpy((mask > 0).astype(np.float32))[None]}
        mask = _perlin_mask(*image.shape[:2], rng) if anomalous else np.zeros(image.shape[:2], bool)
        least = float(self.params.latent_anomaly_strength)
        return {"image": unit_tensor(image), "mask": torch.from_numpy(mask.astype(np.float32))[None],
                "strength": torch.from_numpy(rng.uniform(least, 1.0, 2).astype(np.float32)),
                "choice": torch.from_numpy(rng.integers(0, 2, 2).astype(np.float32))}

    # ---- stage 2 (the shared loop), with stage 1 before and stage 3 after it
    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.detection_loss(batch["image"], batch["mask"], batch["strength"], batch["choice"],
                                         float(self.params.focal_gamma))

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        size = self.settings.image_size
        if size % 32 or size < 64:
            raise ValueError(f"dsr: zoo.image_size must be a multiple of 32 and at least 64 (the VQ-VAE's low level "
                             f"is 1/8 of the image, pooled twice more by the subspace restriction), got {size}")
        if validation is None:
            images, validation = split_validation(images, None, DEFAULT_VALIDATION_SHARE, self.settings.seed)
        self.stage = "detection"
        super()._fit(images, validation)  # stage 1 runs in before_training, on a fresh fit only
        normals = decode_resized(images, size, self.settings.progress, self.settings.resize)
        self._train_upsampling(normals)
        self.model.eval()
        self.fit_info["codebook"] = self.codebook_usage(normals)

    @torch.no_grad()
    def codebook_usage(self, normals: np.ndarray) -> dict[str, dict[str, float]]:
        """Use of both codebooks on uint8 (N, S, S, 3) images: codes used, their share, perplexity, restarts."""
        discrete = self.model.discrete.eval()
        z = {"lo": [], "hi": []}
        step = int(self.settings.batch_size)
        for start in range(0, len(normals), step):
            codes = discrete.encode(unit_tensor(normals[start:start + step]).to(self.device))
            z["lo"].append(codes["z_lo"].float())
            z["hi"].append(codes["z_hi"].float())
        return {"lo": discrete.quantise_lo.usage(torch.cat(z["lo"])),
                "hi": discrete.quantise_hi.usage(torch.cat(z["hi"]))}

    def before_training(self, normals: np.ndarray) -> None:
        """Stage 1: the VQ-VAE, on the training normals and generated foreign textures (the paper: ImageNet)."""
        p = self.params
        discrete = self.model.discrete
        for parameter in discrete.parameters():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(discrete.parameters(), lr=float(p.vq_lr))
        try:  # the engine puts `discrete` in training mode: its codebooks learn
            result = self._run_stage("vqvae", discrete, optimizer, normals, int(p.vq_epochs),
                                     lambda batch: self.model.vqvae_loss(batch["image"], float(p.commitment_cost)))
        finally:
            freeze(discrete)
        self.fit_info["vqvae"] = _loss_summary(
            result, f"the training normals, {p.vq_general_share:.0%} of the samples generated textures of families the "
                    "dataset does not use (the paper: ImageNet)")

    def _train_upsampling(self, normals: np.ndarray) -> None:
        p = self.params
        optimizer = torch.optim.Adam(self.model.upsampling.parameters(), lr=float(p.upsampling_lr))
        net = self.model

        def step(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return net.upsampling_loss(batch["image"], batch["mask"], float(p.focal_gamma))

        result = self._run_stage("upsampling", net.upsampling, optimizer, normals, int(p.upsampling_epochs), step)
        self.fit_info["upsampling"] = _loss_summary(
            result, "DRAEM-style Perlin anomalies: generated textures of families the dataset does not use")

    def _run_stage(self, stage: str, module: nn.Module, optimizer: torch.optim.Optimizer, normals: np.ndarray,
                   epochs: int, step: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> FitResult:
        """Train `module` for a stage outside the shared loop, with the engine: resumable from
        <run_dir>/<stage>/last.pt, batches drawn like the loop's, per-sample randomness per (stage, epoch, index)."""
        settings, device = self.settings, self.device
        self.stage = stage
        dataset = TrainingSamples(normals, self, settings.seed * 10 + STAGES.index(stage) + 1)
        batch_size = min(int(self.params.batch_size), len(normals))
        steps = int(self.params.steps_per_epoch) or max(1, len(normals) // batch_size)

        def epoch_batches(epoch: int) -> CycledBatches:
            dataset.epoch = epoch
            generator = torch.Generator().manual_seed(settings.seed * 100003 + epoch)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                                drop_last=True, num_workers=settings.num_workers)
            return CycledBatches(loader, steps)

        def on_device(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return step({key: value.to(device) for key, value in batch.items()})

        engine = EngineConfig(epochs=epochs, name=f"dsr {stage}", **settings.precision(),
                              out=Path(settings.run_dir) / stage if settings.run_dir else None,
                              record=fit_record(self), progress=settings.progress)
        self.model.to(device)
        try:
            return fit(module, optimizer, epoch_batches, on_device, engine, device=device)
        finally:
            self.stage = "detection"

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)


def _loss_summary(result: FitResult, source: str) -> dict[str, Any]:
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]
    return {"epochs": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "data": source}


register("dsr", DSR,
         "DSR: two-codebook VQ-VAE (normals + foreign textures), code-replacement anomalies, object-specific "
         "decoder + detection U-Net, upsampling U-Net (CPU budget: 10 + 5 + 2 passes over the normals of the "
         "paper's ImageNet VQ-VAE + 100 + 50 epochs of 1000 steps; 16-d codes, 256 a codebook of 128-d, 4096)",
         embedding_dim=16, num_embeddings=256, num_hiddens=32, num_residual_hiddens=16, detection_width=8,
         steps_per_epoch=0, vq_epochs=10, epochs=5, upsampling_epochs=2, lr=2.0e-3, vq_lr=2.0e-3,
         upsampling_lr=1.0e-3, mean_filter=11)
register("dsr-paper", DSR,
         "DSR as in the paper: 128-d codes, 4096 a codebook, Adam 2e-4, batch 8, 100 + 50 epochs of 1000 steps "
         "after an in-domain VQ-VAE of 100 such epochs (GPU)")
