"""U-Flow (Tailanian, Pardo, Musé 2024, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection
with Unsupervised Threshold", JMIV): a single invertible U-shaped flow over multi-scale features,
and an a-contrario (NFA) detection threshold that needs no labelled defect.

The flow, coarse to fine: a flow stage on the coarsest features; its output is split in two, one
part leaves as that scale's latent, the other is upsampled invertibly (pixel shuffle) and
concatenated with the next finer features, which go through the next stage; the finest stage's
whole output is the last latent. Every latent is trained to be N(0, I), so the scales end up
independent. Map (anomalib convention): 1 - mean over scales of exp(-0.5 mean_c z^2); score = max.

NFA (the a-contrario threshold): under the null hypothesis each pixel's ||z||^2 is chi-square with
C degrees of freedom, so a pixel exceeds the chi2 quantile `probability_threshold` with probability
1 - q, independently. In a window around each pixel the count of such pixels is binomial; its tail
probability is that pixel's p-value at that scale. (The authors' code counts channel-wise chi2(1)
exceedances and averages the count over channels, which is not binomial; the per-pixel statistic
is.) Scales are combined with Fisher's method (the authors' code multiplies the p-values instead,
which is not a p-value: on pure N(0, I) latents it flagged 58% of images at NFA < 1 in our
simulation; Fisher's flags under 1%), and log10 NFA = log10(number of tests) + log10 p, with one
test per latent pixel of every scale. A pixel is detected where NFA < epsilon (epsilon = 1: on
average at most one false detection per image); an image is NG when any of its pixels is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.nn import functional as F

from competition.zoo.api import BackboneParams, ImageSet
from competition.zoo.components.features import create_backbone
from competition.zoo.components.flow_blocks import (
    AllInOneCoupling,
    FrozenFeatures,
    SequenceFlow,
    conv_subnet,
    likelihood_map,
)
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams, evaluation_tensors


@dataclass
class UFlowParams(TrainParams, BackboneParams):
    # Reference: Adam, lr 1e-3, weight decay 1e-5, linear lr decay to 0.4x; epochs CPU-sized (its configs: 200).
    epochs: int = 8
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-5
    layers: tuple[int, ...] = (1, 2, 3)  # timm feature indices: resnet layer1..layer3 (the reference's resnet setting)
    flow_steps: int = 4  # AllInOne blocks per scale
    clamp: float = 2.0
    subnet_ratio: float = 1.0
    permute_soft: bool = False
    nfa_epsilon: float = 1.0  # detect where NFA < epsilon: the expected false detections per image
    nfa_window: int = 5  # window side at the finest latent scale; halves per coarser scale
    nfa_probability: float = 0.9  # chi2 quantile a pixel's ||z||^2 must exceed to count in a window


def uflow_stage(channels: int, flow_steps: int, clamp: float, subnet_ratio: float, permute_soft: bool,
                seed: int) -> SequenceFlow:
    """`flow_steps` AllInOne blocks whose subnets alternate 3x3 and 1x1 convolutions."""
    return SequenceFlow([
        AllInOneCoupling(channels, conv_subnet(3 if step % 2 == 0 else 1, subnet_ratio), affine_clamping=clamp,
                         permute_soft=permute_soft, seed=seed + step)
        for step in range(flow_steps)])


class UFlowModel(nn.Module):
    """Images in [0, 1] -> latents (finest scale first) and the total log|det J|.

    Consecutive feature scales must differ by a factor 2 in resolution (resnet layers do).
    """

    def __init__(self, features: FrozenFeatures, flow_steps: int = 4, clamp: float = 2.0,
                 subnet_ratio: float = 1.0, permute_soft: bool = False, seed: int = 0):
        super().__init__()
        self.features = features
        channels = features.channels
        reductions = features.reductions
        for fine, coarse in zip(reductions, reductions[1:]):
            if coarse != 2 * fine:
                raise ValueError(f"U-Flow needs feature scales a factor 2 apart, got reductions {reductions}")
        stages, up_channels, in_channels = [], [], channels[-1]
        # Built coarse to fine; stage k works at scale len - 1 - k.
        for scale in reversed(range(len(channels))):
            if scale < len(channels) - 1:
                in_channels = channels[scale] + up_channels[-1] // 4
            stages.append(uflow_stage(in_channels, flow_steps, clamp, subnet_ratio, permute_soft,
                                      seed=seed + 1000 * scale))
            up_channels.append(in_channels // 8 * 4)  # about half goes up, a multiple of 4 for the shuffle
        self.stages = nn.ModuleList(stages)
        self.up_channels = up_channels[:-1]  # the finest stage sends nothing up

    def encode(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        features = self.features(images)
        with torch.autocast(images.device.type, enabled=False):  # flows in float32: exp and log-dets
            # shapes as ints: a traced graph keeps them as constants
            feats = [F.layer_norm(f.float(), [int(n) for n in f.shape[1:]]) for f in features]
            latents: list[Tensor] = []
            x = feats[-1]
            log_det = x.new_zeros(x.shape[0])
            for k, stage in enumerate(self.stages):
                x, ld = stage(x)
                log_det = log_det + ld
                scale = len(feats) - 1 - k
                if scale == 0:
                    latents.append(x)
                    break
                up, out = torch.split(x, [self.up_channels[k], x.shape[1] - self.up_channels[k]], dim=1)
                latents.append(out)
                x = torch.cat([feats[scale - 1], F.pixel_shuffle(up, 2)], dim=1)  # a permutation: log-det 0
        return latents[::-1], log_det

    @staticmethod
    def loss(latents: Sequence[Tensor], log_det: Tensor) -> Tensor:
        """mean_b(sum over scales of 0.5 ||z||^2 - log|det J|): the NLL up to a constant."""
        return torch.mean(sum(0.5 * (z ** 2).flatten(1).sum(1) for z in latents) - log_det)

    @staticmethod
    def anomaly_map(latents: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """(B, H, W) in [0, 1]: 1 - mean over scales of the upsampled exp(-0.5 mean_c z^2)."""
        return 1.0 - likelihood_map(latents, size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        latents, _ = self.encode(images)
        maps = self.anomaly_map(latents, tuple(images.shape[-2:]))
        return maps.flatten(1).amax(1), maps


# ---------------------------------------------------------------- the a-contrario threshold

def window_binomial_log10_pvalues(latent: Tensor, window: int, probability_threshold: float) -> np.ndarray:
    """(B, h, w) log10 P(Binomial(n, 1 - q) >= k): k = pixels of the window whose ||z||^2 exceeds the
    chi2(C) quantile q, n = pixels of the window inside the image (edges have smaller windows)."""
    channels = latent.shape[1]
    statistic = (latent.double() ** 2).sum(1, keepdim=True)
    hits = (statistic > stats.chi2.ppf(probability_threshold, channels)).double()
    half = window // 2
    area = (2 * half + 1) ** 2
    k = F.avg_pool2d(hits, 2 * half + 1, 1, half, count_include_pad=True) * area
    n = F.avg_pool2d(torch.ones_like(hits), 2 * half + 1, 1, half, count_include_pad=True) * area
    k, n = k.round()[:, 0].cpu().numpy(), n.round()[:, 0].cpu().numpy()
    return stats.binom.logsf(k - 1, n, 1.0 - probability_threshold) / math.log(10)


def log10_nfa_map(latents: Sequence[Tensor], window: int = 5, probability_threshold: float = 0.9) -> Tensor:
    """(B, h0, w0) log10 NFA at the finest latent's resolution; latents finest first.

    The window is `window` pixels at the finest scale and halves with each coarser one (at least 3).
    """
    finest = tuple(latents[0].shape[-2:])
    log_p = None
    for scale, z in enumerate(latents):
        size = max(int(window / 2 ** scale) // 2, 1) * 2 + 1
        p = torch.from_numpy(window_binomial_log10_pvalues(z, size, probability_threshold))
        p = F.interpolate(p[:, None], size=finest, mode="bilinear", align_corners=False)[:, 0]
        log_p = p if log_p is None else log_p + p
    # Fisher: -2 sum ln p ~ chi2(2 L) for L independent p-values.
    fisher = -2.0 * log_p.numpy() * math.log(10)
    combined = stats.chi2.logsf(fisher, 2 * len(latents)) / math.log(10)
    number_of_tests = sum(z.shape[-2] * z.shape[-1] for z in latents)
    return torch.from_numpy(combined).float() + math.log10(number_of_tests)


def nfa_decisions(log_nfa: Tensor, epsilon: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(NG decision per image: any pixel with NFA < epsilon, the image's -min log10 NFA)."""
    worst = log_nfa.flatten(1).amin(1).cpu().numpy()
    return worst < math.log10(epsilon), -worst


