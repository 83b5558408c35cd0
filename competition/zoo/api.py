"""The zoo's model API: run-wide settings, the image containers, and the sklearn-like face every
anomaly model shares (`fit`, `score_samples`, `anomaly_maps`, `save` / `load`).

A model is a wrapper (`PatchCore`) holding its pure torch module as `self.model` (`PatchCoreModel`),
whose buffers and parameters are the whole fitted state, and a typed dataclass of hyperparameters
as `self.params` (`PatchCoreParams`). How to add one: the package docstring (`competition/zoo/__init__.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from competition.artifacts import file_digest, load_checkpoint, pretrained_weights_path, save_checkpoint
from competition.config import type_name
from competition.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Geometry,
    canvas_to_image,
    fit_to_canvas,
    image_tiles,
    reduce_tile_scores,
    scale_for_tiles,
    scaled_shape,
    stitch_maps,
    tile_boxes,
)
from competition.runtime import to_device_images

DRAW_SEED_STRIDE = 7919  # BackboneParams.draw k: seed + k * stride (a prime, far from the small seeds users pick)
CHECKPOINT_FORMAT = 2  # 2: the state is `self.model.state_dict()`
SSL_WEIGHTS = "ssl"  # the backbone_weights tag of the experiment's own `competition pretrain` output


# ---------------------------------------------------------------- settings shared by every model

@dataclass
class ZooSettings:
    """Run-wide settings every zoo model receives (hyperparameters live in the model's own params dataclass)."""

    image_size: int = 128  # side of the square model input (canvas); maps come back at this size
    # input geometry (competition.preprocess.Geometry): square stretch or aspect-keeping letterbox, and
    # optionally overlapping tiles (each fitted to the canvas; image score = tile_reduce of tile scores)
    resize: str = "square"
    tiles: bool = False
    tile_size: int = 160
    tile_overlap: float = 0.25
    tile_scale: float = 1.0
    tile_reduce: str = "max"
    tile_topk: int = 3
    batch_size: int = 32
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    seed: int = 0
    backbone_weights: bool | str = False  # false or local weights (file or folder) for backbones
    # random-init backbones: healthy (live residual branches, BatchNorm statistics of the fit images) | timm
    backbone_init: str = "timm"
    backbone_padding: str = "zeros"  # convolution padding of the backbones: zeros | reflect
    work_dir: str | None = None  # <paths.work>: backbone_weights "ssl" reads <work_dir>/pretrain/<backbone>.safetensors
    cache_dir: str | None = None  # on-disk feature cache root; None disables it
    cache_max_gb: float = 4.0  # the cache's size limit: least recently used backbone folders go; 0 = none
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_workers: int = 0  # DataLoader workers for decoding
    amp: bool = True  # mixed precision on CUDA
    cpu_amp: str = "off"  # bfloat16 autocast on the CPU: off | bf16 | auto (runtime.cpu_bf16)
    channels_last: bool = True  # NHWC tensors, on CUDA and CPU
    progress: bool = True  # tqdm bars
    run_dir: str | None = None  # where a trained model keeps best.pt / last.pt; None = nowhere
    # the layers the run's zoo reads from each backbone network, "backbone@seed" -> layers (`run_shared_layers`):
    # a shared extractor computes and caches their union, so the models over one network share one cache
    # entry and a network read at layer1 alone stops there; empty (a model built outside a run):
    # features.SHARED_LAYERS
    shared_layers: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path | None = None, device: str | None = None) -> ZooSettings:
        """From the `zoo` section, `seed`, `device` and `paths` (never the classifier's keys)."""
        from competition.runtime import select_device

        cache = str(Path(cfg.paths.work) / "cache" / "features") if cfg.zoo.cache else None
        return cls(
            image_size=cfg.zoo.image_size, batch_size=cfg.zoo.batch_size, resize=cfg.zoo.resize,
            tiles=cfg.zoo.tiles.enabled, tile_size=cfg.zoo.tiles.size, tile_overlap=cfg.zoo.tiles.overlap,
            tile_scale=cfg.zoo.tiles.scale, tile_reduce=cfg.zoo.tiles.reduce, tile_topk=cfg.zoo.tiles.topk,
            device=device or str(select_device(cfg.device)), seed=cfg.seed,
            backbone_weights=cfg.zoo.backbone_weights, backbone_init=cfg.zoo.backbone_init,
            backbone_padding=cfg.zoo.backbone_padding,
            work_dir=str(cfg.paths.work), cache_dir=cache, cache_max_gb=cfg.zoo.cache_max_gb,
            mean=tuple(cfg.zoo.mean), std=tuple(cfg.zoo.std), num_workers=cfg.zoo.num_workers,
            amp=cfg.zoo.amp, cpu_amp=cfg.zoo.cpu_amp, channels_last=cfg.zoo.channels_last,
            run_dir=None if run_dir is None else str(run_dir))

    def precision(self) -> dict[str, Any]:
        """The engine's precision keys (`EngineConfig(..., **settings.precision())`): amp on CUDA, cpu_amp on CPU."""
        return {"amp": self.amp, "cpu_amp": self.cpu_amp}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ZooSettings:
        """From `to_dict`'s output; keys this version does not know are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        values["mean"], values["std"] = tuple(values.get("mean", IMAGENET_MEAN)), tuple(values.get("std", IMAGENET_STD))
        return cls(**values)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def geometry(self) -> Geometry:
        return Geometry(image_size=self.image_size, resize=self.resize, tiles=self.tiles, tile_size=self.tile_size,
                        tile_overlap=self.tile_overlap, tile_scale=self.tile_scale, tile_reduce=self.tile_reduce,
                        tile_topk=self.tile_topk)


# ---------------------------------------------------------------- images

def array_digest(image: np.ndarray) -> str:
    hasher = hashlib.sha1(f"{image.shape}|{image.dtype}|".encode())
    hasher.update(np.ascontiguousarray(image).tobytes())
    return hasher.hexdigest()


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


@dataclass(eq=False)
class TileSource:
    """One tile as an image source: its image's source and content key, and its box (top, left, bottom,
    right) in that image scaled by `scale` (`competition.preprocess.tile_boxes`)."""

    source: str | os.PathLike | np.ndarray
    image_key: str
    box: tuple[int, int, int, int]
    scale: float


class ImageSet:
    """Images to fit or score: file paths, in-memory (H, W, 3) uint8 arrays or tiles of either, decoded lazily.

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
    def from_frame(cls, frame) -> ImageSet:
        """From index/folds rows (`path`, `image_id` columns)."""
        return cls(list(frame["path"]), list(frame["image_id"]))

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images)"

    def read(self, i: int) -> np.ndarray:
        """Image `i` at its own size as (H, W, 3) uint8, through the project's one image loader."""
        source = self.sources[i]
        if isinstance(source, TileSource):
            # An image's tiles come one after another: keep its last scaled decode for the next tile.
            memo = getattr(self, "_scaled_memo", None)
            if memo is None or memo[0] is not source.source or memo[1] != source.scale:
                whole = self._decode(source.source, self.ids[i])
                scaled = scale_for_tiles(whole, Geometry(tile_scale=source.scale))
                memo = self._scaled_memo = (source.source, source.scale, scaled)
            top, left, bottom, right = source.box
            return memo[2][top:bottom, left:right]
        return self._decode(source, self.ids[i])

    @staticmethod
    def _decode(source: str | os.PathLike | np.ndarray, image_id: str) -> np.ndarray:
        if isinstance(source, np.ndarray):
            if source.ndim == 2:
                source = np.repeat(source[:, :, None], 3, axis=2)
            if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
                raise ValueError(f"ImageSet: image {image_id} must be (H, W, 3) uint8, got "
                                 f"{source.shape} {source.dtype}")
            return source
        from competition.data.images import read_image

        return read_image(source)

    def content_key(self, i: int) -> str:
        key = self._keys[i]
        if key is None:
            source = self.sources[i]
            if isinstance(source, TileSource):
                key = hashlib.sha1(f"{source.image_key}|tile {source.box}|scale {source.scale}".encode()).hexdigest()
            elif isinstance(source, np.ndarray):
                key = array_digest(source)
            else:
                key = file_digest(source)
            self._keys[i] = key
        return key

    def subset(self, indices: Sequence[int]) -> ImageSet:
        out = ImageSet([self.sources[i] for i in indices], [self.ids[i] for i in indices])
        out._keys = [self._keys[i] for i in indices]
        return out

    def __add__(self, other: ImageSet) -> ImageSet:
        out = ImageSet(self.sources + other.sources, self.ids + other.ids)
        out._keys = self._keys + other._keys
        return out

    def shape(self, i: int) -> tuple[int, int]:
        """(height, width) of image `i`, from the file header when it is a file."""
        source = self.sources[i]
        if isinstance(source, TileSource):
            top, left, bottom, right = source.box
            return bottom - top, right - left
        if isinstance(source, np.ndarray):
            return source.shape[0], source.shape[1]
        from competition.data.images import image_size

        return image_size(source)

    def tiles(self, geometry: Geometry) -> tuple[ImageSet, np.ndarray, list[np.ndarray]]:
        """Every image's tiles as an ImageSet of their own (ids `<id>@<top>_<left>`), the index of each
        tile's image, and each image's boxes (`competition.preprocess.tile_boxes`)."""
        sources, ids, owners, all_boxes = [], [], [], []
        for i in range(len(self)):
            boxes = tile_boxes(*self.shape(i), geometry)
            all_boxes.append(boxes)
            for box in boxes:
                box = tuple(int(v) for v in box)
                sources.append(TileSource(self.sources[i], self.content_key(i), box, geometry.tile_scale))
                ids.append(f"{self.ids[i]}@{box[0]}_{box[1]}")
                owners.append(i)
        return ImageSet(sources, ids), np.asarray(owners, dtype=int), all_boxes

    def tensors(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                indices: Sequence[int] | None = None, resize: str = "square") -> ImageTensors:
        return ImageTensors(self, image_size, mean, std, indices, resize)

    def loader(self, settings: ZooSettings, indices: Sequence[int] | None = None,
               batch_size: int | None = None, shuffle: bool = False, drop_last: bool = False,
               generator: torch.Generator | None = None) -> DataLoader:
        """Batches of `(indices, images)`: images fitted to the `settings.image_size` canvas (square or
        letterbox, `settings.resize`) and normalised."""
        view = self.tensors(settings.image_size, settings.mean, settings.std, indices, settings.resize)
        return DataLoader(view, batch_size=batch_size or settings.batch_size, shuffle=shuffle,
                          drop_last=drop_last, num_workers=settings.num_workers, generator=generator,
                          pin_memory=settings.device.startswith("cuda"))


