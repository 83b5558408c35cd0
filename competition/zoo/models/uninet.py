"""UniNet (Wei et al., CVPR 2025, "UniNet: A Contrastive Learning-guided Unified Framework with Feature
Selection for Anomaly Detection"), after the authors' reference code (UniNet_lib, unsupervised industrial AD).

Teacher-student on the Reverse Distillation frame (models/reverse_distillation.py supplies the
bottleneck and the reverse-ResNet student decoder). Two teachers: the source teacher, a frozen
ResNet (layer1..layer3), and the target (domain-related) teacher, a copy of it trained with a tiny
learning rate (1e-6) in train mode, so it drifts, BatchNorm statistics first, toward the training
domain. Both teachers' maps, concatenated along the batch, go through the one-class bottleneck and
the student decoder; the student's reconstruction from the target teacher's maps is compared with
the source teacher's maps and the one from the source teacher's maps with the target teacher's:
six (teacher, student) pairs. Domain-related feature selection: before the loss, each student map is
re-weighted by the teacher map of its pair, per channel, with a spatial softmax of the teacher map
times (theta + the teacher channel's mean), theta = min(sigmoid(t) + 0.5, 1) a learnable per-channel
parameter per scale (t starts at 0). Loss, summed over the six pairs, with positions as tokens
(s, t L2-normalised along the channels): 0.7 * mean(1 - cos(s, t)) + 0.3 * the similarity-contrastive
loss -log softmax_j(s_i . t_j / T)_i (each student position must match its own teacher position among
all the image's positions, temperature T = 2) + the margin loss mean(relu(margin - p_ii)), margin 1.
Scoring (no selection): per pair the map 1 - cos(t, s); the weighted decision: the six maps' maxima
are softmaxed, the maxima whose probability exceeds the mean are averaged, and w = max(alpha * that
mean, beta) (alpha 0.01, beta 3e-5); the anomaly map is the sum of the six maps upsampled to the
canvas, and the image score the mean of the top w * H * W values of 1 - exp(map - max(map)).
Optimiser as the reference: AdamW (betas 0.9, 0.999, weight decay 1e-5), lr 5e-3 for the student,
the bottleneck and the selection, 1e-6 for the target teacher; batch 8, 100 epochs, 256 px.

Supervised setting (`supervised`, `uninet-resnet18-supervised`): the paper's industrial results are
unsupervised and its supervised use of labels is a separate setting, so the default entries stay on
normals and a separate entry `uses_defects`: the runner passes the training folds' real defects with
their masks (never the held-out fold's, and not those it keeps back for validation), each one sample of
every epoch. As the reference's `losses` with a mask: at each pair's grid (nearest-neighbour masks) the
contrastive and margin terms average over the normal positions, and the defect positions add the
margin loss's abnormal term mean(relu(p_ii - margin / 2)), pushing the student's match there below half
the margin; a defect without a mask counts as a defect at every position (the reference's image-label
case). A batch without a defect position gives exactly the unsupervised loss, so without defects the
supervised entry trains as `uninet-resnet18`. As in the reference, p_ii is a softmax over all the grid's
positions at T = 2, so it stays under e / (h w) (0.042 on an 8x8 grid, even for a student equal to its
teacher) and the abnormal term never reaches margin / 2: the labelled defects act only by leaving the
normal terms (README, "The anomaly zoo": on bsdata_tiles this entry ranked defects below normals, and so
did the unsupervised entry on the same `zoo.backbone_init: healthy` random teachers, OOF AUROC 0.37 and
0.35, against 0.66 on timm's init: the inversion comes from the teachers, not from the labels).

Deviations, and why:
- Supervised: the cosine term averages over normal positions only (the reference over all), since
  pulling the student toward the teacher on a defect would lower the very score, 1 - cos, meant to
  flag it; the structure loss of the reference's segmentation variant (a decoder trained on masks) is
  left out, the zoo scores with the unsupervised head.
- Weights: offline, the teachers are the shared extractor's backbone with `backbone_weights` (by
  default `zoo.backbone_weights`) or a seeded random initialisation; the paper uses ImageNet weights.
- The reference computes the weighted decision's weight once per test batch (its test batch is 1);
  here it is computed per image, as the paper describes it. A weight giving fewer than one pixel
  takes one. The map is returned unsmoothed, as the reference evaluates it (`map_sigma` smooths it).
- The reference's per-class exceptions (T = 0.1, no selection, teacher lr 1e-4 on some MVTec
  classes) are not applied; `temperature` and `teacher_lr` are parameters. The best epoch is chosen
  on the zoo's validation set (the reference keeps the best test-set AUPRO every 10 epochs).
- Budgets: `uninet-resnet18` is CPU-sized (resnet18, 10 of the paper's 100 epochs, at the run's
  canvas); `uninet-wide-resnet50` is the paper's wide_resnet50_2 with its 100 epochs (a GPU job).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD
from competition.zoo.api import BackboneParams, unit_tensor
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.maps import gaussian_blur_maps
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.models.reverse_distillation import reverse_distillation_parts
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


@dataclass
class UniNetParams(TrainParams, BackboneParams):
    # The paper: AdamW lr 5e-3 (target teacher 1e-6), weight decay 1e-5, batch 8, 100 epochs, 256 px.
    epochs: int = 100
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 5.0e-3
    weight_decay: float = 1.0e-5
    teacher_lr: float = 1.0e-6  # the target teacher's learning rate
    temperature: float = 2.0  # of the similarity-contrastive loss
    balance: float = 0.7  # lambda: cosine loss weight; the contrastive loss weighs 1 - lambda
    margin: float = 1.0
    alpha: float = 0.01  # weighted decision: the score's top share is max(alpha * mean selected peak, beta)
    beta: float = 3.0e-5
    oce_blocks: int = 2  # as reverse_distillation: one-class embedding blocks (3 for WRN-50)
    decoder_blocks: tuple[int, ...] = (2, 2, 2)  # student stages, deep to shallow ((3, 4, 6) for WRN-50)
    width_per_group: int = 64  # 128 for wide resnets
    map_sigma: float = 0.0  # Gaussian smoothing of the returned map only; 0: unsmoothed (the reference)
    supervised: bool = False  # the margin loss also pushes the training folds' labelled defects below margin / 2

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "oce_blocks", "width_per_group"):
            if getattr(self, key) < 1:
                raise ValueError(f"uninet: {key} must be at least 1, got {getattr(self, key)}")
        if len(self.decoder_blocks) != 3 or min(self.decoder_blocks) < 1:
            raise ValueError(f"uninet: decoder_blocks must be 3 positive block counts, got {list(self.decoder_blocks)}")
        for key in ("temperature", "alpha", "beta", "lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"uninet: {key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"uninet: balance must be in [0, 1], got {self.balance}")
        if self.teacher_lr < 0 or self.margin < 0 or self.map_sigma < 0:
            raise ValueError(f"uninet: teacher_lr, margin and map_sigma must be 0 or more, got {self.teacher_lr}, "
                             f"{self.margin}, {self.map_sigma}")


class DomainFeatureSelection(nn.Module):
    """Domain-related feature selection: student map x re-weighted by its pair's teacher map t, per channel,
    x * softmax_hw(t) * (theta + mean_hw(t)), theta = min(sigmoid(param) + 0.5, 1), one learnable
    parameter per channel and scale (shared by the two pairs of a scale)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.thetas = nn.ParameterList(nn.Parameter(torch.zeros(1, int(c), 1, 1)) for c in channels)

    def forward(self, students: Sequence[Tensor], teachers: Sequence[Tensor]) -> list[Tensor]:
        selected = []
        for i, (x, prior) in enumerate(zip(students, teachers)):
            theta = torch.clamp(torch.sigmoid(self.thetas[i % len(self.thetas)]) + 0.5, max=1.0)
            b, c, h, w = x.shape
            weights = torch.softmax(prior.reshape(b, c, h * w), dim=-1).view(b, c, h, w)
            selected.append(x * weights * (theta + prior.mean(dim=(2, 3), keepdim=True)))
        return selected


