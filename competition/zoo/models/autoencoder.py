"""Convolutional autoencoder baselines: reconstruction error, and a one-class SVM on its codes.

The network is the CAE of Bergmann et al. ("Improving Unsupervised Defect Segmentation by
Applying Structural Similarity to Autoencoders", VISAPP 2019): nine convolutions with LeakyReLU
(0.2) down to a `latent_dim` code (their 128-px layout; the last kernel spans the remaining
image_size/16 grid), mirrored by transposed convolutions, trained by Adam (lr 2e-4, weight decay
1e-5) on the normal images with the L2 loss or (`loss: ssim`, their SSIM autoencoder) 1 - SSIM
over 11 x 11 patches (uniform window, reflect padding, on the un-normalised [0, 1] RGB images; the
paper's images are grayscale, here SSIM is averaged over the three channels).
- `score: recon`: the per-pixel squared error (mean over channels), or with `loss: ssim` the
  per-pixel 1 - SSIM(x, x_hat) (the paper's residual map), is the anomaly map; the image
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
Training runs on the project's engine (`competition.training.fit`), like the other trained models:
the epoch kept is the one with the best AUROC on the ValidationSet (held-out training normals,
painted copies, the training folds' real defects), always by the reconstruction score, and a
killed fit resumes from the run folder's last.pt. The registry entries share one trained network:
it is cached beside the feature cache, keyed by everything that shapes the training
(hyperparameters, seed, image size, the fit and validation images' bytes).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from competition.artifacts import load_checkpoint, save_checkpoint
from competition.runtime import autocast, to_device_images
from competition.training import CheckpointTracker, EngineConfig, fit
from competition.tta import dihedral, undo_dihedral
from competition.zoo.api import AnomalyModel, ImageSet, ValidationSet
from competition.zoo.components.maps import gaussian_blur_maps
from competition.zoo.components.ssim import ssim_map
from competition.zoo.registry import register
from competition.zoo.trained import DEFAULT_VALIDATION_SHARE, fit_record, validation_aurocs
from competition.zoo.validation import split_validation

# hyperparameters that shape the trained network (the cache key); the scoring ones are not among them
TRAINING_KEYS = ("latent_dim", "width", "epochs", "batch_size", "lr", "weight_decay", "augment", "patience",
                 "blur_sigma")  # blur_sigma: the validation score picks the epoch kept
NETWORK_VERSION = 3  # bump when the architecture, initialisation or training loop changes (invalidates the cache)


@dataclass
class AutoencoderParams:
    score: Literal["recon", "ocsvm"] = "recon"  # recon (reconstruction error) | ocsvm (one-class SVM on the codes)
    score_reduction: Literal["max", "mean"] = "max"  # recon: max of the smoothed error map (a defect is local) | mean
    latent_dim: int = 100
    width: int = 32
    epochs: int = 25
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-5
    augment: bool = True  # random flips / 90-degree rotations while training
    patience: int = 0  # stop after this many epochs without a better validation AUROC; 0 = off
    tta: bool = False  # average over the eight flips / rotations when scoring
    nu: float = 0.1  # OC-SVM: bound on the share of training outliers
    blur_sigma: float = 4.0
    loss: Literal["l2", "ssim"] = "l2"  # training loss and error map: squared error | 1 - SSIM (Bergmann et al.)
    ssim_window: int = 11  # side of the uniform SSIM window (the paper's patch size)


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
    """A fitted sklearn OneClassSVM (RBF) plus its min-max scaling, as tensors: codes -> -decision.

    Fitted state, buffers registered empty (and left empty by the reconstruction-error entries).
    """

    def __init__(self):
        super().__init__()
        for name in ("low", "span", "coef"):
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("support", torch.empty(0, 0))
        self.register_buffer("intercept", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gamma", torch.zeros((), dtype=torch.float64))

    def fit(self, codes: torch.Tensor, nu: float) -> OneClassSVMScorer:
        from sklearn.svm import OneClassSVM

        x = codes.double().numpy()
        low, high = x.min(0), x.max(0)
        span = np.where(high - low > 0, high - low, 1.0)
        svm = OneClassSVM(kernel="rbf", nu=nu, gamma="scale").fit((x - low) / span)
        self.low, self.span = torch.from_numpy(low).float(), torch.from_numpy(span).float()
        self.support = torch.from_numpy(svm.support_vectors_).float()
        self.coef = torch.from_numpy(svm.dual_coef_[0]).float()
        self.intercept = torch.tensor(float(svm.intercept_[0]), dtype=torch.float64)
        self.gamma = torch.tensor(float(svm._gamma), dtype=torch.float64)
        return self

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        scaled = (codes.float() - self.low) / self.span
        kernel = torch.exp(-float(self.gamma) * torch.cdist(scaled.double(), self.support.double()) ** 2)
        decision = kernel @ self.coef.double() + float(self.intercept)
        return -decision


class AutoencoderModel(nn.Module):
    """The trained CAE (`network`) and, for the OC-SVM entries, the SVM fitted on its codes (`svm`)."""

    def __init__(self, image_size: int, latent_dim: int, width: int):
        super().__init__()
        self.network = ConvAutoencoder(image_size, latent_dim, width)
        self.svm = OneClassSVMScorer()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(x)


class Autoencoder(AnomalyModel):
    family = "autoencoder"
    params_class = AutoencoderParams
    params: AutoencoderParams
    export_unsupported = ("not yet written as one scoring module: its scoring loop averages the TTA views and "
                          "blurs the maps outside the network")
    uses_validation = True

    def build_model(self) -> AutoencoderModel:
        return AutoencoderModel(self.settings.image_size, int(self.params.latent_dim), int(self.params.width))

    # -- the trained network, shared by the recon and ocsvm entries through a small cache
    def _network_cache_path(self, images: ImageSet, validation: ValidationSet) -> Path | None:
        if not self.settings.cache_dir:
            return None
        params = asdict(self.params)
        key = {k: params[k] for k in TRAINING_KEYS}
        if self.params.loss != "l2":  # L2 keys stay as they were, so their cached networks stay valid
            key.update(loss=self.params.loss, ssim_window=self.params.ssim_window)
        key.update(version=NETWORK_VERSION, image_size=self.settings.image_size, seed=self.settings.seed,
                   mean=list(self.settings.mean), std=list(self.settings.std),
                   images=sorted(images.content_key(i) for i in range(len(images))),
                   validation=[[validation.images.content_key(i), int(label)]
                               for i, label in enumerate(validation.labels)])
        if not self.settings.geometry.is_square:  # the canvas the network learnt on (square keys stay as they were)
            key["geometry"] = self.settings.geometry.describe()
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Path(self.settings.cache_dir).parent / "autoencoder" / f"{digest}.pt"

    def _load_tensors(self, images: ImageSet) -> torch.Tensor:
        out = torch.empty(len(images), 3, self.settings.image_size, self.settings.image_size, dtype=torch.float16)
        for idx, batch in images.loader(self.settings):
            out[idx] = batch.half()
        return out

    def _train(self, data: torch.Tensor, validation: ValidationSet) -> list[dict]:
        """Train the CAE with `training.fit`; the model ends holding the best validation epoch. Returns the history."""
        p, seed = self.params, self.settings.seed
        torch.manual_seed(seed)
        self.model = self.build_model().to(self.device)
        network = self.model.network
        optimiser = torch.optim.Adam(network.parameters(), lr=float(p.lr), weight_decay=float(p.weight_decay))
        batch_size = max(1, min(int(p.batch_size), len(data)))
        validation_data = self._load_tensors(validation.images)
        labels = np.asarray(validation.labels, int)
        kinds = np.asarray(validation.kinds or ["normal"] * len(validation), dtype=object)

        def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
            # seeded by (seed, epoch): a resumed fit draws the same batches and views
            generator = torch.Generator().manual_seed(seed * 100003 + epoch)
            order = torch.randperm(len(data), generator=generator)
            batches = []
            for start in range(0, len(data) - batch_size + 1, batch_size):
                views = torch.randint(8, (batch_size,), generator=generator) if p.augment else None
                batches.append({"index": order[start:start + batch_size], "views": views})
            return batches

        def training_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            images = data[batch["index"]].float()
            if batch["views"] is not None:
                images = torch.stack([dihedral(img, int(k)) for img, k in zip(images, batch["views"])])
            images = to_device_images(images, self.device, self.settings.channels_last)
            recon, _ = network(images)
            if p.loss == "ssim":
                return 1 - self._ssim_map(recon.float(), images.float()).mean()
            return torch.mean((recon.float() - images) ** 2)

        def validate() -> dict[str, float]:
            # always the reconstruction score: the entries (recon, ocsvm, tta) share the network
            self.model.eval()
            scores = [gaussian_blur_maps(self._forward(validation_data[i:i + 64])[0], float(p.blur_sigma))
                      .flatten(1).max(1).values for i in range(0, len(validation_data), 64)]
            return validation_aurocs(torch.cat(scores).double().numpy() if scores else np.zeros(0), labels, kinds)

        engine = EngineConfig(epochs=int(p.epochs), name=self.family, **self.settings.precision(),
                              patience=int(p.patience), out=self.settings.run_dir, record=fit_record(self),
                              shown_metrics=("val_auroc",),
                              progress=self.settings.progress)
        result = fit(network, optimiser, epoch_batches, training_step, engine, device=self.device, validate=validate,
                     tracker=CheckpointTracker(metric="val_auroc", tie_metric="train_loss"))
        self.fit_info["resumed_from_epoch"] = result.resumed_after
        network.eval()
        return result.history

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        if validation is None:
            images, validation = split_validation(images, None, DEFAULT_VALIDATION_SHARE, self.settings.seed)
        data = self._load_tensors(images)
        cache = self._network_cache_path(images, validation)
        started = time.perf_counter()
        if cache is not None and cache.exists():
            saved = load_checkpoint(cache, map_location=self.device)
            self.model = self.build_model()
            self.model.network.load_state_dict(saved["network"])
            self.model.to(self.device).eval()
            history, reused = list(saved["history"]), True
        else:
            history, reused = self._train(data, validation), False
            if cache is not None:
                save_checkpoint({"network": self.model.network.state_dict(), "history": history}, cache)
        trained = [row for row in history if "train_loss" in row]
        best = max((row for row in history if row.get("best_changed")), key=lambda row: row["epoch"], default={})
        self.fit_info.update({
            "epochs": int(self.params.epochs), "epochs_run": len(trained),
            "first_loss": trained[0]["train_loss"] if trained else None,
            "final_loss": trained[-1]["train_loss"] if trained else None,
            "best_epoch": best.get("epoch"), "best_val_auroc": best.get("val_auroc"),
            "network_reused": reused, "train_seconds": round(time.perf_counter() - started, 2),
            "training_normals": len(images), "validation": {kind: int(sum(k == kind for k in validation.kinds))
                                                            for kind in ("normal", "painted", "real")}})
        if self.params.score == "ocsvm":
            codes = torch.cat([self._forward(data[i:i + 64])[1] for i in range(0, len(data), 64)])
            self.model.svm.fit(codes, float(self.params.nu)).to(self.device)
            self.fit_info["support_vectors"] = int(self.model.svm.support.shape[0])

    def _ssim_map(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) SSIM of the reconstruction, both un-normalised back to [0, 1] RGB."""
        mean = torch.tensor(self.settings.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.settings.std, device=images.device).view(1, -1, 1, 1)
        return ssim_map(recon * std + mean, images * std + mean, int(self.params.ssim_window), sigma=None,
                        padding="reflect")

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(error maps (B, S, S), codes (B, latent)) of a normalised batch, float32 on the CPU."""
        x = to_device_images(batch.float(), self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp, self.settings.cpu_amp):
            recon, code = self.model(x)
        if self.params.loss == "ssim":
            error = 1 - self._ssim_map(recon.float(), x.float()).mean(1)
        else:
            error = ((recon.float() - x.float()) ** 2).mean(1)
        return error.cpu(), code.float().cpu()

    def _score_views(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        views = range(8) if p.tta else range(1)
        scores, maps = [], []
        for k in views:
            error, code = self._forward(dihedral(batch, k))
            error = undo_dihedral(error, k)
            if p.score == "ocsvm":
                scores.append(self.model.svm(code.to(self.device)).float().cpu())
            elif p.score_reduction == "mean":
                scores.append(error.flatten(1).mean(1))
            else:
                scores.append(gaussian_blur_maps(error, float(p.blur_sigma)).flatten(1).max(1).values)
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
                maps[idx.numpy()] = gaussian_blur_maps(batch_maps, float(self.params.blur_sigma)).numpy()
        return scores, maps


register("autoencoder-recon", Autoencoder,
         "Convolutional autoencoder (Bergmann et al. CAE, L2) scored by its smoothed error map's max; "
         "flip/rot90 training")
register("autoencoder-ocsvm", Autoencoder,
         "One-class SVM (RBF) on the min-max-scaled codes of the same autoencoder", score="ocsvm")
register("autoencoder-recon-tta", Autoencoder,
         "autoencoder-recon with test-time averaging over the eight flips/rotations", tta=True)
register("autoencoder-ssim", Autoencoder,
         "SSIM autoencoder (Bergmann et al.): the same CAE trained with 1 - SSIM (11x11 window), scored by its "
         "smoothed 1 - SSIM map's max; flip/rot90 training", loss="ssim")
