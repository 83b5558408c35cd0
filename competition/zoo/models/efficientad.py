"""EfficientAD (Batzner, Heckler & König, WACV 2024, "EfficientAD: Accurate Visual Anomaly
Detection at Millisecond-Level Latencies"), small (PDN-S) and medium (PDN-M).

- Teacher: a patch description network (PDN) distilled from a pretrained backbone's locally
  aggregated layer-2/3 features (PatchCore-style: 3x3 neighbourhoods, layer 3 upsampled to layer 2,
  channels average-pooled to 384), seen at twice the PDN's input size, with zero-padded convolutions
  during distillation, then frozen and used unpadded; its output is normalised per channel with
  the mean/std over the training normals.
- Student: a PDN with 2 x 384 outputs. The first half learns the teacher with the hard-feature
  loss (mean of the squared differences at or above their 0.999 quantile) plus the penalty
  mean(S(P)^2) on images P from outside the dataset; the second half learns the autoencoder's
  output on colour-jittered images. The autoencoder learns the teacher's output on those images.
- Maps: local = mean_c (T - S_st)^2, global = mean_c (AE - S_ae)^2, each mapped through its 0.9 and
  0.995 quantiles over held-out normal images (0.1 (m - q_a) / (q_b - q_a)), averaged, padded by 4,
  upsampled to the image; image score = the maximum of the combined map (taken before the zero
  padding, so a map below zero everywhere is not floored at 0).

Offline differences, also written to the run's summary.json: (1) the paper distils the teacher
from WideResNet-101 on ImageNet (60k steps); here it is distilled from the shared extractor's
backbone (`distill_backbone`, with `zoo.backbone_weights` or a seeded random initialisation) on the
training normals plus the penalty images, for `teacher_steps` steps; a ready teacher can be given
as `teacher_weights` (a PDN state dict). (2) The penalty images come from `penalty_images` (a
folder) or, by default, from generated textures of `textures.OTHER_FAMILIES` (families the dataset
does not use) instead of ImageNet. (3) The autoencoder's layer sizes follow the image size (its
last encoder kernel is image_size / 32: 8 at the paper's 256 px, 4 at 128 px).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from competition.data.layouts import IMAGE_EXTENSIONS, list_images
from competition.preprocess import IMAGENET_MEAN, IMAGENET_STD, Geometry, fit_to_canvas
from competition.training import EngineConfig, fit
from competition.zoo.api import unit_tensor
from competition.zoo.components.features import calibrate_backbones, create_backbone
from competition.zoo.components.frozen import WithFrozenParts, freeze
from competition.zoo.components.maps import upsample_maps
from competition.zoo.components.normalise import ImageNormalise
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams, fit_record

# The teacher distillation runs as this many parts (the engine's epochs), each ending with a
# resumable last.pt in <run_dir>/teacher; the paper's 60,000 steps would otherwise restart from 0.
DISTILLATION_PARTS = 10


@dataclass
class EfficientADParams(TrainParams):
    # The paper: Adam lr 1e-4, weight decay 1e-5, 70,000 steps of batch 1, lr x0.1 at 95 %.
    epochs: int = 70
    steps_per_epoch: int = 1000
    batch_size: int = 1
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-5
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "multistep"
    milestones: tuple[float, ...] = (0.95,)
    gamma: float = 0.1
    pdn_size: Literal["small", "medium"] = "small"  # small (EfficientAD-S) | medium (EfficientAD-M)
    out_channels: int = 384
    hard_quantile: float = 0.999
    quantile_a: float = 0.9
    quantile_b: float = 0.995
    penalty_images: str | None = None  # folder of out-of-dataset images; None = generated OTHER_FAMILIES textures
    penalty_count: int = 256  # penalty images kept (generated, or drawn from the folder)
    teacher_weights: str | None = None  # a distilled PDN state dict (.pth / .safetensors); None = distil here
    distill_backbone: str = "resnet18"  # feature source of the teacher (paper: wide_resnet101_2)
    distill_layers: tuple[int, ...] = (2, 3)
    teacher_steps: int = 60000  # paper: 60,000 steps of batch 16 on ImageNet
    teacher_batch_size: int = 16
    teacher_lr: float = 1.0e-4

# (kind, in, out, kernel, padding when padded) per layer; "pool" = AvgPool2d(2, 2, padding).
_PDN_LAYERS = {
    "small": [("conv", 3, 128, 4, 3), ("relu",), ("pool", 1), ("conv", 128, 256, 4, 3), ("relu",), ("pool", 1),
              ("conv", 256, 256, 3, 1), ("relu",), ("conv", 256, None, 4, 0)],
    "medium": [("conv", 3, 256, 4, 3), ("relu",), ("pool", 1), ("conv", 256, 512, 4, 3), ("relu",), ("pool", 1),
               ("conv", 512, 512, 1, 0), ("relu",), ("conv", 512, 512, 3, 1), ("relu",),
               ("conv", 512, None, 4, 0), ("relu",), ("conv", None, None, 1, 0)],
}


class PatchDescriptionNetwork(nn.Module):
    """PDN-S / PDN-M: 33x33-pixel receptive field, `out_channels` per position.

    `forward(x, padded=True)` zero-pads like the distillation network (output side = input / 4);
    unpadded (training and scoring) the output is input / 4 - 8 (56 at 256 px, 24 at 128 px).
    """

    def __init__(self, size: str = "small", out_channels: int = 384):
        super().__init__()
        if size not in _PDN_LAYERS:
            raise ValueError(f"efficientad: PDN size must be small or medium, got {size!r}")
        self.spec = []
        convs = []
        for layer in _PDN_LAYERS[size]:
            if layer[0] == "conv":
                _, cin, cout, kernel, pad = layer
                convs.append(nn.Conv2d(cin or out_channels, cout or out_channels, kernel))
                self.spec.append(("conv", len(convs) - 1, pad))
            else:
                self.spec.append(layer)
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor, padded: bool = False) -> Tensor:
        for layer in self.spec:
            if layer[0] == "conv":
                conv = self.convs[layer[1]]
                x = F.conv2d(x, conv.weight, conv.bias, padding=layer[2] if padded else 0)
            elif layer[0] == "relu":
                x = F.relu(x)
            else:
                x = F.avg_pool2d(x, 2, 2, padding=layer[1] if padded else 0)
        return x


def pdn_output_side(image_size: int, size: str = "small") -> int:
    """Side of the unpadded PDN's output for a square input (no weights needed)."""
    side = image_size
    for layer in _PDN_LAYERS[size]:
        if layer[0] == "conv":
            side = side - layer[3] + 1
        elif layer[0] == "pool":
            side = side // 2
    return side