class ImageTensors(Dataset):
    """Map-style dataset over an ImageSet: item -> (index in the set, normalised (3, S, S) tensor)."""

    def __init__(self, images: ImageSet, image_size: int, mean: Sequence[float], std: Sequence[float],
                 indices: Sequence[int] | None = None, resize: str = "square"):
        self.images = images
        self.image_size = int(image_size)
        self.geometry = Geometry(image_size=self.image_size, resize=resize)
        self.mean, self.std = tuple(mean), tuple(std)
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor]:
        i = self.indices[item]
        image, _ = fit_to_canvas(self.images.read(i), self.geometry)
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

    def tiles(self, geometry: Geometry) -> ValidationSet:
        """The tiles of every image; a defect image's tile is a defect where its mask marks a pixel in it
        (kind "normal" otherwise), and every tile of a defect without a mask counts as a defect."""
        tiles, owners, _ = self.images.tiles(geometry)
        labels, kinds, masks = [], [], []
        mask_tiles: dict[int, list[np.ndarray]] = {}
        first_tile = {int(owner): int(np.argmax(owners == owner)) for owner in np.unique(owners)}
        for t, owner in enumerate(owners):
            owner = int(owner)
            mask = self.masks[owner] if owner < len(self.masks) else None
            if int(self.labels[owner]) == 0 or mask is None:
                labels.append(int(self.labels[owner]))
                kinds.append(self.kinds[owner] if owner < len(self.kinds) else "normal")
                masks.append(None)
                continue
            if owner not in mask_tiles:
                mask_tiles[owner] = image_tiles(mask, geometry, nearest=True)[0]
            tile_mask = mask_tiles[owner][t - first_tile[owner]]
            defect = bool((tile_mask > 0).any())
            labels.append(int(defect))
            kinds.append(self.kinds[owner] if defect else "normal")
            masks.append(tile_mask)
        return ValidationSet(tiles, np.asarray(labels, dtype=self.labels.dtype), kinds, masks)


