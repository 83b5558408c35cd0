"""The zoo's frame: the image container and the sklearn-like face every anomaly model shares.

A zoo model reads like a scikit-learn outlier detector: ``fit(normal_images)``, then
``score_samples(images)`` (higher = more anomalous) and ``anomaly_maps(images)`` ((N, H, W) at
``settings.image_size``), plus ``save(path)`` / ``AnomalyModel.load(path)``. The pure torch part
(features in, scores and maps out) lives in an ``nn.Module`` of the model's own module; the
``AnomalyModel`` subclass holds the fitting code.

Adding a model (no shared file is edited):

1. Create ``competition/zoo/<family>.py`` with a subclass of ``AnomalyModel``: set ``family``
   (the registry prefix, e.g. ``"stfpm"``), ``DEFAULTS`` (every hyperparameter with its default;
   constructor keywords are checked against it and become attributes), and implement
   ``_fit(images, validation)``, ``_predict(images, with_maps)``, ``fitted_state()`` (tensors and
   plain values only, so checkpoints load with ``weights_only=True``) and
   ``load_fitted_state(state)``.
2. At module level, declare its ready-to-run configurations with
   ``competition.zoo.registry.register("stfpm-resnet18", StfpmModel, "one-line description",
   **hyperparameters)``; each name starts with the family. The registry discovers every module
   of this package, so ``python -m competition zoo --list`` shows it and ``--model NAME`` runs it.
   A config can override any hyperparameter with ``zoo.params: {NAME: {key: value}}``.
3. Backbone features come from ``competition.zoo.features.FeatureExtractor`` (one cached
   extractor for the whole zoo); images arrive as an ``ImageSet`` and are turned into resized,
   normalised tensors with ``images.loader(settings)``.
4. Models that train a network set ``uses_validation = True``: the runner then holds out a slice
   of the training normals and passes a ``ValidationSet`` (held-out normals, the same images with
   painted defects, and the real defects of the training folds) to ``fit``. Checkpoints such a
   model writes during training go to ``settings.run_dir`` (best.pt / last.pt, with resume).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from competition.artifacts import load_checkpoint, save_checkpoint

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------- settings shared by every model

@dataclass
class ZooSettings:
    """Run-wide settings every zoo model receives (hyperparameters live in the model's own DEFAULTS)."""

    image_size: int = 128  # square side the images are resized to; maps come back at this size
    batch_size: int = 32
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    seed: int = 0
    backbone_weights: bool | str = False  # false or local weights (file or folder) for backbones
    ssl_weights: str | None = None  # what `competition pretrain` writes; the -ssl entries' backbone (see ssl_entries)
    cache_dir: str | None = None  # on-disk feature cache root; None disables it
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_workers: int = 0  # DataLoader workers for decoding
    amp: bool = True  # mixed precision on CUDA
    channels_last: bool = True  # CUDA only
    progress: bool = True  # tqdm bars
    run_dir: str | None = None  # where a trained model keeps best.pt / last.pt; None = nowhere

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path | None = None, device: str | None = None) -> "ZooSettings":
        from competition.pretrain import backbone_name, pretrained_weights_path
        from competition.runtime import select_device

        cache = str(Path(cfg.paths.work) / "cache" / "features") if cfg.zoo.cache else None
        return cls(
            image_size=cfg.zoo.image_size, batch_size=cfg.zoo.batch_size,
            device=device or str(select_device(cfg.device)), seed=cfg.seed,
            backbone_weights=cfg.zoo.backbone_weights, cache_dir=cache,
            ssl_weights=str(pretrained_weights_path(cfg.paths.work, backbone_name(cfg))),
            mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std),
            num_workers=cfg.train.num_workers, amp=cfg.train.amp, channels_last=cfg.train.channels_last,
            run_dir=None if run_dir is None else str(run_dir))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


# ---------------------------------------------------------------- images

