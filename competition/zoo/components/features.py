"""The zoo's one feature extractor: a timm backbone with `features_only`, and an on-disk cache.

`FeatureExtractor(backbone, layers, settings)` builds `timm.create_model(backbone,
features_only=True, out_indices=layers)` (for resnets index 1..4 = layer1..layer4, 0 = the stem),
loads local weights with `competition.weights.load_local_weights(model, settings.backbone_weights,
backbone)` (false or a path, never the network; with false the random initialisation is seeded by
`settings.seed`, so it is reproducible) and runs it in eval mode without gradients.

Cache. `extract(images)` stores each image's feature maps as float16 in
`<settings.cache_dir>/<backbone>-<key>/<aa>/<content hash>.safetensors`, where
- `<key>` hashes the backbone name, the layers, the weights (sha1 of the weights file, or
  "random init, seed N" with the timm and torch versions), the image size, the resize rule and
  the normalisation; `extractor.json` in that folder spells it out;
- `<content hash>` is the sha1 of the image file's bytes (of the array's bytes for in-memory images),
  so a renamed copy hits and an edited file misses.
Every model over the same backbone and image size therefore extracts each image once across
models and folds. The key includes the layer tuple, so models build their extractor with
`shared_extractor(backbone, layers, settings)`: it extracts the union of the layers that the run's
models read from that network (`settings.shared_layers`, filled by `registry.build_from_config` from
`zoo.models`; outside a run the superset in `SHARED_LAYERS`, resnet18: layer1..layer4, ~240 KB per
128-px image in float16) and each model picks its own layers from it (`extractor.select(maps, layers)`);
PatchCore, PaDiM, DFM and DFKDE over one resnet18 thus share one cache. Features are always rounded
through float16, cached or not, so results never depend on the cache.

Size limit (`settings.cache_max_gb`). Each extraction that wrote features then deletes the least
recently used `<backbone>-<key>` folders (use = `extractor.json`'s mtime, touched by every
extraction) until the cache fits the limit again; the folder in use is never deleted. A healthy random
backbone has a key per fold (its BatchNorm statistics), so without a limit every fold would cache
every image again: about 2 GB per PaDiM run at 256 px on bsdata_tiles. Features a reader finds gone
(deleted by another process's pruning) are extracted again.

Random init (`settings.backbone_init`). timm zero-initialises the last BatchNorm of every residual
branch (`zero_init_last`, Goyal et al. 2017, a training aid): untrained, every block is then the
identity and all layers repeat the stem. "healthy" (the default) builds frozen random backbones with
live branches and re-estimates every BatchNorm's running statistics on the fit images
(`calibrate(images)`, a train-mode pass with a cumulative average, as `torch.optim.swa_utils.update_bn`);
a model keeps them (`statistics`) and restores them before scoring (`load_statistics`). Their sha1
is part of the cache key. "timm" keeps timm's initialisation and statistics. Loaded weights are never
touched.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from competition.artifacts import atomic_path, file_digest, write_text
from competition.runtime import autocast, cpu_bf16, to_device_images
from competition.zoo.api import ImageSet, ZooSettings, unit_tensor
from competition.zoo.components.frozen import freeze
from competition.zoo.components.normalise import ImageNormalise

RESIZE_RULE = "cv2 area-down/bilinear-up square"
# The layers extracted (and cached) for a backbone whatever subset a model uses, so that the
# feature-memory models over one backbone share their cache. Backbones not listed extract exactly
# the layers a model asks for.
SHARED_LAYERS: dict[str, tuple[int, ...]] = {
    "resnet18": (1, 2, 3, 4),
    "resnet34": (1, 2, 3, 4),
    "resnet50": (1, 2, 3),
    "wide_resnet50_2": (1, 2, 3),
}
BACKBONE_INITS = ("healthy", "timm")
BACKBONE_PADDINGS = ("zeros", "reflect")
# BatchNorm statistics estimated in train mode depend on how images are batched: a fixed batch, so that
# zoo.batch_size (a speed setting) never changes the features.
CALIBRATION_BATCH_SIZE = 32
_BACKBONES: dict[tuple, nn.Module] = {}


def create_backbone(name: str, layers: Sequence[int], weights: bool | str, seed: int,
                    frozen: bool = True, init: str = "timm", padding: str = "zeros") -> nn.Module:
    """timm `features_only` backbone returning the maps of `layers`, with local weights or a seeded init.

    init "healthy" applies to a frozen backbone without weights: residual branches built live
    (`zero_init_last=False` where the family has it) and `needs_calibration` set, so that its
    BatchNorm statistics are estimated on images (`calibrate_backbones`) before it is used. A trained
    network (a student) keeps timm's initialisation, the one its training recipe expects.
    """
    import timm

    from competition.weights import load_local_weights, resolve_weights_path

    if init not in BACKBONE_INITS:
        raise ValueError(f"zoo.backbone_init must be one of {', '.join(BACKBONE_INITS)}, got {init!r}")
    if padding not in BACKBONE_PADDINGS:
        raise ValueError(f"zoo.backbone_padding must be one of {', '.join(BACKBONE_PADDINGS)}, got {padding!r}")
    healthy = init == "healthy" and frozen and resolve_weights_path(weights, name, "zoo.backbone_weights") is None
    options = {"zero_init_last": False} if healthy else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            try:
                model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers),
                                          **options)
            except TypeError as exc:  # a family without zero-initialised branches (efficientnet, convnext, ...)
                if "zero_init_last" not in str(exc):
                    raise
                torch.manual_seed(seed)
                model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"zoo backbone {name!r} with layers {list(layers)}: {exc}") from exc
    load_local_weights(model, weights, name, "zoo.backbone_weights")
    set_conv_padding(model, padding)
    model.needs_calibration = healthy and any(isinstance(m, _BatchNorm) for m in model.modules())
    return freeze(model) if frozen else model


def set_conv_padding(model: nn.Module, padding: str) -> None:
    """Every padded convolution of `model` pads with `padding` ("zeros" or "reflect"); the weights are untouched.

    Why reflect: zero padding frames the image in black, so the features of a border cell differ from the
    interior's for every image, and a random network's border cells carry that frame more than the image. With
    reflection a border cell sees mirrored texture: on bsdata_tiles, half of whose smallest missed defects are specks
    on a tile edge, the defect probe's test AUROC rose 0.950 -> 0.956 and 0.937 -> 0.944 on its two fold sets, while
    the stack's Private moved by a few images either way (README, "Reflect padding")."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and any(int(p) > 0 for p in module.padding):
            module.padding_mode = padding


