"""Convolutional autoencoder baselines: reconstruction error, and a one-class SVM on its codes.

The network is the CAE of Bergmann et al. ("Improving Unsupervised Defect Segmentation by
Applying Structural Similarity to Autoencoders", VISAPP 2019): nine convolutions with LeakyReLU
(0.2) down to a `latent_dim` code (their 128-px layout; the last kernel spans the remaining
image_size/16 grid), mirrored by transposed convolutions, trained with the L2 loss by Adam
(lr 2e-4, weight decay 1e-5) on the normal images.
- `score: recon`: the per-pixel squared error (mean over channels) is the anomaly map; the image
  score is the maximum of the map smoothed with a Gaussian of sigma 4 (Bergmann et al. segment by
  thresholding the map, so an image is defective when any region is), or its mean
  (`score_reduction: mean`, the classic whole-image error, much weaker on small defects).
- `score: ocsvm`: a one-class SVM (scikit-learn `OneClassSVM`, RBF, nu, gamma="scale") on the
  min-max-scaled codes of the training normals (Andrews et al., "Detecting anomalous data using
  auto-encoders", 2016); the score is minus its decision function. The fitted SVM is kept as its
  support vectors, coefficients and gamma and evaluated in torch, so checkpoints stay
  `weights_only`-safe. Maps are the reconstruction errors.
Switches: `augment` trains on random flips and 90-degree rotations; `tta` averages scores (and
maps, transformed back) over those eight views at test time. Both change this baseline a lot.
The two registry entries share one trained network: it is cached beside the feature cache, keyed
by everything that shapes the training (hyperparameters, seed, image size, the fit images' bytes).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from competition.artifacts import load_checkpoint, save_checkpoint
from competition.runtime import autocast, to_device_images
from competition.zoo.base import AnomalyModel, ImageSet, ValidationSet, gaussian_blur_maps
from competition.zoo.registry import register

# hyperparameters that shape the trained network (the cache key); the scoring ones are not among them
TRAINING_KEYS = ("latent_dim", "width", "epochs", "batch_size", "lr", "weight_decay", "augment")
NETWORK_VERSION = 2  # bump when the architecture, initialisation or training loop changes (invalidates the cache)


def _block(cin: int, cout: int, kernel: int, stride: int, transpose: bool = False) -> nn.Sequential:
    pad = 1 if kernel in (3, 4) else 0
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, kernel, stride, pad)
    return nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True))


class ConvAutoencoder(nn.Module):
    """Bergmann et al.'s CAE: (B, 3, S, S) -> (reconstruction (B, 3, S, S), code (B, latent_dim))."""

    def __init__(self, image_size: int = 128, latent_dim: int = 100, width: int = 32):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"autoencoder: image size must be a multiple of 16, got {image_size}")
        w, grid = width, image_size // 16
        self.encoder = nn.Sequential(
            _block(3, w, 4, 2), _block(w, w, 4, 2), _block(w, w, 3, 1), _block(w, 2 * w, 4, 2),
            _block(2 * w, 2 * w, 3, 1), _block(2 * w, 4 * w, 4, 2), _block(4 * w, 2 * w, 3, 1),
            _block(2 * w, w, 3, 1), nn.Conv2d(w, latent_dim, grid, 1, 0))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, w, grid, 1, 0), nn.LeakyReLU(0.2, inplace=True),
            _block(w, 2 * w, 3, 1), _block(2 * w, 4 * w, 3, 1), _block(4 * w, 2 * w, 4, 2, transpose=True),
            _block(2 * w, 2 * w, 3, 1), _block(2 * w, w, 4, 2, transpose=True), _block(w, w, 3, 1),
            _block(w, w, 4, 2, transpose=True), nn.ConvTranspose2d(w, 3, 4, 2, 1))

        # He initialisation for LeakyReLU(0.2): with PyTorch's default the signal shrinks ~2.5x per
        # layer, the code no longer depends on the input and training starts from a constant code.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu",
                                        mode="fan_in" if isinstance(module, nn.Conv2d) else "fan_out")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return self.decoder(code), code.flatten(1)