def file_digest(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 - deliberate process memo
    """sha1 of a file's bytes, remembered per (path, size, mtime) so each file is hashed once per process."""
    stat = os.stat(path)
    memo_key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    digest = _memo.get(memo_key)
    if digest is None:
        hasher = hashlib.sha1()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        digest = _memo[memo_key] = hasher.hexdigest()
    return digest


def array_digest(image: np.ndarray) -> str:
    hasher = hashlib.sha1(f"{image.shape}|{image.dtype}|".encode())
    hasher.update(np.ascontiguousarray(image).tobytes())
    return hasher.hexdigest()


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = image.shape[0] * image.shape[1] > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def unit_tensor(images: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (N, H, W, 3) uint8 -> channels-first float32 in [0, 1].

    Read-only arrays (memory-mapped or shared decodes) are copied: torch cannot own them safely.
    """
    if not images.flags.writeable:
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, normalised with `mean`/`std` (given on the 0..1 scale)."""
    x = unit_tensor(image)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


class ImageSet:
    """Images to fit or score: file paths or in-memory (H, W, 3) uint8 arrays, decoded lazily.

    Nothing is decoded until a model asks for it, so thousands of images cost a list of paths.
    `content_key(i)` identifies an image by its bytes (the feature cache's key); `loader()` gives
    resized, normalised batches `(indices, images)` for models.
    """

    def __init__(self, sources: Sequence[str | os.PathLike | np.ndarray], ids: Sequence[str] | None = None):
        self.sources = list(sources)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(self.sources))]
        if len(self.ids) != len(self.sources):
            raise ValueError(f"ImageSet: {len(self.ids)} ids for {len(self.sources)} images")
        self._keys: list[str | None] = [None] * len(self.sources)

    @classmethod
    def from_frame(cls, frame) -> "ImageSet":
        """From index/folds rows (`path`, `image_id` columns)."""
        return cls(list(frame["path"]), list(frame["image_id"]))

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images)"

    def read(self, i: int) -> np.ndarray:
        """Image `i` at its own size as (H, W, 3) uint8, through the project's one image loader."""
        source = self.sources[i]
        if isinstance(source, np.ndarray):
            if source.ndim == 2:
                source = np.repeat(source[:, :, None], 3, axis=2)
            if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
                raise ValueError(f"ImageSet: image {self.ids[i]} must be (H, W, 3) uint8, got "
                                 f"{source.shape} {source.dtype}")
            return source
        from competition.data.images import read_image

        return read_image(source)

    def content_key(self, i: int) -> str:
        key = self._keys[i]
        if key is None:
            source = self.sources[i]
            key = array_digest(source) if isinstance(source, np.ndarray) else file_digest(source)
            self._keys[i] = key
        return key

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        out = ImageSet([self.sources[i] for i in indices], [self.ids[i] for i in indices])
        out._keys = [self._keys[i] for i in indices]
        return out

    def __add__(self, other: "ImageSet") -> "ImageSet":
        out = ImageSet(self.sources + other.sources, self.ids + other.ids)
        out._keys = self._keys + other._keys
        return out

    def tensors(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                indices: Sequence[int] | None = None) -> "ImageTensors":
        return ImageTensors(self, image_size, mean, std, indices)

    def loader(self, settings: ZooSettings, indices: Sequence[int] | None = None,
               batch_size: int | None = None, shuffle: bool = False, drop_last: bool = False,
               generator: torch.Generator | None = None) -> DataLoader:
        """Batches of `(indices, images)`: images resized to `settings.image_size` and normalised."""
        view = self.tensors(settings.image_size, settings.mean, settings.std, indices)
        return DataLoader(view, batch_size=batch_size or settings.batch_size, shuffle=shuffle,
                          drop_last=drop_last, num_workers=settings.num_workers, generator=generator,
                          pin_memory=settings.device.startswith("cuda"))


class ImageTensors(Dataset):
    """Map-style dataset over an ImageSet: item -> (index in the set, normalised (3, S, S) tensor)."""

    def __init__(self, images: ImageSet, image_size: int, mean: Sequence[float], std: Sequence[float],
                 indices: Sequence[int] | None = None):
        self.images = images
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor]:
        i = self.indices[item]
        image = resize_image(self.images.read(i), self.image_size)
        return i, to_tensor(image, self.mean, self.std)


@dataclass
class ValidationSet:
    """Labelled images a trained model may watch during fitting (never the held-out fold).

    `kinds` says where each image comes from: "normal" (held-out training normals), "painted"
    (those normals with an artificial defect) or "real" (real defects of the training folds).
    `masks` holds (H, W) uint8 {0, 255} masks at the image's own size where known, else None.
    """

    images: ImageSet
    labels: np.ndarray
    kinds: list[str] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class AnomalyPrediction:
    scores: np.ndarray  # (N,) float, higher = more anomalous
    maps: np.ndarray | None  # (N, S, S) float32 at settings.image_size, or None when not asked for


# ---------------------------------------------------------------- the model face

MODEL_CLASSES: dict[str, type["AnomalyModel"]] = {}


class NotFittedError(RuntimeError):
    pass