def contrastive_margin_loss(teacher: Tensor, student: Tensor, temperature: float, balance: float,
                            margin: float, abnormal: Tensor | None = None) -> Tensor:
    """One pair's loss (the reference's `losses`): positions are tokens, and the student's token i must be
    closest to the teacher's token i among all the image's teacher tokens.

    `abnormal` (N, h, w) bool, the supervised setting: the defect positions. The cosine, contrastive and
    margin terms then average over the normal positions only, and the defect positions add the margin
    loss's abnormal term mean(relu(p_ii - margin / 2)): their matching probability is pushed below half
    the margin, so the student does not reproduce the teacher there (at T = 2 it always is already: the module
    docstring). None: every position is normal.
    """
    n, c = student.shape[:2]
    s = F.normalize(student.reshape(n, c, -1).transpose(1, 2), dim=2)  # (N, HW, C)
    t = F.normalize(teacher.reshape(n, c, -1).transpose(1, 2), dim=2)
    distance = 1 - (s * t).sum(dim=2)
    matching = torch.softmax(torch.bmm(s, t.transpose(1, 2)) / temperature, dim=2).diagonal(dim1=1, dim2=2)
    if abnormal is None:
        cosine = distance.mean()
        contrast = -torch.log(matching + 1e-8).mean()
        margin_loss = F.relu(margin - matching).mean()
        return cosine * balance + contrast * (1 - balance) + margin_loss
    abnormal = abnormal.reshape(n, -1).bool()
    normal = ~abnormal
    loss = matching.new_zeros(())
    if normal.any():
        loss = loss + distance[normal].mean() * balance + -torch.log(matching[normal] + 1e-8).mean() * (1 - balance)
        loss = loss + F.relu(margin - matching[normal]).mean()
    if abnormal.any():
        loss = loss + F.relu(matching[abnormal] - margin / 2).mean()
    return loss