@dataclass
class DefectSet:
    """Labelled real defects a supervised model trains on (`AnomalyModel.uses_defects`): the training
    folds' defect images, never the held-out fold's, with (H, W) uint8 {0, 255} masks at the image's own
    size where known, else None (the image-level label alone)."""

    images: ImageSet
    masks: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.masks:
            self.masks = [None] * len(self.images)
        if len(self.masks) != len(self.images):
            raise ValueError(f"DefectSet: {len(self.masks)} masks for {len(self.images)} images (None where unknown)")

    def __len__(self) -> int:
        return len(self.images)

    def tiles(self, geometry: Geometry) -> DefectSet:
        """The tiles holding a marked defect pixel, each with its tile of the mask. The tiles of a defect
        without a mask are left out: nothing says which of them shows the defect."""
        tiles, owners, _ = self.images.tiles(geometry)
        keep, masks = [], []
        mask_tiles: dict[int, list[np.ndarray]] = {}
        first_tile = {int(owner): int(np.argmax(owners == owner)) for owner in np.unique(owners)}
        for t, owner in enumerate(owners):
            owner = int(owner)
            if self.masks[owner] is None:
                continue
            if owner not in mask_tiles:
                mask_tiles[owner] = image_tiles(self.masks[owner], geometry, nearest=True)[0]
            tile_mask = mask_tiles[owner][t - first_tile[owner]]
            if (tile_mask > 0).any():
                keep.append(t)
                masks.append(tile_mask)
        return DefectSet(tiles.subset(keep), masks)


