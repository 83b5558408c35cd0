"""CFlow-AD (Gudovskiy et al. 2022, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows"): for each pooled backbone layer a conditional flow
models the density of single feature vectors, conditioned on a 2D sinusoidal encoding of their
position. Training follows the reference code: each image batch's positions are shuffled per layer
and cut into "fiber batches" of `fiber_batch_size` rows, one optimizer step per fiber batch, so an
epoch visits every position of every training image once; the loss is the reference code's
-log sigmoid(log p / C) per position. (The reference drops a last incomplete fiber batch; we keep it.)

Map: per layer the per-dimension log-likelihood, shifted by its maximum and exponentiated into
(0, 1], upsampled and summed over layers, then flipped so that high = anomalous; score = map max.
The paper shifts by the maximum over the whole test set; a score must not depend on which other
images are scored with it, so we shift by the maximum over held-out training normals (`calibrate`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.zoo.api import BackboneParams
from competition.zoo.components.features import create_backbone
from competition.zoo.components.flow_blocks import (
    AllInOneCoupling,
    FrozenFeatures,
    SequenceFlow,
    fc_subnet,
    gaussian_log_likelihood,
)
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class CFlowParams(TrainParams, BackboneParams):
    # Reference code: Adam with warmup and cosine decay, lr 2e-4, batch 32, fiber batches of 256,
    # 200 epochs (25 meta-epochs of 8). CPU-sized (4 epochs) 2e-4 is still far from converged: lr 1e-3.
    epochs: int = 4
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "warmup_cosine"
    warmup_epochs: float = 1.0
    # resnet layer1..3: at 128 px the resolutions the paper's layer2..4 have at 256 px
    layers: tuple[int, ...] = (1, 2, 3)
    condition_vector: int = 128  # size of the positional encoding the flows are conditioned on
    coupling_blocks: int = 8
    clamp_alpha: float = 1.9
    permute_soft: bool = False
    # positions per optimizer step (the reference's N is 256; larger is cheaper on CPU); 0 = a layer's
    # positions of the whole image batch in one step
    fiber_batch_size: int = 1024


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """(channels, height, width) sin/cos encoding: first half encodes x, second half y (CFlow's condition)."""
    if channels % 4:
        raise ValueError(f"condition_vector must be a multiple of 4, got {channels}")
    half = channels // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (half/2,)
    pos_w = torch.arange(0.0, width)[:, None] * div  # (W, half/2)
    pos_h = torch.arange(0.0, height)[:, None] * div  # (H, half/2)
    out = torch.zeros(channels, height, width)
    out[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    out[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    out[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    out[half + 1::2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return out


def cflow_decoder(channels: int, condition_vector: int, coupling_blocks: int, clamp_alpha: float,
                  permute_soft: bool, seed: int) -> SequenceFlow:
    """One layer's conditional flow: AllInOne blocks with a Linear-ReLU-Linear subnet (2x hidden)."""
    return SequenceFlow([
        AllInOneCoupling(channels, fc_subnet(2.0), cond_channels=condition_vector, affine_clamping=clamp_alpha,
                         global_affine_type="SOFTPLUS", permute_soft=permute_soft, seed=seed + k)
        for k in range(coupling_blocks)])


class CFlowModel(nn.Module):
    """Images in [0, 1] -> per-position log-likelihoods per layer; eval forward gives scores and maps."""

    def __init__(self, features: FrozenFeatures, condition_vector: int = 128, coupling_blocks: int = 8,
                 clamp_alpha: float = 1.9, permute_soft: bool = False, seed: int = 0):
        super().__init__()
        self.features = features
        self.condition_vector = condition_vector
        self.decoders = nn.ModuleList([
            cflow_decoder(c, condition_vector, coupling_blocks, clamp_alpha, permute_soft, seed=seed + 1000 * i)
            for i, c in enumerate(features.channels)])
        # Per-layer maximum per-dimension log-likelihood of held-out normals: the map's fixed shift.
        self.register_buffer("log_likelihood_max", torch.zeros(len(self.decoders)))

    def _rows(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> feature rows (B*H*W, C) and their position conditions (B*H*W, P)."""
        b, c, h, w = feature.shape
        cond = positional_encoding_2d(self.condition_vector, h, w).to(feature)
        cond_rows = cond.permute(1, 2, 0).reshape(1, h * w, -1).expand(b, -1, -1).reshape(b * h * w, -1)
        return feature.permute(0, 2, 3, 1).reshape(b * h * w, c), cond_rows

    def per_dim_log_likelihood(self, decoder: SequenceFlow, rows: Tensor, cond_rows: Tensor) -> Tensor:
        with torch.autocast(rows.device.type, enabled=False):  # flows in float32: exp and log-dets
            z, log_det = decoder(rows.float(), cond_rows.float())
            return gaussian_log_likelihood(z, log_det) / rows.shape[1]

    def fiber_batches(self, images: Tensor, fiber_batch_size: int) -> list[tuple[int, Tensor, Tensor]]:
        """Every position of every layer of `images` once, as (layer, feature rows, condition rows) fiber
        batches: per layer the positions shuffled and cut into `fiber_batch_size` rows (0: all at once)."""
        out = []
        for layer, feature in enumerate(self.features(images)):
            rows, cond_rows = self._rows(feature)
            order = torch.randperm(rows.shape[0], device=rows.device)
            step = fiber_batch_size or rows.shape[0]
            for start in range(0, rows.shape[0], step):
                pick = order[start:start + step]
                out.append((layer, rows[pick], cond_rows[pick]))
        return out

    def fiber_loss(self, layer: int, rows: Tensor, cond_rows: Tensor) -> Tensor:
        """mean(-log sigmoid(log p / C)) of one fiber batch of `layer`."""
        return -F.logsigmoid(self.per_dim_log_likelihood(self.decoders[layer], rows, cond_rows)).mean()

    def layer_log_likelihoods(self, images: Tensor) -> list[Tensor]:
        """Per layer (B, h, w) per-dimension log-likelihoods of every position."""
        out = []
        for feature, decoder in zip(self.features(images), self.decoders):
            b, _, h, w = feature.shape
            rows, cond_rows = self._rows(feature)
            out.append(self.per_dim_log_likelihood(decoder, rows, cond_rows).view(b, h, w))
        return out

    def anomaly_map(self, log_likelihoods: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """(B, H, W): sum over layers of 1 - exp(log p - max log p of normals), upsampled."""
        total = 0.0
        for layer, log_p in enumerate(log_likelihoods):
            probability = torch.exp(log_p.double() - self.log_likelihood_max[layer].double())
            total = total + F.interpolate(probability[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        return (len(log_likelihoods) - total).float()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = self.anomaly_map(self.layer_log_likelihoods(images), tuple(images.shape[-2:]))
        return maps.flatten(1).amax(1), maps

    @torch.no_grad()
    def calibrate(self, normal_images: Tensor, batch_size: int = 32) -> None:
        """Set each layer's shift to the largest per-dimension log-likelihood among `normal_images`."""
        best = torch.full_like(self.log_likelihood_max, -math.inf)
        for start in range(0, len(normal_images), batch_size):
            for layer, log_p in enumerate(self.layer_log_likelihoods(normal_images[start:start + batch_size])):
                best[layer] = torch.maximum(best[layer], log_p.max())
        self.log_likelihood_max.copy_(best)


# ---------------------------------------------------------------- the zoo model

class CFlow(TrainedAnomalyModel):
    family = "cflow"
    params_class = CFlowParams
    params: CFlowParams

    def build_model(self) -> nn.Module:
        p = self.params
        backbone = create_backbone(p.backbone, p.layers, self.settings.backbone_weights, self.settings.seed,
                                   init=self.settings.backbone_init,
                                   padding=self.settings.backbone_padding)
        return CFlowModel(FrozenFeatures(backbone), condition_vector=p.condition_vector,
                          coupling_blocks=p.coupling_blocks, clamp_alpha=p.clamp_alpha,
                          permute_soft=p.permute_soft, seed=self.settings.seed)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        self._optimizer = super().build_optimizer(params)  # the fiber steps before a batch's last use it
        self._trained = params
        return self._optimizer

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimizer step per fiber batch: all but the last are taken here (clipped like the
        engine's), the last one's loss goes back to the engine, which steps and schedules once per
        image batch. Reported: the mean loss over the batch's fiber batches."""
        fibers = self.model.fiber_batches(batch["image"], self.params.fiber_batch_size)
        losses = []
        for layer, rows, cond_rows in fibers[:-1]:
            self._optimizer.zero_grad(set_to_none=True)
            loss = self.model.fiber_loss(layer, rows, cond_rows)
            loss.backward()
            if self.params.grad_clip > 0:
                nn.utils.clip_grad_norm_(self._trained, self.params.grad_clip)
            self._optimizer.step()
            losses.append(loss.detach())
        self._optimizer.zero_grad(set_to_none=True)
        last = self.model.fiber_loss(*fibers[-1])
        return {"loss": last, "fiber_mean": torch.stack([*losses, last.detach()]).mean()}

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def calibrate(self, normals: Tensor) -> None:
        self.model.calibrate(normals, self.settings.batch_size)


register("cflow-resnet18", CFlow,
         "CFlow-AD: flows on resnet18 layer1-3 feature vectors conditioned on position, every position in "
         "fiber batches (CPU budget: 4 of 200 epochs, lr 1e-3, fibers of 1024)")
register("cflow-resnet18-l234", CFlow,
         "CFlow-AD on resnet18 layer2-4 as in the paper (its encoder is wide_resnet50_2), every position in "
         "fiber batches (CPU budget: 4 of 200 epochs, lr 1e-3, fibers of 1024)",
         layers=(2, 3, 4))
