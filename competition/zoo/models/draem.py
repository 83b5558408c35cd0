"""DRAEM (Zavrtanik, Kristan & Skočaj, ICCV 2021, "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection").

Trained on normal images only, made anomalous on the fly: half of the training samples get a
Perlin-noise anomaly (`painters.perlin_anomaly`: a thresholded Perlin mask filled with an augmented
foreign texture at opacity beta), the other half stay clean. The reconstructive sub-network (an
encoder-decoder without skip connections) learns to return the clean image, with loss
L2 + (1 - SSIM) (11x11 Gaussian window); the discriminative sub-network (a U-Net with skip
connections) reads concat(input, reconstruction) and learns the anomaly mask with the focal loss
(gamma 2). The anomaly map is the discriminative softmax's anomaly channel; the image score is the
maximum of that map after a 21x21 mean filter.

Texture sources for the anomalies come from `anomaly_source` (a folder of images; the paper uses
DTD) or, by default, from generated textures of `textures.OTHER_FAMILIES` (families the dataset
does not use); the run's summary.json says which. The paper's sub-networks are 128/64 channels
wide and train for 700 epochs (`draem-paper`, for a GPU); the default `draem` is narrower for CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from competition.data.layouts import IMAGE_EXTENSIONS, list_images
from competition.zoo.api import unit_tensor
from competition.zoo.components.maps import mean_filter_maps
from competition.zoo.components.ssim import ssim
from competition.zoo.registry import register
from competition.zoo.trained import TrainedAnomalyModel, TrainParams


def _paper_augmentation() -> list[dict[str, Any]]:
    # the paper rotates 30 % of the normal images by up to 90 degrees (imgaug Affine);
    # reflection instead of black corners, so corners are not taught as normal
    return [{"name": "Rotate", "limit": 90, "border_mode": 4, "p": 0.3}]


@dataclass
class DRAEMParams(TrainParams):
    # The paper: Adam lr 1e-4, batch 8, 700 epochs, lr x0.2 at 80 % and 90 %; 256 px.
    epochs: int = 700
    batch_size: int = 8
    optimizer: Literal["adamw", "adam", "sgd"] = "adam"
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    schedule: Literal["constant", "warmup_cosine", "multistep"] = "multistep"
    milestones: tuple[float, ...] = (0.8, 0.9)
    gamma: float = 0.2
    augment: list[dict[str, Any]] = field(default_factory=_paper_augmentation)
    reconstructive_width: int = 128
    discriminative_width: int = 64
    anomaly_probability: float = 0.5  # share of training samples that get a Perlin anomaly
    anomaly_source: str | None = None  # folder of texture images (the paper: DTD); None = generated textures
    mean_filter: int = 21  # image score: max of the map after this mean filter
    focal_gamma: float = 2.0


def _double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    mid = mid or cout
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ReconstructiveSubNetwork(nn.Module):
    """Encoder (5 double-conv blocks, 4 max-pools) and decoder (4 upsampling stages), no skips."""

    def __init__(self, base_width: int = 128, channels: int = 3):
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList([_double_conv(channels, widths[0])] +
                                     [_double_conv(widths[i - 1], widths[i]) for i in range(1, 5)])
        self.up = nn.ModuleList([_up_conv(8 * w, 8 * w), _up_conv(4 * w, 4 * w), _up_conv(2 * w, 2 * w),
                                 _up_conv(w, w)])
        self.decode = nn.ModuleList([_double_conv(8 * w, 4 * w, 8 * w), _double_conv(4 * w, 2 * w, 4 * w),
                                     _double_conv(2 * w, w, 2 * w), _double_conv(w, w)])
        self.out = nn.Conv2d(w, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        for up, block in zip(self.up, self.decode):
            x = block(up(x))
        return self.out(x)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net: 6 encoder blocks (5 max-pools), 5 upsampling stages with skip connections, 2 logits."""

    def __init__(self, base_width: int = 64, in_channels: int = 6, out_channels: int = 2):
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList([_double_conv(in_channels, widths[0])] +
                                     [_double_conv(widths[i - 1], widths[i]) for i in range(1, 6)])
        # (upsampled width, skip width) -> output width, deepest first
        plan = [(8 * w, 8 * w, 8 * w), (4 * w, 8 * w, 4 * w), (2 * w, 4 * w, 2 * w), (w, 2 * w, w), (w, w, w)]
        inputs = [8 * w, 8 * w, 4 * w, 2 * w, w]
        self.up = nn.ModuleList([_up_conv(cin, up) for cin, (up, _, _) in zip(inputs, plan)])
        self.decode = nn.ModuleList([_double_conv(up + skip, out) for up, skip, out in plan])
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decode):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def focal_loss(logits: Tensor, mask: Tensor, gamma: float = 2.0, eps: float = 1e-6) -> Tensor:
    """Focal loss (Lin et al. 2017) of 2-class logits (B, 2, H, W) against a {0, 1} mask (B, 1, H, W)."""
    probabilities = torch.softmax(logits.float(), dim=1)
    target_probability = torch.where(mask[:, 0] > 0.5, probabilities[:, 1], probabilities[:, 0]).clamp(eps, 1.0)
    return (-(1 - target_probability) ** gamma * torch.log(target_probability)).mean()