class AnomalyModel:
    """Base of every zoo model: sklearn-like fit / score_samples / anomaly_maps, save / load."""

    family: ClassVar[str] = ""  # registry prefix; every registered name starts with it
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # every hyperparameter and its default
    uses_validation: ClassVar[bool] = False  # True: the runner passes a ValidationSet to fit
    has_maps: ClassVar[bool] = True  # False: anomaly_maps are the image score spread uniformly

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family:
            MODEL_CLASSES[cls.family] = cls

    def __init__(self, settings: ZooSettings | None = None, **params: Any):
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"{self.family}: unknown parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(self.DEFAULTS))}")
        self.settings = settings or ZooSettings()
        self.params = {**self.DEFAULTS, **params}
        for key, value in self.params.items():
            setattr(self, key, value)
        self.fitted_ = False
        self.fit_info: dict[str, Any] = {}  # figures a model reports about its fit (sizes, timings)

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def device(self) -> torch.device:
        return self.settings.torch_device

    # -- the public face
    def fit(self, images: ImageSet, validation: ValidationSet | None = None) -> "AnomalyModel":
        if len(images) == 0:
            raise ValueError(f"{self.family}: fit needs at least one normal image, got none")
        self._fit(images, validation)
        self.fitted_ = True
        return self

    def predict(self, images: ImageSet, with_maps: bool = True) -> AnomalyPrediction:
        """Scores (and maps when asked) in one pass over the images."""
        self._check_fitted()
        if len(images) == 0:
            size = self.settings.image_size
            return AnomalyPrediction(np.zeros(0), np.zeros((0, size, size), np.float32) if with_maps else None)
        scores, maps = self._predict(images, with_maps)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if with_maps:
            maps = np.asarray(maps, dtype=np.float32)
        return AnomalyPrediction(scores, maps if with_maps else None)

    def score_samples(self, images: ImageSet) -> np.ndarray:
        """(N,) anomaly scores; higher means more likely defective (sklearn's sign is the opposite)."""
        return self.predict(images, with_maps=False).scores

    def anomaly_maps(self, images: ImageSet) -> np.ndarray:
        """(N, S, S) float32 anomaly maps at `settings.image_size`."""
        return self.predict(images, with_maps=True).maps

    # -- what a subclass implements
    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        raise NotImplementedError

    def _predict(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def fitted_state(self) -> dict[str, Any]:
        """Everything `load_fitted_state` needs: tensors and plain Python values only."""
        raise NotImplementedError

    def load_fitted_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- persistence
    def save(self, path: str | Path) -> Path:
        self._check_fitted()
        return save_checkpoint({
            "format": CHECKPOINT_FORMAT, "family": self.family, "params": _plain(self.params),
            "settings": self.settings.to_dict(), "fit_info": _plain(self.fit_info),
            "state": self.fitted_state(),
        }, path)

    @classmethod
    def load(cls, path: str | Path, settings: ZooSettings | None = None) -> "AnomalyModel":
        """Rebuild a fitted model from `save`'s file (`weights_only=True`); `settings` replaces the saved ones."""
        checkpoint = load_checkpoint(path)
        family = checkpoint.get("family")
        model_cls = MODEL_CLASSES.get(family)
        if model_cls is None:
            from competition.zoo.registry import discover

            discover()
            model_cls = MODEL_CLASSES.get(family)
        if model_cls is None:
            raise ValueError(f"{path}: saved by model family {family!r}, which no zoo module defines; "
                             f"known: {', '.join(sorted(MODEL_CLASSES))}")
        if cls is not AnomalyModel and not issubclass(model_cls, cls):
            raise ValueError(f"{path} holds a {family} model, not a {cls.family or cls.__name__}")
        if settings is None:
            saved = dict(checkpoint["settings"])
            saved["mean"], saved["std"] = tuple(saved["mean"]), tuple(saved["std"])
            known = {f.name for f in dataclasses.fields(ZooSettings)}
            settings = ZooSettings(**{k: v for k, v in saved.items() if k in known})
        model = model_cls(settings, **checkpoint["params"])
        model.load_fitted_state(checkpoint["state"])
        model.fit_info = dict(checkpoint.get("fit_info", {}))
        model.fitted_ = True
        return model

    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise NotFittedError(f"{self.family}: call fit(normal_images) before scoring")


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python, so params survive `weights_only=True` loading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------- map helpers shared by models

def gaussian_blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (N, H, W) maps with a Gaussian of `sigma` pixels (PatchCore/PaDiM smooth their maps, sigma=4)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    pad = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    if pad < radius:  # image smaller than the kernel: crop the kernel to what reflect-padding allows
        kernel = kernel[radius - pad: radius + pad + 1]
        kernel = kernel / kernel.sum()
    out = torch.nn.functional.pad(out, (pad, pad, pad, pad), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1))
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]


def upsample_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, h, w) -> (N, size, size), bilinear."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0]