# ---------------------------------------------------------------- BatchNorm statistics of random backbones

def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Every BatchNorm's running mean and variance re-estimated from `batches` (model inputs).

    Statistics are reset, then accumulated as a cumulative average over the batches (momentum None)
    in one train-mode pass without gradients; the model ends in eval mode. Deterministic: the same
    batches give bitwise the same statistics.
    """
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


def batchnorm_statistics(model: nn.Module) -> torch.Tensor:
    """Every BatchNorm's running mean and variance, flattened into one float32 vector (model order)."""
    parts = [t.detach().float().cpu().reshape(-1) for m in batchnorm_layers(model)
             for t in (m.running_mean, m.running_var)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def load_batchnorm_statistics(model: nn.Module, statistics: torch.Tensor) -> None:
    """Inverse of `batchnorm_statistics`."""
    layers = batchnorm_layers(model)
    expected = sum(2 * m.num_features for m in layers)
    if statistics.numel() != expected:
        raise ValueError(f"BatchNorm statistics of {statistics.numel()} values for a backbone with {expected}; "
                         "they were saved from another backbone: refit the model")
    start = 0
    for m in layers:
        for buffer in (m.running_mean, m.running_var):
            buffer.copy_(statistics[start:start + buffer.numel()].view_as(buffer))
            start += buffer.numel()


def statistics_digest(statistics: torch.Tensor) -> str:
    return hashlib.sha1(statistics.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _normalised_batches(images: np.ndarray, settings: ZooSettings) -> Iterator[torch.Tensor]:
    mean = torch.tensor(tuple(settings.mean), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(tuple(settings.std), dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(images), CALIBRATION_BATCH_SIZE):
        batch = (unit_tensor(images[start:start + CALIBRATION_BATCH_SIZE]) - mean) / std
        yield to_device_images(batch, settings.torch_device, settings.channels_last)


def calibrate_backbones(network: nn.Module, images: np.ndarray, settings: ZooSettings) -> int:
    """Calibrate every backbone inside `network` built with `needs_calibration` on resized (N, S, S, 3)
    uint8 images (normalised with the settings' mean and std); returns how many were calibrated.

    For the networks that hold their frozen backbone (teachers, encoders, the flows' feature source):
    the statistics then live in the network's state_dict, so a saved model keeps them.
    """
    backbones = [m for m in network.modules() if getattr(m, "needs_calibration", False)]
    for backbone in backbones:
        recalibrate_batchnorm(backbone, _normalised_batches(images, settings))
        backbone.needs_calibration = False
    return len(backbones)


def weights_identity(weights: bool | str, backbone: str, seed: int) -> str:
    """What the cache key records for the weights: the file's hash, or the seeded random init."""
    import timm

    from competition.weights import resolve_weights_path

    path = resolve_weights_path(weights, backbone, "zoo.backbone_weights")
    if path is None:
        return f"random init, seed {seed}, timm {timm.__version__}, torch {torch.__version__.split('+')[0]}"
    return f"file sha1 {file_digest(path)}"


class FeatureExtractor:
    """Frozen timm backbone -> list of (N, C, h, w) float32 feature maps, one per layer, cached on disk."""

    def __init__(self, backbone: str, layers: Sequence[int], settings: ZooSettings):
        self.backbone_name = backbone
        self.layers = tuple(int(i) for i in layers)
        self.settings = settings
        self.device = settings.torch_device
        init = settings.backbone_init
        padding = settings.backbone_padding
        memo = (backbone, self.layers, str(settings.backbone_weights), settings.seed, str(self.device), init, padding)
        model = _BACKBONES.get(memo)
        if model is None:
            # built as normal tensors even under a scorer's inference mode: a later fit that reuses the
            # memoised backbone re-estimates its BatchNorm statistics in place
            with torch.inference_mode(False):
                model = create_backbone(backbone, self.layers, settings.backbone_weights, settings.seed,
                                        init=init, padding=padding).to(self.device)
            _BACKBONES.clear()  # keep one backbone alive at a time; they are cheap to rebuild
            _BACKBONES[memo] = model
        self.model = model
        # A healthy random backbone is usable only with BatchNorm statistics: `calibrate` or `load_statistics`.
        self.needs_calibration = bool(getattr(model, "needs_calibration", False))
        self.statistics = torch.zeros(0)
        self.channels = list(model.feature_info.channels())
        self.reductions = list(model.feature_info.reduction())
        if padding == "reflect" and settings.image_size <= max(self.reductions):
            raise ValueError(f"zoo.backbone_padding: reflect mirrors every map across its border, and {backbone}'s "
                             f"layer{self.layers[-1]} is 1x1 at zoo.image_size {settings.image_size}: set "
                             f"zoo.image_size above {max(self.reductions)} or zoo.backbone_padding: zeros")
        self.description = {
            "backbone": backbone, "layers": list(self.layers),
            "weights": weights_identity(settings.backbone_weights, backbone, settings.seed),
            "image_size": settings.image_size, "resize": RESIZE_RULE,
            "mean": [round(float(v), 6) for v in settings.mean], "std": [round(float(v), 6) for v in settings.std],
            "dtype": "float16",
        }
        if padding != "zeros":  # other features than the zero-padded network's (zeros keeps earlier caches' keys)
            self.description["padding"] = padding
        if not settings.geometry.is_square:  # letterbox canvases and tiles are other inputs than square resizes
            self.description["geometry"] = settings.geometry.describe()
        if self.device.type == "cpu" and cpu_bf16(settings.cpu_amp):  # other bits than float32 features
            self.description["compute"] = "bfloat16 autocast"
        if self.needs_calibration:
            self.description["init"] = "healthy: live residual branches, BatchNorm statistics of the fit images"
        self._set_key()
        self.extracted = 0  # images run through the backbone by this extractor
        self.cache_hits = 0  # images read back from the cache

    def _set_key(self) -> None:
        self.key = hashlib.sha1(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]
        settings = self.settings
        self.cache_dir = (Path(settings.cache_dir) / f"{self.backbone_name}-{self.key}") if settings.cache_dir else None

    # -- BatchNorm statistics of a healthy random backbone
    def calibrate(self, images: ImageSet) -> torch.Tensor:
        """Estimate the backbone's BatchNorm statistics on the fit `images` and use them; returns them
        (empty when the backbone needs none: loaded weights, or init "timm"), for the model to keep.

        The images are taken in the order of their content hashes, so the same set gives bitwise the
        same statistics whatever its order; with a cache, the statistics are kept per image set.
        """
        if not self.needs_calibration:
            return self.statistics
        order = sorted(range(len(images)), key=images.content_key)
        if not order:
            raise ValueError(f"{self.backbone_name}: BatchNorm calibration needs at least one image")
        identity = json.dumps({"backbone": {k: v for k, v in self.description.items() if k != "batchnorm"},
                               "batch_size": CALIBRATION_BATCH_SIZE,
                               "images": [images.content_key(i) for i in order]}, sort_keys=True)
        digest = hashlib.sha1(identity.encode()).hexdigest()
        path = None
        if self.settings.cache_dir:
            path = Path(self.settings.cache_dir) / "batchnorm" / f"{self.backbone_name}-{digest[:24]}.safetensors"
        if path is not None and path.exists():
            from safetensors.torch import load_file

            statistics = load_file(str(path))["statistics"]
        else:
            batches = (to_device_images(batch, self.device, self.settings.channels_last)
                       for _, batch in images.loader(self.settings, indices=order, batch_size=CALIBRATION_BATCH_SIZE))
            recalibrate_batchnorm(self.model, batches)
            statistics = batchnorm_statistics(self.model)
            if path is not None:
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({"statistics": statistics.contiguous()}, str(tmp))
        self.load_statistics(statistics)
        return self.statistics

    def load_statistics(self, statistics: torch.Tensor) -> None:
        """Use BatchNorm statistics that `calibrate` returned (a fitted model's); empty ones are ignored."""
        if statistics.numel() == 0:
            return
        if not self.needs_calibration:
            raise ValueError(f"{self.backbone_name}: BatchNorm statistics given for a backbone that takes none "
                             f"(weights {self.description['weights']!r}, init {self.settings.backbone_init!r}); "
                             "the model was fitted with other zoo.backbone_init or weights: refit it")
        self.statistics = statistics.detach().float().cpu().clone()
        self.description["batchnorm"] = f"sha1 {statistics_digest(self.statistics)}"
        self._set_key()
        self._use_statistics()

    def _use_statistics(self) -> None:
        """Load this extractor's statistics into the (possibly shared) backbone unless it holds them."""
        if not self.needs_calibration:
            return
        if self.statistics.numel() == 0:
            raise RuntimeError(f"{self.backbone_name}: a random backbone with backbone_init 'healthy' needs "
                               "BatchNorm statistics: call calibrate(fit images) or load_statistics(saved) first")
        if getattr(self.model, "statistics_in_use", None) != self.key:
            load_batchnorm_statistics(self.model, self.statistics.to(self.device))
            self.model.statistics_in_use = self.key

    def select(self, maps: list[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
        """The maps of `layers` (a subset of this extractor's layers), in the order asked."""
        try:
            return [maps[self.layers.index(int(i))] for i in layers]
        except ValueError:
            raise ValueError(f"layers {list(layers)} are not all extracted by this {self.backbone_name} "
                             f"extractor (layers {list(self.layers)})") from None

    @property
    def layer_names(self) -> list[str]:
        return [f"layer{i}" for i in self.layers]

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(C, h, w) of each layer at `settings.image_size`."""
        size = self.settings.image_size
        return [(c, -(-size // r), -(-size // r)) for c, r in zip(self.channels, self.reductions)]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised (B, 3, S, S) batch -> float32 maps on the CPU, rounded through float16 (no cache)."""
        self._use_statistics()
        x = to_device_images(images, self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp, self.settings.cpu_amp):
            maps = self.model(x)
        return [m.half().cpu().float() for m in maps]

    def _cache_path(self, content_key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / content_key[:2] / f"{content_key}.safetensors"

    def _write_description(self) -> None:
        path = self.cache_dir / "extractor.json"
        if not path.exists():
            write_text(path, json.dumps(self.description, indent=2) + "\n")

    def _mark_used(self) -> None:
        """Touch the folder's `extractor.json`: the size limit deletes the least recently used folders."""
        try:
            os.utime(self.cache_dir / "extractor.json")
        except FileNotFoundError:
            pass

    def _prune(self) -> None:
        limit = self.settings.cache_max_gb
        if self.cache_dir is not None and limit and limit > 0:
            for folder in prune_feature_cache(self.cache_dir.parent, self.cache_dir, int(limit * 1024 ** 3)):
                if self.settings.progress:
                    tqdm.write(f"feature cache over zoo.cache_max_gb = {limit:g}: deleted {folder.name}, "
                               "the least recently used")

    def extract(self, images: ImageSet, indices: Sequence[int] | None = None,
                desc: str = "features") -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Yield `(indices, maps)` batches covering `images` (or `indices` of it), in no fixed order."""
        from safetensors.torch import load_file, save_file

        if self.needs_calibration and self.statistics.numel() == 0:
            self._use_statistics()  # raises: the key of an uncalibrated backbone names no features
        wanted = list(range(len(images))) if indices is None else [int(i) for i in indices]
        hits, misses = [], []
        if self.cache_dir is None:
            misses = wanted
        else:
            self._mark_used()
            for i in wanted:
                (hits if self._cache_path(images.content_key(i)).exists() else misses).append(i)
        names = self.layer_names
        bar = tqdm(total=len(wanted), desc=f"{desc} ({self.backbone_name})", unit="img",
                   disable=not self.settings.progress, leave=False)
        try:
            if misses:
                if self.cache_dir is not None:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    self._write_description()
                for batch_idx, batch in images.loader(self.settings, indices=misses):
                    maps = self.forward(batch)
                    batch_idx = batch_idx.tolist()
                    if self.cache_dir is not None:
                        for row, i in enumerate(batch_idx):
                            path = self._cache_path(images.content_key(i))
                            path.parent.mkdir(parents=True, exist_ok=True)
                            with atomic_path(path) as tmp:
                                save_file({n: m[row].half().contiguous() for n, m in zip(names, maps)}, str(tmp))
                    self.extracted += len(batch_idx)
                    bar.update(len(batch_idx))
                    yield batch_idx, maps
                self._prune()
            batch_size = self.settings.batch_size
            for start in range(0, len(hits), batch_size):
                chunk = hits[start:start + batch_size]
                try:
                    loaded = [load_file(str(self._cache_path(images.content_key(i)))) for i in chunk]
                except FileNotFoundError:  # pruned by another process since the look-up: extract again
                    for batch_idx, batch in images.loader(self.settings, indices=chunk):
                        self.extracted += len(batch_idx)
                        bar.update(len(batch_idx))
                        yield batch_idx.tolist(), self.forward(batch)
                    continue
                maps = [torch.stack([d[n] for d in loaded]).float() for n in names]
                self.cache_hits += len(chunk)
                bar.update(len(chunk))
                yield chunk, maps
        finally:
            bar.close()

    def extract_all(self, images: ImageSet, indices: Sequence[int] | None = None,
                    desc: str = "features") -> list[torch.Tensor]:
        """Every layer's maps for `images` (or `indices` of it) in order: list of (N, C, h, w) float32."""
        wanted = list(range(len(images))) if indices is None else [int(i) for i in indices]
        position = {i: p for p, i in enumerate(wanted)}
        out: list[torch.Tensor] | None = None
        for batch_idx, maps in self.extract(images, wanted, desc):
            if out is None:
                out = [torch.empty((len(wanted),) + tuple(m.shape[1:]), dtype=torch.float32) for m in maps]
            rows = torch.as_tensor([position[i] for i in batch_idx])
            for buf, m in zip(out, maps):
                buf[rows] = m
        if out is None:
            out = [torch.empty((0, c, h, w)) for c, h, w in self.feature_shapes()]
        return out


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when it is gone)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed meanwhile
                pass
    return total


def prune_feature_cache(root: str | Path, keep: str | Path | None, limit_bytes: int) -> list[Path]:
    """Delete the least recently used extractor folders under `root` (those holding `extractor.json`;
    last use = its mtime), never `keep`, until the folders total at most `limit_bytes`. Returns the
    deleted folders. Each is renamed away first, so a concurrent reader finds all of it or none."""
    root = Path(root)
    keep = Path(keep).resolve() if keep is not None else None
    folders = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith(".deleting-"):  # left by a process stopped while deleting
            shutil.rmtree(folder, ignore_errors=True)
            continue
        marker = folder / "extractor.json"
        try:
            used = marker.stat().st_mtime
        except FileNotFoundError:
            continue  # not an extractor's folder (BatchNorm statistics, or one being deleted)
        folders.append((used, folder, folder_bytes(folder)))
    total = sum(size for _, _, size in folders)
    deleted = []
    for _, folder, size in sorted(folders, key=lambda item: item[0]):
        if total <= limit_bytes:
            break
        if keep is not None and folder.resolve() == keep:
            continue
        trash = root / f".deleting-{uuid.uuid4().hex}"
        try:
            folder.rename(trash)
        except FileNotFoundError:  # another process pruned it first
            continue
        shutil.rmtree(trash, ignore_errors=True)
        total -= size
        deleted.append(folder)
    return deleted


def with_backbone_statistics(extractor: FeatureExtractor, fitted: nn.Module,
                             fit_images: ImageSet | None = None) -> FeatureExtractor:
    """`extractor` with the BatchNorm statistics a fitted module keeps in its `backbone_statistics` buffer:
    estimated on `fit_images` and stored there when given (fitting), else read from there (scoring)."""
    if fit_images is not None:
        fitted.backbone_statistics = extractor.calibrate(fit_images)
    else:
        extractor.load_statistics(fitted.backbone_statistics.cpu())
    return extractor


def score_from_features(extractor: FeatureExtractor, images: ImageSet, size: int, with_maps: bool, desc: str,
                        score_batch: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]],
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """The scoring loop of the feature models: `score_batch(maps)` turns one batch's backbone maps into
    image scores and, when `with_maps`, anomaly maps at `size`; this gathers them in image order."""
    scores = np.zeros(len(images))
    maps = np.zeros((len(images), size, size), np.float32) if with_maps else None
    for idx, feats in extractor.extract(images, desc=desc):
        batch_scores, batch_maps = score_batch(feats)
        scores[idx] = batch_scores.cpu().numpy()
        if with_maps:
            maps[idx] = batch_maps.cpu().numpy()
    return scores, maps


class HalfRounding(nn.Module):
    """x rounded to the nearest float16 value (as `x.half().float()`, ties to even, subnormals included),
    in float32 arithmetic: OpenVINO's CPU plugin runs float16 casts in float32, which would skip the rounding.
    Values beyond float16's range (65504) are not sent to infinity."""

    def __init__(self):
        super().__init__()
        # exact powers of two 2^-24 .. 2^16, read by index: a graph's Pow may be approximate
        self.register_buffer("powers", torch.tensor([2.0 ** k for k in range(-24, 17)]), persistent=False)

    def _power(self, exponent: torch.Tensor) -> torch.Tensor:
        return self.powers[(exponent + 24).long()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs().clamp(min=2.0 ** -24)
        exponent = torch.floor(torch.log2(a)).clamp(-14, 15)
        # an approximate log2 may miss the binade by one near a power of two: step back into it
        exponent = exponent + (a >= self._power(exponent + 1)).float() - (a < self._power(exponent)).float()
        ulp = self._power(exponent.clamp(-14, 15) - 10)  # float16 keeps 10 fraction bits; 2^-24 below 2^-14
        return torch.round(x / ulp) * ulp


class BackboneScorer(nn.Module):
    """A feature model's whole scoring as one module: [0, 1] images -> normalised -> the extractor's backbone
    (a private copy, its BatchNorm statistics in place) -> the maps of `layers`, rounded through float16 as
    `extract` gives them -> `head` (the module the model's eager scoring calls on extracted maps).
    An `ExtractorGroup` gives one backbone per network, their maps in the group's order."""

    def __init__(self, extractor: FeatureExtractor | ExtractorGroup, layers: Sequence[int], head: nn.Module):
        super().__init__()
        extractors = extractor.extractors if isinstance(extractor, ExtractorGroup) else [extractor]
        for member in extractors:
            member._use_statistics()
        self.normalise = ImageNormalise(extractors[0].settings.mean, extractors[0].settings.std)
        self.backbones = nn.ModuleList(freeze(copy.deepcopy(member.model).float()) for member in extractors)
        self.positions = [[member.layers.index(int(i)) for i in layers] for member in extractors]
        self.half_rounding = HalfRounding()
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise(images)
        maps = []
        for backbone, positions in zip(self.backbones, self.positions):
            out = backbone(x)
            maps += [self.half_rounding(out[i]) for i in positions]
        return self.head(maps)


class ExtractorGroup:
    """Several networks' extractors read side by side (a model over several random draws of a backbone):
    `extract` yields batches in image order whose maps are each network's layers in turn, every network
    reading its own cache. `select` picks `layers` from each network's share of such a batch."""

    def __init__(self, extractors: Sequence[FeatureExtractor]):
        self.extractors = list(extractors)
        self.settings = self.extractors[0].settings

    def extract(self, images: ImageSet, indices: Sequence[int] | None = None,
                desc: str = "features") -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        wanted = list(range(len(images))) if indices is None else [int(i) for i in indices]
        step = 8 * self.settings.batch_size  # aligned chunks: each network's maps of a chunk held at once
        with tqdm(total=len(wanted), desc=f"{desc} ({len(self.extractors)} networks)", unit="img",
                  disable=not self.settings.progress, leave=False) as bar:
            for start in range(0, len(wanted), step):
                chunk = wanted[start:start + step]
                maps = [m for k, member in enumerate(self.extractors)
                        for m in member.extract_all(images, chunk, f"{desc}, network {k}")]
                bar.update(len(chunk))
                yield chunk, maps

    def select(self, maps: list[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
        out, start = [], 0
        for member in self.extractors:
            out += member.select(maps[start:start + len(member.layers)], layers)
            start += len(member.layers)
        return out


def shared_extractor(backbone: str, layers: Sequence[int], settings: ZooSettings) -> FeatureExtractor:
    """The extractor for `layers` of `backbone`, widened to the layers the run's other models read from the
    same network (`settings.shared_layers["backbone@seed"]`) or, for a model built outside a run, to
    `SHARED_LAYERS[backbone]` when the backbone is listed.

    Widening never changes a layer's features (the layers before it are the same modules with the same
    seeded weights and statistics); it only lets models share a cache entry. A network the run reads at
    layer1 alone stops after layer1.
    Pick the model's maps from its output with `extractor.select(maps, layers)`.
    """
    run = settings.shared_layers.get(f"{backbone}@{settings.seed}")
    wider = run if run is not None else SHARED_LAYERS.get(backbone, ())
    wanted = sorted(set(int(i) for i in layers) | set(int(i) for i in wider))
    return FeatureExtractor(backbone, wanted, settings)
