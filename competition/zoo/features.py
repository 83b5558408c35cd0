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
`shared_extractor(backbone, layers, settings)`: for the backbones in `SHARED_LAYERS` it extracts
that common superset (resnet18: layer1..layer4, ~240 KB per 128-px image in float16) and each
model picks its own layers from it (`extractor.select(maps, layers)`); PatchCore, PaDiM, DFM and
DFKDE over resnet18 thus share one cache. Features are always rounded through float16, cached or
not, so results never depend on the cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from competition.artifacts import atomic_path, write_text
from competition.runtime import autocast, to_device_images
from competition.zoo.base import ImageSet, ZooSettings, file_digest

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
_BACKBONES: dict[tuple, nn.Module] = {}


def create_backbone(name: str, layers: Sequence[int], weights: bool | str, seed: int,
                    frozen: bool = True) -> nn.Module:
    """timm `features_only` backbone returning the maps of `layers`, with local weights or a seeded init."""
    import timm

    from competition.weights import load_local_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(layers))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"zoo backbone {name!r} with layers {list(layers)}: {exc}") from exc
    load_local_weights(model, weights, name)
    if frozen:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def weights_identity(weights: bool | str, backbone: str, seed: int) -> str:
    """What the cache key records for the weights: the file's hash, or the seeded random init."""
    import timm

    from competition.weights import resolve_weights_path

    path = resolve_weights_path(weights, backbone)
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
        memo = (backbone, self.layers, str(settings.backbone_weights), settings.seed, str(self.device))
        model = _BACKBONES.get(memo)
        if model is None:
            model = create_backbone(backbone, self.layers, settings.backbone_weights, settings.seed).to(self.device)
            _BACKBONES.clear()  # keep one backbone alive at a time; they are cheap to rebuild
            _BACKBONES[memo] = model
        self.model = model
        self.channels = list(model.feature_info.channels())
        self.reductions = list(model.feature_info.reduction())
        self.description = {
            "backbone": backbone, "layers": list(self.layers),
            "weights": weights_identity(settings.backbone_weights, backbone, settings.seed),
            "image_size": settings.image_size, "resize": RESIZE_RULE,
            "mean": [round(float(v), 6) for v in settings.mean], "std": [round(float(v), 6) for v in settings.std],
            "dtype": "float16",
        }
        self.key = hashlib.sha1(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_dir = (Path(settings.cache_dir) / f"{backbone}-{self.key}") if settings.cache_dir else None
        self.extracted = 0  # images run through the backbone by this extractor
        self.cache_hits = 0  # images read back from the cache

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
        x = to_device_images(images, self.device, self.settings.channels_last)
        with autocast(self.device, self.settings.amp):
            maps = self.model(x)
        return [m.half().cpu().float() for m in maps]

    def _cache_path(self, content_key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / content_key[:2] / f"{content_key}.safetensors"

    def _write_description(self) -> None:
        path = self.cache_dir / "extractor.json"
        if not path.exists():
            write_text(path, json.dumps(self.description, indent=2) + "\n")

    def extract(self, images: ImageSet, indices: Sequence[int] | None = None,
                desc: str = "features") -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Yield `(indices, maps)` batches covering `images` (or `indices` of it), in no fixed order."""
        from safetensors.torch import load_file, save_file

        wanted = list(range(len(images))) if indices is None else [int(i) for i in indices]
        hits, misses = [], []
        if self.cache_dir is None:
            misses = wanted
        else:
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
            batch_size = self.settings.batch_size
            for start in range(0, len(hits), batch_size):
                chunk = hits[start:start + batch_size]
                loaded = [load_file(str(self._cache_path(images.content_key(i)))) for i in chunk]
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


def shared_extractor(backbone: str, layers: Sequence[int], settings: ZooSettings) -> FeatureExtractor:
    """The extractor for `layers` of `backbone`, widened to `SHARED_LAYERS[backbone]` when the backbone is listed.

    Pick the model's maps from its output with `extractor.select(maps, layers)`.
    """
    wanted = sorted(set(int(i) for i in layers) | set(SHARED_LAYERS.get(backbone, ())))
    return FeatureExtractor(backbone, wanted, settings)