def weighted_decision(maps: Sequence[Tensor], size: tuple[int, int], alpha: float,
                      beta: float) -> tuple[Tensor, Tensor]:
    """The weighted decision mechanism: per-pair maps (B, h, w) -> (scores (B,), summed map (B, H, W))."""
    peaks = torch.stack([m.flatten(1).amax(dim=1) for m in maps], dim=1)  # (B, L)
    probs = torch.softmax(peaks, dim=1)
    chosen = (probs > probs.mean(dim=1, keepdim=True)).float()
    chosen = torch.where(chosen.sum(dim=1, keepdim=True) > 0, chosen, torch.ones_like(chosen))  # all equal: all
    weight = torch.clamp((peaks * chosen).sum(dim=1) / chosen.sum(dim=1) * alpha, min=beta)
    total = sum(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0] for m in maps)
    flat = total.flatten(1)
    contrast = 1 - torch.exp(flat - flat.amax(dim=1, keepdim=True))  # max(exp) - exp, max(exp) = 1
    top = torch.clamp(torch.floor(flat.shape[1] * weight), min=1)  # (B,)
    ordered = contrast.sort(dim=1, descending=True).values
    taken = torch.arange(flat.shape[1], device=flat.device)[None] < top[:, None]
    return (ordered * taken).sum(dim=1) / top, total