class DRAEMModel(nn.Module):
    def __init__(self, reconstructive_width: int = 128, discriminative_width: int = 64, mean_filter: int = 21):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(reconstructive_width)
        self.discriminative = DiscriminativeSubNetwork(discriminative_width)
        self.mean_filter = mean_filter

    def reconstruct_and_segment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        reconstruction = self.reconstructive(images)
        logits = self.discriminative(torch.cat([images, reconstruction], dim=1))
        return reconstruction, logits

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _, logits = self.reconstruct_and_segment(images)
        maps = torch.softmax(logits.float(), dim=1)[:, 1]
        smoothed = mean_filter_maps(maps, self.mean_filter)
        return smoothed.flatten(1).amax(1), maps


class DRAEM(TrainedAnomalyModel):
    family = "draem"
    params_class = DRAEMParams
    params: DRAEMParams

    def build_model(self) -> nn.Module:
        p = self.params
        return DRAEMModel(int(p.reconstructive_width), int(p.discriminative_width), int(p.mean_filter))

    def anomaly_sources(self) -> list[np.ndarray] | None:
        """Texture images for the anomalies (read once), or None for generated OTHER_FAMILIES textures."""
        if not self.params.anomaly_source:
            return None
        if getattr(self, "_sources", None) is None:
            from competition.data.images import read_image

            folder = Path(self.params.anomaly_source)
            files = list_images(folder, recursive=True) if folder.is_dir() else []
            if not files:
                raise ValueError(f"draem: anomaly_source={str(folder)!r} holds no images "
                                 f"({', '.join(sorted(IMAGE_EXTENSIONS))}); give a folder of texture images "
                                 "or null for generated textures")
            self._sources = [read_image(p) for p in files]
        return self._sources

    def training_sample(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        from competition.data.painters import perlin_anomaly

        image = self.augmented(image, rng)
        if rng.random() < float(self.params.anomaly_probability):
            sources = self.anomaly_sources()
            texture = None if sources is None else sources[int(rng.integers(len(sources)))]
            anomalous, mask = perlin_anomaly(image, rng, texture_source=texture)
        else:
            anomalous, mask = image, np.zeros(image.shape[:2], np.uint8)
        return {"image": unit_tensor(image), "augmented": unit_tensor(anomalous),
                "mask": torch.from_numpy((mask > 0).astype(np.float32))[None]}

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        reconstruction, logits = self.model.reconstruct_and_segment(batch["augmented"])
        reconstruction = reconstruction.float()
        l2 = F.mse_loss(reconstruction, batch["image"])
        ssim_loss = 1 - ssim(reconstruction, batch["image"])
        segmentation = focal_loss(logits, batch["mask"], float(self.params.focal_gamma))
        return {"loss": l2 + ssim_loss + segmentation, "l2": l2, "ssim": ssim_loss, "focal": segmentation}

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(images)

    def scoring_module(self) -> nn.Module:
        self._check_fitted()
        return self.model.eval()  # its forward is the scoring: [0, 1] images -> (scores, maps)

    def fit_summary(self) -> dict[str, Any]:
        if self.params.anomaly_source:
            return {"anomaly_source": f"folder {self.params.anomaly_source} ({len(self.anomaly_sources())} images)"}
        from competition.data.textures import OTHER_FAMILIES

        return {"anomaly_source": "generated textures of families the dataset does not use "
                                  f"({', '.join(OTHER_FAMILIES)}), not DTD"}


register("draem", DRAEM,
         "DRAEM: reconstructive + discriminative nets on Perlin anomalies, generated textures "
         "(CPU budget: 8 of 700 epochs, 16/16 of 128/64 channels, lr 1e-3)",
         reconstructive_width=16, discriminative_width=16, epochs=8, lr=1.0e-3, batch_size=8)
register("draem-paper", DRAEM,
         "DRAEM as in the paper: 128/64 channels, Adam 1e-4, 700 epochs (GPU)")