@dataclass
class AnomalyPrediction:
    scores: np.ndarray  # (N,) float, higher = more anomalous
    maps: np.ndarray | None  # (N, S, S) float32 at settings.image_size, or None when not asked for


# ---------------------------------------------------------------- hyperparameters

@dataclass
class NoParams:
    """A model without hyperparameters."""


@dataclass
class BackboneParams:
    """The hyperparameters of every model over a timm backbone; a model's params dataclass extends it."""

    backbone: str = "resnet18"
    # None: zoo.backbone_weights; "ssl": the experiment's pretraining output (make pretrain),
    # <paths.work>/pretrain/<backbone>.safetensors; else a local weights file or folder, as zoo.backbone_weights takes
    backbone_weights: str | None = None
    # which random draw of the model: draw k > 0 seeds everything the model draws (a random backbone, a channel
    # subset, an initialisation) with zoo seed + k * DRAW_SEED_STRIDE, so entries that differ only in `draw` are
    # independent random feature extractors on the same folds (members to average); 0 keeps the zoo seed
    draw: int = 0
    # 0: `draw` is the draw. N > 0: each fold ranks the random draws 0..N-1 on its training images and `draw` k is
    # the (k+1)-th best of them (`competition.zoo.draws`): NAME, NAME@1, NAME@2 stand on the three best networks
    screen_draws: int = 0


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (YAML lists become tuples where a tuple is declared); TypeError if it is not one."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = get_args(tp)[0] if get_args(tp) else Any
            items = [_coerce(v, item) for v in value]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"expected {type_name(tp)}, got {value!r}")