class EfficientADAutoencoder(nn.Module):
    """The paper's autoencoder: six stride-2 convs down to a 64-d code, eight upsample+conv stages back
    to the PDN's output grid; decoder ReLUs are followed by dropout 0.2."""

    def __init__(self, image_size: int, output_side: int, out_channels: int = 384, dropout: float = 0.2):
        super().__init__()
        if image_size < 64 or image_size % 32:
            raise ValueError(f"efficientad: image_size must be a multiple of 32 and >= 64, got {image_size}")
        down = [nn.Conv2d(3, 32, 4, 2, 1), nn.Conv2d(32, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1),
                nn.Conv2d(64, 64, 4, 2, 1), nn.Conv2d(64, 64, 4, 2, 1)]
        layers: list[nn.Module] = []
        for conv in down:
            layers += [conv, nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(64, 64, image_size // 32))  # 8 at 256 px: a 1x1 code
        self.encoder = nn.Sequential(*layers)
        s = image_size
        self.sizes = [max(1, v) for v in (s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1)]
        self.sizes.append(output_side)
        self.up_convs = nn.ModuleList([nn.Conv2d(64, 64, 4, 1, 2) for _ in range(6)])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(64, out_channels, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.encoder(x)
        for size, conv in zip(self.sizes[:-1], self.up_convs):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=self.sizes[-1], mode="bilinear", align_corners=False)
        return self.head(x)


class DistillationTarget(nn.Module):
    """The teacher's target: a frozen backbone's layers, each locally aggregated over 3x3 patches and
    mean-mapped to `patch_dim` channels, layer 3 resized to layer 2's grid, all average-pooled to
    `out_channels` (PatchCore's feature aggregation, as in the reference pretraining)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 384, patch_dim: int = 1024,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone = backbone.eval()
        self.normalise = ImageNormalise(mean, std)
        self.out_channels, self.patch_dim = out_channels, patch_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """[0, 1] images (B, 3, S, S), seen at 2S -> (B, out_channels, h2, w2) on layer 2's grid."""
        x = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
        features = [f.float() for f in self.backbone(self.normalise(x))]
        grid = features[0].shape[-2:]
        mapped = []
        for feature in features:
            b, c = feature.shape[:2]
            patches = F.unfold(feature, kernel_size=3, padding=1)  # (B, C*9, h*w), channel-major
            h, w = feature.shape[-2:]
            patches = patches.transpose(1, 2).reshape(b * h * w, 1, c * 9)
            patches = F.adaptive_avg_pool1d(patches, self.patch_dim).reshape(b, h, w, self.patch_dim)
            patches = patches.permute(0, 3, 1, 2)
            if (h, w) != tuple(grid):
                patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
            mapped.append(patches)
        stacked = torch.stack(mapped, dim=-1)  # (B, D, h, w, layers): per position [layer0 D, layer1 D]
        b, d, h, w, n = stacked.shape
        flat = stacked.permute(0, 2, 3, 4, 1).reshape(b * h * w, 1, n * d)
        pooled = F.adaptive_avg_pool1d(flat, self.out_channels).reshape(b, h, w, self.out_channels)
        return pooled.permute(0, 3, 1, 2).contiguous()


class EfficientADModel(WithFrozenParts):
    """Teacher, student and autoencoder, with the statistics scoring needs as buffers."""

    frozen_parts = ("teacher",)

    def __init__(self, image_size: int, pdn_size: str = "small", out_channels: int = 384,
                 quantile_a: float = 0.9, quantile_b: float = 0.995, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.out_channels = out_channels
        self.quantile_a, self.quantile_b = quantile_a, quantile_b
        self.normalise = ImageNormalise(mean, std)
        self.teacher = PatchDescriptionNetwork(pdn_size, out_channels)
        self.student = PatchDescriptionNetwork(pdn_size, 2 * out_channels)
        self.autoencoder = EfficientADAutoencoder(image_size, pdn_output_side(image_size, pdn_size), out_channels)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        self.register_buffer("map_quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # st a, st b, ae a, ae b

    def freeze_teacher(self) -> None:
        freeze(self.teacher)

    @torch.no_grad()
    def teacher_output(self, x: Tensor) -> Tensor:
        """Normalised teacher features of normalised images x."""
        return (self.teacher(x).float() - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(local map, global map), each (B, 1, h, w), before quantile normalisation."""
        x = self.normalise(images)
        teacher = self.teacher_output(x)
        student = self.student(x).float()
        autoencoder = self.autoencoder(x).float()
        map_st = ((teacher - student[:, :self.out_channels]) ** 2).mean(1, keepdim=True)
        map_ae = ((autoencoder - student[:, self.out_channels:]) ** 2).mean(1, keepdim=True)
        return map_st, map_ae

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        map_st, map_ae = self.raw_maps(images)
        st_a, st_b, ae_a, ae_b = self.map_quantiles
        combined = 0.5 * (0.1 * (map_st - st_a) / (st_b - st_a)) + 0.5 * (0.1 * (map_ae - ae_a) / (ae_b - ae_a))
        # The image score is the maximum over the map the networks produced; the zero border the
        # reference pads on (the unpadded PDN lost 4 output pixels per side) only aligns the map
        # with the image and must not floor the score of a map that is negative everywhere.
        scores = combined.flatten(1).amax(1)
        maps = upsample_maps(F.pad(combined, (4, 4, 4, 4))[:, 0], images.shape[-1])
        return scores, maps


def hard_feature_loss(distance: Tensor, quantile: float) -> Tensor:
    """Mean of the squared differences at or above their `quantile` (the paper's hard-feature loss)."""
    flat = distance.flatten().float()
    if flat.numel() <= 2**24:
        threshold = torch.quantile(flat, quantile)
    else:  # torch.quantile's size limit: the order statistic without interpolation
        threshold = flat.kthvalue(max(1, int(round(quantile * (flat.numel() - 1))) + 1)).values
    return flat[flat >= threshold].mean()


def _grayscale(image: Tensor) -> Tensor:
    return TF.rgb_to_grayscale(image, num_output_channels=3)


class DistillationBatches:
    """`steps` batches drawn with replacement from the distillation images, a tenth of them turned
    gray (the reference's RandomGrayscale(0.1)), drawn lazily from `generator`."""

    def __init__(self, images: Tensor, batch_size: int, steps: int, generator: torch.Generator):
        self.images, self.batch_size, self.steps, self.generator = images, batch_size, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            x = self.images[torch.randint(len(self.images), (self.batch_size,), generator=self.generator)]
            gray = torch.rand(len(x), generator=self.generator) < 0.1
            if gray.any():
                x[gray] = _grayscale(x[gray])
            yield x


def _jitter_for_autoencoder(image: Tensor, rng: np.random.Generator) -> Tensor:
    """One of ColorJitter(brightness=0.2), (contrast=0.2), (saturation=0.2), as the reference."""
    factor = float(rng.uniform(0.8, 1.2))
    choice = int(rng.integers(3))
    if choice == 0:
        return TF.adjust_brightness(image, factor)
    if choice == 1:
        return TF.adjust_contrast(image, factor)
    return TF.adjust_saturation(image, factor)


def _centre_crop_at_double_size(image: np.ndarray, size: int, resize: str = "square") -> np.ndarray:
    """The reference's penalty view: fit to a 2S canvas by the run's geometry (`zoo.resize`), keep the
    central S x S (letterboxed, an image up to twice as wide as high keeps its aspect in the crop)."""
    big = fit_to_canvas(image, Geometry(image_size=2 * size, resize=resize))[0]
    start = size // 2
    return np.ascontiguousarray(big[start:start + size, start:start + size])


class EfficientAD(TrainedAnomalyModel):
    family = "efficientad"
    params_class = EfficientADParams
    params: EfficientADParams

    # ---- networks
    def build_model(self) -> nn.Module:
        p = self.params
        net = EfficientADModel(self.settings.image_size, p.pdn_size, int(p.out_channels), float(p.quantile_a),
                               float(p.quantile_b), self.settings.mean, self.settings.std)
        net.freeze_teacher()
        return net

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.model.student.parameters()) + list(self.model.autoencoder.parameters())

    # ---- data
    def penalty_pool(self) -> np.ndarray:
        """(N, S, S, 3) uint8 penalty images, built once per fit from the seed (identical on resume)."""
        if getattr(self, "_penalty_pool", None) is None:
            self._penalty_pool, self._penalty_source = self._load_penalty_pool()
        return self._penalty_pool

    def _load_penalty_pool(self) -> tuple[np.ndarray, str]:
        size = self.settings.image_size
        rng = np.random.default_rng([self.settings.seed, 2718])
        count = int(self.params.penalty_count)
        if self.params.penalty_images:
            from competition.data.images import read_image

            folder = Path(self.params.penalty_images)
            files = list_images(folder, recursive=True) if folder.is_dir() else []
            if not files:
                raise ValueError(f"efficientad: penalty_images={str(folder)!r} holds no images "
                                 f"({', '.join(sorted(IMAGE_EXTENSIONS))}); give a folder of out-of-dataset "
                                 "images or null for generated textures")
            chosen = rng.choice(len(files), size=min(count, len(files)), replace=False)
            pool = [_centre_crop_at_double_size(read_image(files[i]), size, self.settings.resize)
                    for i in sorted(chosen)]
            return np.stack(pool), f"folder {folder} ({len(pool)} of {len(files)} images)"
        from competition.data.textures import OTHER_FAMILIES, make_texture

        families = [OTHER_FAMILIES[i % len(OTHER_FAMILIES)] for i in range(count)]
        pool = [_centre_crop_at_double_size(make_texture(family, (2 * size, 2 * size), rng), size)
                for family in families]
        return np.stack(pool), (f"generated textures of families the dataset does not use "
                                f"({', '.join(OTHER_FAMILIES)}; {count} images), not ImageNet")

    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        plain = unit_tensor(self.augmented(image, rng))
        pool = self.penalty_pool()
        penalty = unit_tensor(pool[int(rng.integers(len(pool)))])
        if rng.random() < 0.3:  # the reference's RandomGrayscale(0.3) on penalty images
            penalty = _grayscale(penalty)
        return {"image": plain, "image_ae": _jitter_for_autoencoder(plain, rng).clamp(0, 1), "penalty": penalty}

    # ---- teacher
    def before_training(self, normals: np.ndarray) -> None:
        net = self.model
        if self.params.teacher_weights:
            from competition.weights import load_local_weights

            load_local_weights(net.teacher, str(self.params.teacher_weights), "teacher", "efficientad teacher_weights")
            self.fit_info["teacher"] = f"loaded from {self.params.teacher_weights}"
        else:
            self.fit_info["teacher"] = self._distil_teacher(normals)
        net.freeze_teacher()
        self._teacher_statistics(normals)

    def _distil_teacher(self, normals: np.ndarray) -> str:
        """Train the padded teacher PDN to predict normalised backbone features (reference pretraining)."""
        device, settings, p = self.device, self.settings, self.params
        weights = settings.backbone_weights
        backbone = create_backbone(p.distill_backbone, tuple(int(i) for i in p.distill_layers), weights,
                                   settings.seed, init=settings.backbone_init,
                                   padding=settings.backbone_padding).to(device)
        calibrate_backbones(backbone, normals, settings)  # a healthy random backbone: statistics of the normals
        target_net = DistillationTarget(backbone, int(p.out_channels), mean=settings.mean, std=settings.std).to(device)
        images = torch.cat([unit_tensor(normals), unit_tensor(self.penalty_pool())])
        batch = int(p.teacher_batch_size)
        # Channel statistics of the target over the distillation images.
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(images), batch):
            target = target_net(images[start:start + batch].to(device))
            total = total + target.sum(dim=(0, 2, 3))
            total_sq = total_sq + (target ** 2).sum(dim=(0, 2, 3))
            count += target.shape[0] * target.shape[2] * target.shape[3]
        mean = (total / count).view(1, -1, 1, 1)
        std = (total_sq / count - mean.view(-1) ** 2).clamp_min(1e-12).sqrt().view(1, -1, 1, 1)

        teacher = self.model.teacher
        for parameter in teacher.parameters():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(teacher.parameters(), lr=float(p.teacher_lr), weight_decay=1.0e-5)
        steps = int(p.teacher_steps)
        parts = min(DISTILLATION_PARTS, steps)
        generator = torch.Generator().manual_seed(settings.seed)  # one stream over every part, kept in last.pt

        def part_batches(part: int) -> DistillationBatches:
            return DistillationBatches(images, min(batch, len(images)),
                                       (part + 1) * steps // parts - part * steps // parts, generator)

        def distillation_step(x: Tensor) -> Tensor:
            x = x.to(device)
            target = (target_net(x) - mean) / std
            prediction = teacher(self.model.normalise(x), padded=True).float()
            if prediction.shape[-2:] != target.shape[-2:]:
                target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
            return torch.mean((target - prediction) ** 2)

        # float32 as the reference distils; the parts are the engine's epochs, each resumable
        engine = EngineConfig(epochs=parts, name="efficientad teacher distillation", amp=False,
                              out=Path(settings.run_dir) / "teacher" if settings.run_dir else None,
                              record=fit_record(self), progress=settings.progress)
        history = fit(teacher, optimizer, part_batches, distillation_step, engine, device=device,
                      extra_state=lambda: {"generator": generator.get_state()},
                      restore_extra_state=lambda state: generator.set_state(state["generator"])).history
        losses = [row["train_loss"] for row in history]
        self.fit_info["teacher_distillation_loss"] = {  # mean losses of the first and the last part
            "first": losses[0] if losses else float("nan"), "last": losses[-1] if losses else float("nan"),
            "steps": steps}
        source = str(weights) if weights else f"random init, seed {settings.seed}"
        return (f"distilled here for {steps} steps from {p.distill_backbone} layers "
                f"{list(p.distill_layers)} ({source}) on the training normals and penalty images; "
                "the paper distils from wide_resnet101_2 on ImageNet")

    @torch.no_grad()
    def _teacher_statistics(self, normals: np.ndarray) -> None:
        """Per-channel mean and std of the teacher's output over the training normals."""
        net = self.model
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(normals), self.settings.batch_size):
            x = unit_tensor(normals[start:start + self.settings.batch_size]).to(self.device)
            out = net.teacher(net.normalise(x)).float()
            total = total + out.sum(dim=(0, 2, 3))
            total_sq = total_sq + (out ** 2).sum(dim=(0, 2, 3))
            count += out.shape[0] * out.shape[2] * out.shape[3]
        mean = total / count
        net.teacher_mean.copy_(mean.view(1, -1, 1, 1))
        net.teacher_std.copy_((total_sq / count - mean ** 2).clamp_min(1e-12).sqrt().view(1, -1, 1, 1))

    # ---- training and scoring
    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        net, c = self.model, int(self.params.out_channels)
        image, image_ae, penalty = (net.normalise(batch[k]) for k in ("image", "image_ae", "penalty"))
        teacher = net.teacher_output(image)
        distance_st = (teacher - net.student(image)[:, :c].float()) ** 2
        loss_hard = hard_feature_loss(distance_st, float(self.params.hard_quantile))
        loss_penalty = torch.mean(net.student(penalty)[:, :c].float() ** 2)
        autoencoder = net.autoencoder(image_ae).float()
        teacher_ae = net.teacher_output(image_ae)
        student_ae = net.student(image_ae)[:, c:].float()
        loss_ae = torch.mean((teacher_ae - autoencoder) ** 2)
        loss_stae = torch.mean((autoencoder - student_ae) ** 2)
        total = loss_hard + loss_penalty + loss_ae + loss_stae
        return {"loss": total, "hard": loss_hard, "penalty": loss_penalty, "ae": loss_ae, "stae": loss_stae}

    def calibrate(self, normals: Tensor) -> None:
        """Quantiles q_a / q_b of both maps over held-out normal images (the paper's map normalisation)."""
        net = self.model
        maps_st, maps_ae = [], []
        for start in range(0, len(normals), self.settings.batch_size):
            map_st, map_ae = net.raw_maps(normals[start:start + self.settings.batch_size])
            maps_st.append(map_st.flatten())
            maps_ae.append(map_ae.flatten())
        st, ae = torch.cat(maps_st), torch.cat(maps_ae)
        qa, qb = float(self.params.quantile_a), float(self.params.quantile_b)
        quantiles = [_quantile(st, qa), _quantile(st, qb), _quantile(ae, qa), _quantile(ae, qb)]
        for low, high in ((0, 1), (2, 3)):  # a degenerate map (all equal) must not divide by zero
            if quantiles[high] - quantiles[low] < 1e-12:
                quantiles[high] = quantiles[low] + 1e-12
        net.map_quantiles.copy_(torch.tensor(quantiles, device=net.map_quantiles.device))

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict[str, Any]:
        self.penalty_pool()
        return {"penalty_images": self._penalty_source, "teacher": self.fit_info.get("teacher", "resumed run")}


def _quantile(values: Tensor, q: float) -> float:
    values = values.float()
    if values.numel() > 2**24:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:2**24]]
    return float(torch.quantile(values, q))


# CPU-sized: about 1/500 of the paper's student steps and 1/1000 of its teacher steps, so the
# student learning rate is 10x the paper's (1e-3); the -paper entries keep the paper's budget.
register("efficientad-s", EfficientAD,
         "EfficientAD-S: PDN-S teacher distilled offline, hard-feature student, autoencoder, quantile maps "
         "(CPU budget: 120 of 70,000 student steps, 40 of 60,000 teacher steps, lr 1e-3)",
         pdn_size="small", epochs=3, steps_per_epoch=40, batch_size=2, lr=1.0e-3, teacher_steps=40,
         teacher_batch_size=4)
register("efficientad-m", EfficientAD,
         "EfficientAD-M: as efficientad-s with the medium PDN (CPU budget: 80 of 70,000 student steps, "
         "30 of 60,000 teacher steps, lr 1e-3)",
         pdn_size="medium", epochs=2, steps_per_epoch=40, batch_size=2, lr=1.0e-3, teacher_steps=30,
         teacher_batch_size=4)
register("efficientad-s-paper", EfficientAD,
         "EfficientAD-S with the paper's budget: 70k student steps, 60k teacher steps, Adam 1e-4 (GPU)",
         pdn_size="small")
register("efficientad-m-paper", EfficientAD,
         "EfficientAD-M with the paper's budget: 70k student steps, 60k teacher steps, Adam 1e-4 (GPU)",
         pdn_size="medium")