class UniNetModel(WithFrozenParts):
    """[0, 1] images -> the six (teacher, student) map pairs (training) or (scores, maps) (forward)."""

    frozen_parts = ("source_teacher",)

    def __init__(self, teacher: nn.Module, bottleneck: nn.Module, decoder: nn.Module, channels: Sequence[int],
                 alpha: float = 0.01, beta: float = 3.0e-5, map_sigma: float = 0.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.normalise = ImageNormalise(mean, std)
        self.source_teacher = freeze(teacher)
        self.target_teacher = copy.deepcopy(teacher)
        for parameter in self.target_teacher.parameters():
            parameter.requires_grad_(True)
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.selection = DomainFeatureSelection(channels)
        self.alpha, self.beta, self.map_sigma = float(alpha), float(beta), float(map_sigma)

    def pairs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher maps (source layer1..3, then target layer1..3) and the student maps paired with them."""
        x = self.normalise(images)
        with torch.no_grad():
            source = [f.float() for f in self.source_teacher(x)]
        target = [f.float() for f in self.target_teacher(x)]
        student = self.decoder(self.bottleneck([torch.cat([t, s]) for t, s in zip(target, source)]))
        b = images.shape[0]
        # the first half of the batch came from the target teacher: the reference pairs it with the source
        return source + target, [s.float()[:b] for s in student] + [s.float()[b:] for s in student]

    def loss(self, teachers: Sequence[Tensor], students: Sequence[Tensor], temperature: float, balance: float,
             margin: float, defect_masks: Tensor | None = None) -> Tensor:
        """The six pairs' losses summed; `defect_masks` (B, 1, S, S) in {0, 1}, the supervised setting's defect
        pixels, taken to each pair's grid by nearest neighbour (the reference's)."""
        selected = self.selection(students, teachers)
        if defect_masks is None:
            return sum(contrastive_margin_loss(t, s, temperature, balance, margin) for t, s in zip(teachers, selected))
        grids = [F.interpolate(defect_masks.float(), size=t.shape[-2:], mode="nearest")[:, 0] > 0 for t in teachers]
        return sum(contrastive_margin_loss(t, s, temperature, balance, margin, abnormal)
                   for t, s, abnormal in zip(teachers, selected, grids))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        teachers, students = self.pairs(images)
        maps = [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teachers, students)]
        scores, total = weighted_decision(maps, tuple(images.shape[-2:]), self.alpha, self.beta)
        return scores, gaussian_blur_maps(total, self.map_sigma)


class UniNet(TrainedAnomalyModel):
    family = "uninet"
    params_class = UniNetParams
    params: UniNetParams

    @property
    def uses_defects(self) -> bool:  # the supervised setting: the training folds' labelled defects in the margin loss
        return bool(self.params.supervised)

    def build_model(self) -> nn.Module:
        p = self.params
        teacher, bottleneck, decoder, channels = reverse_distillation_parts(self)
        return UniNetModel(teacher, bottleneck, decoder, channels, float(p.alpha), float(p.beta), float(p.map_sigma),
                           self.settings.mean, self.settings.std)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Two groups: the student side at `lr`, the target teacher at `teacher_lr`."""
        p = self.params
        teacher_ids = {id(q) for q in self.model.target_teacher.parameters()}
        groups = [{"params": [q for q in params if id(q) not in teacher_ids], "lr": p.lr},
                  {"params": [q for q in params if id(q) in teacher_ids], "lr": p.teacher_lr}]
        if p.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        optimiser = torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam
        return optimiser(groups, lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)

    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """A normal; supervised, with its (empty) defect mask, so that normals and defects share a batch."""
        sample = super().training_sample(image, rng)
        if self.params.supervised:
            sample["defect_mask"] = torch.zeros((1,) + tuple(sample["image"].shape[-2:]))
        return sample

    def defect_sample(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> dict[str, Any]:
        """A real defect and its mask; without a mask every position counts as a defect (the reference's
        image-label case)."""
        image, mask = self.augmented_with_mask(image, mask, rng)
        target = np.ones((1,) + image.shape[:2], np.float32) if mask is None else (mask > 0)[None].astype(np.float32)
        return {"image": unit_tensor(image), "defect_mask": torch.from_numpy(target)}

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        teachers, students = self.model.pairs(batch["image"])
        masks = batch.get("defect_mask")
        if masks is not None and not bool((masks > 0).any()):
            masks = None  # a batch of normals only: the unsupervised loss, exactly
        return self.model.loss(teachers, students, float(p.temperature), float(p.balance), float(p.margin), masks)

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict:
        weights = self.settings.backbone_weights
        facts = {"teacher_weights": str(weights) if weights else f"random init (seed {self.settings.seed})"}
        if self.params.supervised:
            facts["supervision"] = "supervised: the training folds' labelled defects in the margin loss"
        return facts


register("uninet-resnet18", UniNet,
         "UniNet: resnet18 source/target teachers, RD student, feature selection, contrastive + margin loss "
         "(CPU budget: 10 of 100 epochs)",
         epochs=10)
register("uninet-resnet18-supervised", UniNet,
         "UniNet, supervised setting: uninet-resnet18 with the training folds' labelled defects pushed beyond the "
         "margin (masks where known; CPU budget: 10 of 100 epochs)",
         epochs=10, supervised=True)
register("uninet-wide-resnet50", UniNet,
         "UniNet as in the paper: wide_resnet50_2 teachers, 3 OCE blocks, 100 epochs (GPU)",
         backbone="wide_resnet50_2", oce_blocks=3, decoder_blocks=(3, 4, 6), width_per_group=128)