class OneClassSVMScorer(nn.Module):
    """A fitted sklearn OneClassSVM (RBF) plus its min-max scaling, as tensors: codes -> -decision."""

    def __init__(self, low: torch.Tensor, span: torch.Tensor, support: torch.Tensor, coef: torch.Tensor,
                 intercept: float, gamma: float):
        super().__init__()
        for name, value in (("low", low), ("span", span), ("support", support), ("coef", coef)):
            self.register_buffer(name, value.float())
        self.intercept, self.gamma = float(intercept), float(gamma)

    @classmethod
    def fit(cls, codes: torch.Tensor, nu: float, seed: int) -> "OneClassSVMScorer":
        from sklearn.svm import OneClassSVM

        x = codes.double().numpy()
        low, high = x.min(0), x.max(0)
        span = np.where(high - low > 0, high - low, 1.0)
        svm = OneClassSVM(kernel="rbf", nu=nu, gamma="scale").fit((x - low) / span)
        return cls(torch.from_numpy(low), torch.from_numpy(span), torch.from_numpy(svm.support_vectors_),
                   torch.from_numpy(svm.dual_coef_[0]), float(svm.intercept_[0]), float(svm._gamma))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        scaled = (codes.float() - self.low) / self.span
        kernel = torch.exp(-self.gamma * torch.cdist(scaled.double(), self.support.double()) ** 2)
        decision = kernel @ self.coef.double() + self.intercept
        return -decision


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the eight flips/rotations of (..., H, W) tensors (k = 0 is the identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


class Autoencoder(AnomalyModel):
    family = "autoencoder"
    DEFAULTS = {
        "score": "recon",  # recon (reconstruction error) | ocsvm (one-class SVM on the codes)
        "score_reduction": "max",  # recon: max of the smoothed error map (a defect is local) | mean
        "latent_dim": 100,
        "width": 32,
        "epochs": 25,
        "batch_size": 32,
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "augment": True,  # random flips / 90-degree rotations while training
        "tta": False,  # average over the eight flips / rotations when scoring
        "nu": 0.1,  # OC-SVM: bound on the share of training outliers
        "blur_sigma": 4.0,
    }

    def __init__(self, settings=None, **params):
        super().__init__(settings, **params)
        if self.score not in ("recon", "ocsvm"):
            raise ValueError(f"autoencoder: score must be 'recon' or 'ocsvm', got {self.score!r}")
        if self.score_reduction not in ("mean", "max"):
            raise ValueError(f"autoencoder: score_reduction must be 'mean' or 'max', got {self.score_reduction!r}")
        self.network = ConvAutoencoder(self.settings.image_size, int(self.latent_dim), int(self.width))
        self.svm: OneClassSVMScorer | None = None

    # -- the trained network, shared by the recon and ocsvm entries through a small cache
    def _network_cache_path(self, images: ImageSet) -> Path | None:
        if not self.settings.cache_dir:
            return None
        key = {k: self.params[k] for k in TRAINING_KEYS}
        key.update(version=NETWORK_VERSION, image_size=self.settings.image_size, seed=self.settings.seed,
                   mean=list(self.settings.mean), std=list(self.settings.std),
                   images=sorted(images.content_key(i) for i in range(len(images))))
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Path(self.settings.cache_dir).parent / "autoencoder" / f"{digest}.pt"

    def _load_tensors(self, images: ImageSet) -> torch.Tensor:
        out = torch.empty(len(images), 3, self.settings.image_size, self.settings.image_size, dtype=torch.float16)
        for idx, batch in images.loader(self.settings):
            out[idx] = batch.half()
        return out

    def _train(self, data: torch.Tensor) -> list[float]:
        generator = torch.Generator().manual_seed(self.settings.seed)
        torch.manual_seed(self.settings.seed)
        self.network = ConvAutoencoder(self.settings.image_size, int(self.latent_dim), int(self.width)).to(self.device)
        optimiser = torch.optim.Adam(self.network.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and self.settings.amp)
        batch_size = max(1, min(int(self.batch_size), len(data)))
        losses = []
        self.network.train()
        bar = tqdm(range(int(self.epochs)), desc="autoencoder", unit="epoch", disable=not self.settings.progress,
                   leave=False)
        for _ in bar:
            order = torch.randperm(len(data), generator=generator)
            total = 0.0
            for start in range(0, len(data) - batch_size + 1, batch_size):
                batch = data[order[start:start + batch_size]].float()
                if self.augment:
                    views = torch.randint(8, (len(batch),), generator=generator).tolist()
                    batch = torch.stack([dihedral(img, k) for img, k in zip(batch, views)])
                batch = to_device_images(batch, self.device, self.settings.channels_last)
                with autocast(self.device, self.settings.amp):
                    recon, _ = self.network(batch)
                    loss = torch.mean((recon.float() - batch) ** 2)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                total += float(loss.detach()) * len(batch)
            losses.append(total / (len(data) // batch_size * batch_size))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.network.eval()
        return losses

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        data = self._load_tensors(images)
        cache = self._network_cache_path(images)
        started = time.perf_counter()
        if cache is not None and cache.exists():
            saved = load_checkpoint(cache, map_location=self.device)
            self.network.load_state_dict(saved["network"])
            self.network.to(self.device).eval()
            losses, reused = list(saved["losses"]), True
        else:
            losses, reused = self._train(data), False
            if cache is not None:
                save_checkpoint({"network": self.network.state_dict(), "losses": losses}, cache)
        self.fit_info = {"epochs": int(self.epochs), "final_loss": losses[-1] if losses else None,
                         "first_loss": losses[0] if losses else None, "network_reused": reused,
                         "train_seconds": round(time.perf_counter() - started, 2)}
        if self.score == "ocsvm":
            codes = torch.cat([self._forward(data[i:i + 64])[1] for i in range(0, len(data), 64)])
            self.svm = OneClassSVMScorer.fit(codes, float(self.nu), self.settings.seed)
            self.fit_info["support_vectors"] = int(self.svm.support.shape[0])

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(error maps (B, S, S), codes (B, latent)) of a normalised batch, float32 on the CPU."""
        x = to_device_images(batch.float(), self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp):
            recon, code = self.network(x)
        error = ((recon.float() - x.float()) ** 2).mean(1)
        return error.cpu(), code.float().cpu()

    def _score_views(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = range(8) if self.tta else range(1)
        scores, maps = [], []
        for k in views:
            error, code = self._forward(dihedral(batch, k))
            error = undo_dihedral(error, k)
            if self.score == "ocsvm":
                scores.append(self.svm(code).float())
            elif self.score_reduction == "mean":
                scores.append(error.flatten(1).mean(1))
            else:
                scores.append(gaussian_blur_maps(error, float(self.blur_sigma)).flatten(1).max(1).values)
            maps.append(error)
        return torch.stack(scores).mean(0), torch.stack(maps).mean(0)

    def _predict(self, images: ImageSet, with_maps: bool):
        size = self.settings.image_size
        scores = np.zeros(len(images))
        maps = np.zeros((len(images), size, size), np.float32) if with_maps else None
        for idx, batch in images.loader(self.settings):
            batch_scores, batch_maps = self._score_views(batch)
            scores[idx.numpy()] = batch_scores.double().numpy()
            if with_maps:
                maps[idx.numpy()] = gaussian_blur_maps(batch_maps, float(self.blur_sigma)).numpy()
        return scores, maps

    def fitted_state(self) -> dict:
        state = {"network": {k: v.cpu() for k, v in self.network.state_dict().items()}}
        if self.svm is not None:
            state["svm"] = {"low": self.svm.low.cpu(), "span": self.svm.span.cpu(), "support": self.svm.support.cpu(),
                            "coef": self.svm.coef.cpu(), "intercept": self.svm.intercept, "gamma": self.svm.gamma}
        return state

    def load_fitted_state(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.network.to(self.device).eval()
        if "svm" in state:
            self.svm = OneClassSVMScorer(**state["svm"])


register("autoencoder-recon", Autoencoder,
         "Convolutional autoencoder (Bergmann et al. CAE, L2) scored by its smoothed error map's max; flip/rot90 training")
register("autoencoder-ocsvm", Autoencoder,
         "One-class SVM (RBF) on the min-max-scaled codes of the same autoencoder", score="ocsvm")
register("autoencoder-recon-tta", Autoencoder,
         "autoencoder-recon with test-time averaging over the eight flips/rotations", tta=True)