def build_params(params_class: type, values: dict[str, Any], where: str, noun: str = "parameter(s)") -> Any:
    """`params_class(**values)` with every key and type checked; errors start with `where`."""
    known = [f.name for f in dataclasses.fields(params_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown {noun} {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = get_type_hints(params_class)
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _coerce(value, hints[key])
        except TypeError as exc:
            raise ValueError(f"{where}.{key}: {exc}") from None
    return params_class(**checked)


def resolve_backbone_weights(tag: str, backbone: str, settings: ZooSettings, family: str) -> str:
    """A backbone_weights parameter -> the weights file or folder to load; "ssl" is found by convention."""
    if tag != SSL_WEIGHTS:
        return tag
    if not settings.work_dir:
        raise ValueError(f"{family}: backbone_weights 'ssl' needs ZooSettings.work_dir; build the model from a "
                         "config (ZooSettings.from_config) so it finds <paths.work>/pretrain/<backbone>.safetensors")
    path = pretrained_weights_path(settings.work_dir, backbone)
    if not path.is_file():
        raise FileNotFoundError(
            f"{family}: no self-supervised weights for {backbone} at {path}; run `make pretrain` first "
            f"(python -m competition pretrain --set pretrain.backbone={backbone} with this experiment's config)")
    return str(path)


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python, so params survive `weights_only=True` loading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_fitted_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)`, first giving the buffers registered empty (their shape is known
    only after fitting, e.g. a memory bank) the saved shape."""
    for key, value in state.items():
        owner_name, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        buffer = owner._buffers.get(name)
        if buffer is not None and buffer.numel() == 0 and buffer.shape != value.shape:
            owner._buffers[name] = torch.empty(value.shape, dtype=buffer.dtype, device=buffer.device)
    module.load_state_dict(state)


# ---------------------------------------------------------------- the model face

class NotFittedError(RuntimeError):
    pass


class AnomalyModel:
    """Base of every zoo model: sklearn-like fit / score_samples / anomaly_maps, save / load."""

    family: ClassVar[str] = ""  # registry prefix; every registered name starts with it
    params_class: ClassVar[type] = NoParams  # the model's hyperparameters, a dataclass
    uses_validation: ClassVar[bool] = False  # True: the runner passes a ValidationSet to fit
    # True (or a property true for some params): fit also takes the training folds' real defects (a DefectSet)
    uses_defects: ClassVar[bool] = False
    has_maps: ClassVar[bool] = True  # False: anomaly_maps are the image score spread uniformly
    # why `scoring_module` is None, for the export record; models with a scoring module never read it
    export_unsupported: ClassVar[str] = "its scoring is not written as one torch module"
    # params that change only how a fitted model scores, never what it fits (PaDiM's score_background): an entry
    # that differs from another only in these takes that entry's fitted fold (`adopt_fit`, zoo.runner.fitted_twin)
    scoring_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ZooSettings | None = None, **params: Any):
        self.settings = settings or ZooSettings()
        self.given_settings = self.settings  # what `save` keeps: the draw's seed shift is applied again on load
        self.params = build_params(self.params_class, params, self.family or type(self).__name__)
        if isinstance(self.params, BackboneParams) and self.params.draw:
            if self.params.draw < 0:
                raise ValueError(f"{self.family}: draw must be 0 or more, got {self.params.draw}")
            self.settings = dataclasses.replace(self.settings,
                                                seed=self.settings.seed + DRAW_SEED_STRIDE * self.params.draw)
        if isinstance(self.params, BackboneParams) and self.params.backbone_weights is not None:
            weights = resolve_backbone_weights(self.params.backbone_weights, self.params.backbone, self.settings,
                                               self.family)
            self.settings = dataclasses.replace(self.settings, backbone_weights=weights)
        self.model: nn.Module | None = None  # the pure torch module; its state_dict is the fitted model
        self.fitted_ = False
        self._batchnorm_set: ImageSet | None = None  # fit's batchnorm_images (tiled like the fit images), during fit
        self.fit_info: dict[str, Any] = {}  # figures a model reports about its fit (sizes, timings)
        # an exported scoring module run by a graph runtime ((B, 3, S, S) in [0, 1] -> (scores, maps));
        # when set, predict runs it instead of `_predict` (`competition.export.zoo_with_runtime` sets it)
        self.scoring_graph: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def extractor_layers(cls, params: Any) -> tuple[int, ...]:
        """The layers of `params.backbone` this model reads through `features.shared_extractor` (none by
        default): the run's zoo widens each network's extraction to the union of its readers' layers."""
        return ()

    @classmethod
    def extractor_draws(cls, params: Any) -> int:
        """How many random networks of `params.backbone` the model reads through the shared extractor, its own
        draw and the next ones (draw + 1, ...): one unless a model reads several side by side."""
        return 1

    def get_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    @property
    def device(self) -> torch.device:
        return self.settings.torch_device

    # -- the public face
    def fit(self, images: ImageSet, validation: ValidationSet | None = None,
            defects: DefectSet | None = None, batchnorm_images: ImageSet | None = None) -> AnomalyModel:
        """Fit on the normal `images`; `validation` to watch (trained models); `defects`, labelled real defects
        to train on, only for a model that `uses_defects` (its `_fit` then takes them as a third argument);
        `batchnorm_images`, where a healthy random backbone estimates its BatchNorm statistics instead of the fit
        images (`zoo.batchnorm_images: test`: the unlabeled test images, the same for every fold)."""
        if len(images) == 0:
            raise ValueError(f"{self.family}: fit needs at least one normal image, got none")
        if defects is not None and not self.uses_defects:
            raise ValueError(f"{self.family}: fit got {len(defects)} labelled defects, but this model trains on "
                             "normal images only; use a supervised entry (e.g. supersimplenet-supervised)")
        geometry = self.settings.geometry
        if geometry.tiles:  # the model sees tiles only: it fits on every tile of the normal images
            images = images.tiles(geometry)[0]
            validation = None if validation is None else validation.tiles(geometry)
            defects = None if defects is None else defects.tiles(geometry)
            batchnorm_images = None if batchnorm_images is None else batchnorm_images.tiles(geometry)[0]
        self._batchnorm_set = batchnorm_images if batchnorm_images is not None and len(batchnorm_images) else None
        try:
            if defects is None:
                self._fit(images, validation)
            else:
                self._fit(images, validation, defects)
        finally:
            self._batchnorm_set = None  # used while fitting only: a fitted model keeps the statistics, not the images
        self.fitted_ = True
        return self

    def batchnorm_images(self, fit_images: ImageSet) -> ImageSet:
        """The images a healthy random backbone estimates its BatchNorm statistics on while fitting: `fit`'s
        `batchnorm_images` when it got some, else the fit images themselves."""
        return fit_images if self._batchnorm_set is None else self._batchnorm_set

    def predict(self, images: ImageSet, with_maps: bool = True) -> AnomalyPrediction:
        """Scores (and maps when asked) in one pass over the images."""
        self._check_fitted()
        if len(images) == 0:
            size = self.settings.image_size
            return AnomalyPrediction(np.zeros(0), np.zeros((0, size, size), np.float32) if with_maps else None)
        if self.settings.geometry.tiles:
            scores, maps = self._predict_tiled(images, with_maps)
        else:
            scores, maps = self._score(images, with_maps)
            if with_maps and self.settings.resize != "square":
                maps = np.asarray(maps, dtype=np.float32).copy()
                for i in range(len(images)):  # padding never looks anomalous in a map
                    _, valid = fit_to_canvas(np.zeros(images.shape(i), np.uint8), self.settings.geometry)
                    maps[i][~valid] = maps[i][valid].min()
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if with_maps:
            maps = np.asarray(maps, dtype=np.float32)
        return AnomalyPrediction(scores, maps if with_maps else None)

    def _predict_tiled(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Every tile scored; an image's score reduces its tiles' scores, its map stitches their maps (max
        where tiles overlap, padding cut away) and is fitted to the canvas like a whole image."""
        geometry = self.settings.geometry
        tiles, owners, boxes = images.tiles(geometry)
        tile_scores, tile_maps = self._score(tiles, with_maps)
        tile_scores = np.asarray(tile_scores, dtype=np.float64).reshape(-1)
        scores = np.array([reduce_tile_scores(tile_scores[owners == i], geometry) for i in range(len(images))])
        if not with_maps:
            return scores, None
        whole = dataclasses.replace(geometry, tiles=False)
        maps = np.empty((len(images), geometry.image_size, geometry.image_size), np.float32)
        for i in range(len(images)):
            own = np.flatnonzero(owners == i)
            pieces = [canvas_to_image(tile_maps[t], bottom - top, right - left, geometry)
                      for t, (top, left, bottom, right) in zip(own, boxes[i])]
            stitched = stitch_maps(pieces, boxes[i], scaled_shape(*images.shape(i), geometry))
            canvas, valid = fit_to_canvas(stitched, whole)
            maps[i] = np.where(valid, canvas, canvas[valid].min())  # padding never looks anomalous
        return scores, maps

    def _score(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self.scoring_graph is None:
            return self._predict(images, with_maps)
        return self.predict_with(self.scoring_graph, images, with_maps)

    @torch.inference_mode()
    def predict_with(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], images: ImageSet,
                     with_maps: bool) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of whole canvases through `forward` ((B, 3, S, S) in [0, 1] -> (scores (B,), maps
        (B, S, S)), the scoring module or its exported graph), batch by batch, in image order."""
        view = images.tensors(self.settings.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                              resize=self.settings.resize)
        loader = DataLoader(view, batch_size=self.settings.batch_size, num_workers=self.settings.num_workers)
        scores, maps = [], []
        for _, batch in loader:
            if isinstance(forward, nn.Module):  # the layout eager scoring uses: the same sums, bit for bit
                batch = to_device_images(batch, self.device, self.settings.channels_last)
            batch_scores, batch_maps = forward(batch)
            scores.append(batch_scores.float().cpu().numpy())
            if with_maps:
                maps.append(batch_maps.float().cpu().numpy())
        return np.concatenate(scores), (np.concatenate(maps) if with_maps else None)

    def scoring_module(self) -> nn.Module | None:
        """The fitted scoring as one pure module, on the model's device, in eval mode: (B, 3, S, S) images in
        [0, 1] -> (scores (B,), maps (B, S, S)), the normalisation, backbone and fitted buffers inside; what
        `competition.export` turns into a graph. None where the scoring is no tensor program (sklearn parts,
        Python control flow over data): `export_unsupported` says why."""
        return None

    def score_samples(self, images: ImageSet) -> np.ndarray:
        """(N,) anomaly scores; higher means more likely defective (sklearn's sign is the opposite)."""
        return self.predict(images, with_maps=False).scores

    def anomaly_maps(self, images: ImageSet) -> np.ndarray:
        """(N, S, S) float32 anomaly maps at `settings.image_size`."""
        return self.predict(images, with_maps=True).maps

    # -- what a subclass implements
    def build_model(self) -> nn.Module:
        """The torch module from the hyperparameters and settings, on the CPU; fitted buffers still empty."""
        raise NotImplementedError

    def _fit(self, images: ImageSet, validation: ValidationSet | None) -> None:
        """Set `self.model` to the fitted module (a model that `uses_defects` also takes `defects`, a DefectSet)."""
        raise NotImplementedError

    def _predict(self, images: ImageSet, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    # -- persistence
    def save(self, path: str | Path) -> Path:
        self._check_fitted()
        return save_checkpoint({
            "format": CHECKPOINT_FORMAT, "family": self.family, "params": _plain(self.get_params()),
            "settings": self.given_settings.to_dict(), "fit_info": _plain(self.fit_info),
            "state": {key: value.detach().cpu() for key, value in self.model.state_dict().items()},
        }, path)

    def adopt_fit(self, path: str | Path) -> None:
        """Take the fitted module that `save` wrote to `path` for a model whose fit is this one's, the same family
        and params but for `scoring_params`, instead of fitting again; any other difference is refused. The caller
        vouches for the rest of the fit's inputs (the zoo runner compares the folds' records)."""
        checkpoint = self._checked(load_checkpoint(path), path)
        ours, theirs = _plain(self.get_params()), checkpoint["params"]
        differing = sorted(k for k in set(ours) | set(theirs)
                           if ours.get(k) != theirs.get(k) and k not in self.scoring_params)
        if differing:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differing)
            raise ValueError(f"{path} was fitted with other params ({shown}); a {self.family} fit is shared only "
                             f"by params that differ in {list(self.scoring_params) or 'nothing'}")
        self._restore(checkpoint)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Build the module and load the fitted state of a checked `save` checkpoint into it."""
        self.model = self.build_model()
        load_fitted_state(self.model, checkpoint["state"])
        self.model.to(self.device).eval()
        self.fit_info = dict(checkpoint.get("fit_info", {}))
        self.fitted_ = True

    @classmethod
    def load(cls, path: str | Path, settings: ZooSettings | None = None) -> AnomalyModel:
        """Rebuild a fitted model of this class from `save`'s file (`weights_only=True`); `settings` replaces the
        saved ones. `competition.zoo.registry.load_model` finds the class from the file."""
        return cls.from_checkpoint(load_checkpoint(path), path, settings)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str | Path,
                        settings: ZooSettings | None = None) -> AnomalyModel:
        checkpoint = cls._checked(checkpoint, path)
        settings = settings or ZooSettings.from_dict(checkpoint["settings"])
        model = cls(settings, **checkpoint["params"])
        model._restore(checkpoint)
        return model

    @classmethod
    def _checked(cls, checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
        """`checkpoint`, once it is known to be a fit of this class's family in this version's format."""
        if not cls.family:
            raise TypeError(f"{path}: load it with its model's class (e.g. PatchCore.load), or let "
                            "competition.zoo.registry.load_model find the class from the file")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: a zoo checkpoint of format {checkpoint.get('format')!r}, this version reads "
                             f"format {CHECKPOINT_FORMAT}; refit the model (zoo --force)")
        if checkpoint.get("family") != cls.family:
            raise ValueError(f"{path} holds a {checkpoint.get('family')} model, not a {cls.family or cls.__name__}")
        return checkpoint

    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise NotFittedError(f"{self.family}: call fit(normal_images) before scoring")