# ---------------------------------------------------------------- the zoo model

class UFlow(TrainedAnomalyModel):
    family = "uflow"
    params_class = UFlowParams
    params: UFlowParams

    def build_model(self) -> nn.Module:
        p = self.params
        backbone = create_backbone(p.backbone, p.layers, self.settings.backbone_weights, self.settings.seed,
                                   init=self.settings.backbone_init,
                                   padding=self.settings.backbone_padding)
        return UFlowModel(FrozenFeatures(backbone), flow_steps=p.flow_steps, clamp=p.clamp,
                          subnet_ratio=p.subnet_ratio, permute_soft=p.permute_soft, seed=self.settings.seed)

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        latents, log_det = self.model.encode(batch["image"])
        return self.model.loss(latents, log_det)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    @property
    def own_decision_rule(self) -> str:
        p = self.params
        return (f"NG where some pixel has NFA < {p.nfa_epsilon:g} (a-contrario: {p.nfa_window}-pixel windows, "
                f"chi2 quantile {p.nfa_probability:g}, Fisher over scales); no labels used")

    @torch.no_grad()
    def own_decisions(self, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """The label-free OK/NG rule: (NG per image where some pixel has NFA < nfa_epsilon,
        -min log10 NFA per image, a continuous strength of that evidence)."""
        self._check_fitted()
        self.model.eval()
        tensors = evaluation_tensors(images, self.settings.image_size, self.settings.resize)
        ng, strength = [], []
        for start in range(0, len(tensors), self.settings.batch_size):
            batch = tensors[start:start + self.settings.batch_size].to(self.device)
            latents, _ = self.model.encode(batch)
            log_nfa = log10_nfa_map(latents, self.params.nfa_window, self.params.nfa_probability)
            batch_ng, batch_strength = nfa_decisions(log_nfa, self.params.nfa_epsilon)
            ng.append(batch_ng)
            strength.append(batch_strength)
        if not ng:
            return np.zeros(0, bool), np.zeros(0)
        return np.concatenate(ng), np.concatenate(strength)


register("uflow-resnet18", UFlow,
         "U-Flow: U-shaped multi-scale flow on resnet18 layer1-3; likelihood map score and a-contrario NFA OK/NG "
         "(CPU budget: 8 of 200 epochs)")
