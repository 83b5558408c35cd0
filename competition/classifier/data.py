"""Classifier data: one fold's training set (oversampled defects, painted positives) and eval sets.

Leak-proof by construction: `TrainDataset` is given only the fold's training rows (fold != k), so
defect copies, painted positives and Perlin textures can only come from those images; validation
rows go through `EvalDataset`, whose pipeline is deterministic (resize, normalise).
Every random choice is seeded by (seed, epoch, sample position), so an epoch is the same whatever
the worker count, and a resumed run sees exactly the data an uninterrupted one would.

Input geometry (`model.resize`, `model.tiles`; competition.preprocess.Geometry): the store holds each
image as the surface to work on (square: the model input itself; letterbox: the aspect-kept content;
tiles: the image scaled for tiling), painting and oversampling happen there, and the canvas (padding
and its `valid` map) is made last, so masks follow the image exactly and padding never carries a label.
"""
from __future__ import annotations

import logging
import random
from dataclasses import replace

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset
from tqdm import tqdm

from competition.config import POSITIVE_KINDS, AugmentConfig, Config
from competition.data.images import read_image, read_mask
from competition.data.painters import DEFECT_KINDS, cutpaste, paint_defect, perlin_anomaly
from competition.data.transplant import DefectBank, NormalPool, nsa, transplant
from competition.preprocess import (
    Geometry,
    build_albumentations,
    canvas_box,
    fit_mask_to_canvas,
    fit_to_canvas,
    reduce_tile_scores,
    resize_square,
    rotate,
    scale_for_tiles,
    tile_boxes,
)

NORMAL, DEFECT, PAINTED = 0, 1, 2  # where a training sample comes from
WHOLE_IMAGE = -1  # tile index of a sample that shows its whole image (a defect without a mask to place it)
# A tile of a defect image is a positive when it holds this many mask pixels (of the scaled image), or the
# whole defect when that is smaller: a sliver of a defect's edge is no evidence either way.
MIN_TILE_DEFECT_PX = 8
_SOURCE_NAMES = {NORMAL: "normal", DEFECT: "defect copy", PAINTED: "painted positive"}
_PLURALS = {NORMAL: "normals", DEFECT: "defect copies", PAINTED: "painted positives"}

assert set(POSITIVE_KINDS) == set(DEFECT_KINDS) | {"cutpaste", "cutpaste_scar", "perlin", "transplant", "nsa"}, \
    "config.POSITIVE_KINDS must list the painters' DEFECT_KINDS plus cutpaste, cutpaste_scar, perlin, transplant, nsa"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- transforms

def _normalise(augment: AugmentConfig) -> list[A.BasicTransform]:
    return [A.Normalize(mean=augment.mean, std=augment.std, max_pixel_value=255.0), ToTensorV2()]


def build_train_transform(augment: AugmentConfig) -> A.Compose:
    """`augment.train` (albumentations class names + kwargs), then normalise; images arrive resized."""
    return A.Compose(build_albumentations(augment.train, "augment.train") + _normalise(augment))


def build_eval_transform(augment: AugmentConfig) -> A.Compose:
    """Deterministic: normalise only (resizing happens once, in ImageStore)."""
    return A.Compose(_normalise(augment))


# ---------------------------------------------------------------- geometry

def classifier_geometry(cfg: Config, scoring: bool = False) -> Geometry:
    """The classifier's input geometry from `model.image_size`, `model.resize` and `model.tiles`; with
    `scoring`, the one that writes predictions (`model.tiles.predict_overlap`)."""
    model, tiles = cfg.model, cfg.model.tiles
    overlap = tiles.predict_overlap if scoring and tiles.predict_overlap is not None else tiles.overlap
    return Geometry(image_size=model.image_size, resize=model.resize, tiles=tiles.enabled, tile_size=tiles.size,
                    tile_overlap=overlap, tile_scale=tiles.scale, tile_reduce=tiles.reduce,
                    tile_topk=tiles.topk)


def scoring_store(store: ImageStore, cfg: Config) -> ImageStore:
    """The store that scores predictions: `store` itself, or one on the scoring geometry's tile grid sharing
    `store`'s decoded surfaces (the grid's overlap changes the boxes, not the surfaces)."""
    geometry = classifier_geometry(cfg, scoring=True)
    if geometry == store.geometry:
        return store
    if replace(geometry, tile_overlap=store.geometry.tile_overlap) != store.geometry:
        raise ValueError(f"the scoring geometry {geometry} differs from the store's {store.geometry} in more "
                         "than its tile overlap")
    return store.with_tile_overlap(geometry.tile_overlap)


def tile_defect_labels(mask: np.ndarray, boxes: np.ndarray, min_pixels: int = MIN_TILE_DEFECT_PX) -> np.ndarray:
    """Which tiles (`boxes` on the mask's plane) hold the defect: at least `min_pixels` mask pixels, or all
    of them when the whole mask is smaller. An empty mask has no positive tile."""
    defect = np.asarray(mask) > 0
    needed = min(min_pixels, int(defect.sum()))
    if needed == 0:
        return np.zeros(len(boxes), bool)
    counts = np.array([defect[top:bottom, left:right].sum() for top, left, bottom, right in boxes], int)
    return counts >= needed


# ---------------------------------------------------------------- decoded images

class ImageStore:
    """Decoded images and masks by path, as the geometry's working surface; kept in memory when `keep`.

    The surface is the model input itself for the square resize, the aspect-kept content (before its
    padding) for letterbox, and the image scaled by `tile_scale` for tiles (`boxes` gives its tiles).
    Give an int for the square resize at that size.
    """

    def __init__(self, geometry: int | Geometry, keep: bool = True):
        self.geometry = geometry if isinstance(geometry, Geometry) else Geometry(image_size=int(geometry))
        self.size = self.geometry.image_size
        self.keep = keep
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._boxes: dict[str, np.ndarray] = {}

    def _surface(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        geometry = self.geometry
        if geometry.tiles:
            return scale_for_tiles(image, geometry, nearest)
        # letterbox: the content of the canvas; the dataset pads it after painting
        canvas, _ = (fit_mask_to_canvas if nearest else fit_to_canvas)(image, geometry)
        top, left, height, width = canvas_box(image.shape[0], image.shape[1], geometry)
        return np.ascontiguousarray(canvas[top:top + height, left:left + width])

    def image(self, path: str, decoded: np.ndarray | None = None) -> np.ndarray:
        """The surface of the image at `path`; `decoded` is that image already read (predict decodes once)."""
        cached = self._images.get(path)
        if cached is not None:
            return cached
        decoded = read_image(path) if decoded is None else decoded
        if self.geometry.is_square:
            image = resize_square(decoded, self.size)
        else:
            image = self._surface(decoded)
        image.setflags(write=False)  # shared between samples: painters and transforms must copy
        if self.keep:
            self._images[path] = image
        return image

    def mask(self, path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 {0, 255} on the image's surface (`shape`, the image's, defaults to the square);
        an empty path gives an empty mask."""
        if not path:
            return np.zeros(shape or (self.size, self.size), np.uint8)
        cached = self._masks.get(path)
        if cached is not None:
            return cached
        if self.geometry.is_square:
            mask = read_mask(path, (self.size, self.size))
        else:
            mask = self._surface(read_mask(path), nearest=True)
            if shape is not None and mask.shape != tuple(shape):  # a mask not the size of its image
                mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        mask.setflags(write=False)
        if self.keep:
            self._masks[path] = mask
        return mask

    def boxes(self, path: str) -> np.ndarray:
        """(n, 4) tile boxes (top, left, bottom, right) on the image's surface (tiles only)."""
        cached = self._boxes.get(path)
        if cached is None:
            # the surface is already scaled: its boxes are those of the original at tile_scale
            cached = self.boxes_of(self.image(path))
            self._boxes[path] = cached
        return cached

    def boxes_of(self, surface: np.ndarray) -> np.ndarray:
        """Tile boxes of a surface this store made (`image`): those of `boxes` for its size."""
        return tile_boxes(surface.shape[0], surface.shape[1], replace(self.geometry, tile_scale=1.0))

    def with_tile_overlap(self, overlap: float) -> ImageStore:
        """This store on another tile grid: the same decoded surfaces and masks (shared, not copied), its own
        boxes."""
        other = ImageStore(replace(self.geometry, tile_overlap=overlap), keep=self.keep)
        other._images, other._masks = self._images, self._masks
        return other

    def preload(self, paths, desc: str = "decoding") -> None:
        """Decode `paths` now (before DataLoader workers fork, so they share the memory)."""
        if not self.keep:
            return
        todo = [p for p in dict.fromkeys(paths) if p not in self._images]
        for path in tqdm(todo, desc=desc, leave=False, disable=len(todo) < 50):
            self.image(path)


def fold_rows(folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows: fold != k, validation rows: fold == k) of `read_folds`' table."""
    train = folds[folds["fold"] != fold].reset_index(drop=True)
    val = folds[folds["fold"] == fold].reset_index(drop=True)
    if val.empty:
        raise ValueError(f"fold {fold} has no validation images; folds.csv has folds {sorted(folds['fold'].unique())}")
    return train, val


# ---------------------------------------------------------------- datasets

class EvalDataset(Dataset):
    """Validation or test images: resized and normalised, nothing random. Items: (image, index).

    With tiles, the items are every tile of every image in order, and `image_logits` reduces the
    items' logits to one per image (max or top-k mean, `Geometry.tile_reduce`).
    """

    def __init__(self, paths: list[str], augment: AugmentConfig, store: ImageStore):
        self.paths = list(paths)
        self.store = store
        self.transform = build_eval_transform(augment)
        self.tile_items: list[tuple[int, int]] | None = None  # (image index, tile index) per item
        if store.geometry.tiles:
            self.tile_counts = [len(store.boxes(path)) for path in self.paths]
            self.tile_items = [(i, k) for i, count in enumerate(self.tile_counts) for k in range(count)]

    def __len__(self) -> int:
        return len(self.paths) if self.tile_items is None else len(self.tile_items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        geometry = self.store.geometry
        if geometry.is_square:
            return self.transform(image=self.store.image(self.paths[index]))["image"], index
        if self.tile_items is None:
            surface = self.store.image(self.paths[index])
        else:
            image_index, tile = self.tile_items[index]
            path = self.paths[image_index]
            top, left, bottom, right = self.store.boxes(path)[tile]
            surface = self.store.image(path)[top:bottom, left:right]
        return self.transform(image=fit_to_canvas(surface, geometry)[0])["image"], index

    def image_logits(self, item_logits: np.ndarray) -> np.ndarray:
        """One logit per image from the items' logits (the items themselves unless tiled)."""
        if self.tile_items is None:
            return item_logits
        per_image = np.split(np.asarray(item_logits), np.cumsum(self.tile_counts)[:-1])  # items are image-major
        return np.array([reduce_tile_scores(logits, self.store.geometry) for logits in per_image], np.float64)


class TrainDataset(Dataset):
    """One epoch of the fold's training set: every normal once, defect copies up to
    `oversample.defect_ratio` (flips x rotations every `angle_step` degrees), and painted positives
    (`positives.ratio` per normal) made from the fold's own normals. Call `set_epoch` before each epoch.

    With tiles, samples are tiles: `oversample.normal_tiles` tiles of every normal (negatives), defect
    copies showing a tile that holds the defect's mask (`tile_defect_labels`; a defect without a mask, or
    too small for any tile, is shown whole, letterboxed, as weak evidence), and positives painted on normal
    tiles; `defect_ratio` and `positives.ratio` count against the normal tiles. A defect image's other
    tiles are never negatives.

    Items: dict(image float (3, H, W), label float, mask float (1, H, W) in [0, 1], has_mask bool), and
    with the mask head on a padded geometry also valid float (1, H, W): 1 on real pixels, 0 on padding.
    """

    def __init__(self, rows: pd.DataFrame, cfg: Config, store: ImageStore, with_masks: bool = False):
        labels = rows["label"].astype(int).to_numpy()
        self.paths = rows["path"].astype(str).tolist()
        self.mask_paths = rows["mask_path"].fillna("").astype(str).tolist() if "mask_path" in rows else [""] * len(rows)
        self.normal_idx = np.flatnonzero(labels == 0)
        self.defect_idx = np.flatnonzero(labels == 1)
        if len(self.normal_idx) == 0 or len(self.defect_idx) == 0:
            raise ValueError(f"a training fold needs normal and defect images; got {len(self.normal_idx)} normal "
                             f"and {len(self.defect_idx)} defect")
        self.cfg = cfg
        self.store = store
        self.with_masks = with_masks
        self.transform = build_train_transform(cfg.augment)
        self.geometry = store.geometry
        self.tiled = self.geometry.tiles
        over = cfg.oversample
        self.angles = list(range(0, 360, over.angle_step))
        self.variants = [(angle, flip) for flip in ((False, True) if over.flips else (False,)) for angle in self.angles]
        if self.tiled:
            self._prepare_tiles()
        n_normal = len(self.normal_idx) if not self.tiled else int(self.normal_tile_counts.sum())
        self.normal_units = n_normal  # what one epoch would show of the normals at normals_per_epoch 1
        if over.normals_per_epoch < 1.0:
            n_normal = max(1, int(round(over.normals_per_epoch * n_normal)))
        self.n_normal = n_normal
        self.n_defect_copies = (int(round(over.defect_ratio * n_normal)) if over.defect_ratio > 0
                                else len(self.defect_idx))
        self.n_painted = int(round(cfg.positives.ratio * n_normal))
        self._prepare_real_sources()
        self._variant_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        if over.mode == "cached" and over.defect_ratio > 0:
            # every flip x rotation of every defect, made once here, before DataLoader workers fork
            pairs = [(int(row), v) for row in self.defect_idx for v in range(len(self.variants))]
            if self.tiled:
                pairs = [(row, v, int(tile)) for row, v in pairs for tile in self._defect_tile_choices(row)]
            for key in tqdm(pairs, desc="defect copies", leave=False, disable=len(pairs) < 200):
                self._defect_variant(*key)
        self.epoch = -1
        self.set_epoch(0)

    def _prepare_tiles(self) -> None:
        """Each image's tile count, the normals' tiles per epoch, and each defect's positive tiles."""
        self.tile_counts = np.array([len(self.store.boxes(path)) for path in self.paths], int)
        per_normal = self.cfg.oversample.normal_tiles
        counts = self.tile_counts[self.normal_idx]
        self.normal_tile_counts = counts if per_normal == 0 else np.minimum(counts, per_normal)
        self.positive_tiles: dict[int, np.ndarray] = {}
        for row in self.defect_idx:
            labels = tile_defect_labels(self._mask(row), self.store.boxes(self.paths[row]))
            self.positive_tiles[int(row)] = np.flatnonzero(labels)

    def _defect_tile_choices(self, row: int) -> np.ndarray:
        """The positive tiles of a defect image, or the whole image when none holds its mask."""
        tiles = self.positive_tiles[int(row)]
        return tiles if len(tiles) else np.array([WHOLE_IMAGE])

    def _prepare_real_sources(self) -> None:
        """transplant's bank (the fold's defects that have a mask) and nsa's pool (the fold's normals).

        Without a masked defect, transplant is dropped from the kinds (the others, else the painters'
        defect kinds, stand in) and `describe` says so.
        """
        self.kinds, self.kinds_note = list(self.cfg.positives.kinds), ""
        self.defect_bank, self.normal_pool = None, None
        if self.n_painted and "transplant" in self.kinds:
            masked = [int(r) for r in self.defect_idx if self.mask_paths[r]]
            self.defect_bank = DefectBank.from_pairs(
                (self.paths[r], self.store.image(self.paths[r]), self._mask(r)) for r in masked)
            if self.tiled:
                # defects go onto tiles at their own scale: the bank's size matching (short sides) must see
                # a tile's side, not the whole image's
                self.defect_bank.pieces = [
                    replace(piece, source_short_side=min(self.geometry.tile_size, piece.source_short_side))
                    for piece in self.defect_bank.pieces]
            if not len(self.defect_bank):
                self.kinds = [k for k in self.kinds if k != "transplant"] or list(DEFECT_KINDS)
                self.kinds_note = f"transplant has no masked defect to move; {', '.join(self.kinds)} stand in"
                log.warning("positives.kinds: %s", self.kinds_note)
        if self.n_painted and "nsa" in self.kinds:
            self.normal_pool = NormalPool([self.paths[r] for r in self.normal_idx], self.store.image)

    # -- the epoch plan: which image each position shows (deterministic in seed and epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        rng = np.random.default_rng([self.cfg.seed, epoch, 7])
        if self.n_normal < self.normal_units:
            normal_rows, normal_tiles = self._frequency_sampled_normals(epoch)
        else:
            normal_rows, normal_tiles = self._normal_tiles(rng) if self.tiled else (self.normal_idx, None)
        sources = [np.full(len(normal_rows), NORMAL), np.full(self.n_defect_copies, DEFECT),
                   np.full(self.n_painted, PAINTED)]
        rows = [normal_rows, self._defect_copy_rows(rng), rng.choice(self.normal_idx, self.n_painted)]
        variants = [np.zeros(len(normal_rows), int), self._defect_copy_variants(rng, rows[1]),
                    np.zeros(self.n_painted, int)]
        order = rng.permutation(len(normal_rows) + self.n_defect_copies + self.n_painted)
        self.plan_source = np.concatenate(sources)[order]
        self.plan_row = np.concatenate(rows).astype(int)[order]
        self.plan_variant = np.concatenate(variants).astype(int)[order]
        self.plan_tile = np.zeros(len(order), int)  # the tile each position shows (tiles only)
        if self.tiled:
            defect_tiles = [int(rng.choice(self._defect_tile_choices(row))) for row in rows[1]]
            painted_tiles = [int(rng.integers(self.tile_counts[row])) for row in rows[2]]
            self.plan_tile = np.concatenate([normal_tiles, defect_tiles, painted_tiles]).astype(int)[order]

    def _frequency_sampled_normals(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, tiles) of epoch `epoch`'s `n_normal` normals by frequency of use: the epochs walk through one
        endless sequence of shuffled passes over every normal (every normal tile), so the least shown come
        first and none repeats before all were shown. Deterministic in (seed, epoch): resuming is exact."""
        if self.tiled:
            units = np.array([(row, tile) for row in self.normal_idx for tile in range(self.tile_counts[row])], int)
        else:
            units = np.stack([self.normal_idx, np.zeros(len(self.normal_idx), int)], axis=1)
        start, stop = epoch * self.n_normal, (epoch + 1) * self.n_normal
        passes = range(start // len(units), (stop - 1) // len(units) + 1)
        sequence = np.concatenate([np.random.default_rng([self.cfg.seed, p, 11]).permutation(len(units))
                                   for p in passes])
        chosen = units[sequence[start - passes[0] * len(units):stop - passes[0] * len(units)]]
        return chosen[:, 0], chosen[:, 1]

    def _normal_tiles(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(row, tile) of this epoch's normal tiles: `normal_tile_counts` distinct tiles of each normal."""
        rows, tiles = [], []
        for row, count in zip(self.normal_idx, self.normal_tile_counts):
            chosen = rng.permutation(self.tile_counts[row])[:count]
            rows.append(np.full(count, row))
            tiles.append(np.sort(chosen))
        return np.concatenate(rows), np.concatenate(tiles)

    def _defect_copy_rows(self, rng: np.random.Generator) -> np.ndarray:
        """Each real defect the same number of times (+-1), in a fresh order every epoch."""
        repeats = -(-self.n_defect_copies // len(self.defect_idx))
        cycled = np.concatenate([rng.permutation(self.defect_idx) for _ in range(repeats)])
        return cycled[:self.n_defect_copies]

    def _defect_copy_variants(self, rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
        """Distinct flip/rotation variants for the copies of one defect (identity first when expanding
        is off: defect_ratio 0 shows each defect once, as it is)."""
        if self.cfg.oversample.defect_ratio == 0:
            return np.zeros(len(rows), int)
        out = np.zeros(len(rows), int)
        for row in np.unique(rows):
            at = np.flatnonzero(rows == row)
            draws = [rng.permutation(len(self.variants)) for _ in range(-(-len(at) // len(self.variants)))]
            out[at] = np.concatenate(draws)[:len(at)]
        return out

    def __len__(self) -> int:
        return len(self.plan_source)

    def describe(self) -> str:
        counts = np.bincount(self.plan_source, minlength=3)
        text = ", ".join(f"{counts[s]} {_SOURCE_NAMES[s] if counts[s] == 1 else _PLURALS[s]}"
                         for s in (NORMAL, DEFECT, PAINTED))
        if self.tiled:
            weak = sum(not len(tiles) for tiles in self.positive_tiles.values())
            text = f"tiles: {text}" + (f"; {weak} defect(s) without a tile holding a mask, shown whole" if weak else "")
        return f"{text} ({self.kinds_note})" if self.kinds_note else text

    # -- one sample

    def _mask(self, row: int) -> np.ndarray:
        return self.store.mask(self.mask_paths[row], self.store.image(self.paths[row]).shape[:2])

    def _surface(self, row: int, tile: int = WHOLE_IMAGE) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) a sample starts from: the stored surface, or one tile of it."""
        image, mask = self.store.image(self.paths[row]), self._mask(row)
        if self.tiled and tile != WHOLE_IMAGE:
            top, left, bottom, right = self.store.boxes(self.paths[row])[tile]
            image, mask = image[top:bottom, left:right], mask[top:bottom, left:right]
        return image, mask

    def _defect_variant(self, row: int, variant: int, tile: int = WHOLE_IMAGE) -> tuple[np.ndarray, np.ndarray]:
        key = (row, variant) if not self.tiled else (row, variant, tile)
        if key in self._variant_cache:
            return self._variant_cache[key]
        angle, flip = self.variants[variant]
        image, mask = self._surface(row, tile)
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = rotate(np.ascontiguousarray(image), angle, cv2.INTER_LINEAR)
        mask = rotate(np.ascontiguousarray(mask), angle, cv2.INTER_NEAREST)
        if self.cfg.oversample.mode == "cached":
            self._variant_cache[key] = (image, mask)
        return image, mask

    def _severity_range(self) -> tuple[float, float]:
        low, high = self.cfg.positives.severity
        if self.cfg.positives.curriculum:
            high = low + (high - low) * min(1.0, (self.epoch + 1) / self.cfg.train.epochs)
        return low, high

    def _painted(self, row: int, rng: np.random.Generator, tile: int = WHOLE_IMAGE) -> tuple[np.ndarray, np.ndarray]:
        base = self._surface(row, tile)[0]
        grey = bool(np.array_equal(base[..., 0], base[..., 1]) and np.array_equal(base[..., 0], base[..., 2]))
        image = base[..., 0] if grey else base  # grey data gets grey defects
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        severity = float(rng.uniform(*self._severity_range()))
        if kind == "cutpaste" or kind == "cutpaste_scar":
            painted, mask = cutpaste(image, rng, scar=kind == "cutpaste_scar")
        elif kind == "perlin":
            texture = None
            if self.cfg.positives.texture_source == "dataset":
                others = self.normal_idx[self.normal_idx != row]
                if len(others):
                    other = int(rng.choice(others))
                    texture = (self.store.image(self.paths[other]) if not self.tiled
                               else self._surface(other, int(rng.integers(self.tile_counts[other])))[0])
                    texture = texture[..., 0] if grey else texture
            painted, mask = perlin_anomaly(image, rng, texture_source=texture, beta=1.0 - 0.9 * severity)
        elif kind == "transplant":
            painted, mask = transplant(image, rng, self.defect_bank, severity)
        elif kind == "nsa" and self.tiled:  # patches of other normals' tiles, at the tiles' scale
            pool = NormalPool([f"{r}:{k}" for r in self.normal_idx if r != row for k in range(self.tile_counts[r])],
                              lambda key: self._surface(*map(int, key.split(":")))[0])
            painted, mask = nsa(image, rng, pool)
        elif kind == "nsa":
            painted, mask = nsa(image, rng, self.normal_pool, exclude=self.paths[row])
        else:
            painted, mask = paint_defect(image, kind, rng, severity)
        if grey:
            painted = np.repeat(painted[..., None], 3, axis=2)
        return painted, mask

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        source = int(self.plan_source[position])
        row = int(self.plan_row[position])
        seeds = np.random.SeedSequence([self.cfg.seed, self.epoch, position])
        paint_seed, augment_seed = seeds.spawn(2)
        tile = int(self.plan_tile[position]) if self.tiled else WHOLE_IMAGE
        if source == NORMAL and not self.geometry.is_square:
            image = self._surface(row, tile)[0]
            mask = np.zeros(image.shape[:2], np.uint8)
        elif source == NORMAL:
            image, mask = self.store.image(self.paths[row]), self.store.mask("")
        elif source == DEFECT:
            image, mask = self._defect_variant(row, int(self.plan_variant[position]), tile)
        else:
            image, mask = self._painted(row, np.random.default_rng(paint_seed), tile)
        has_mask = source != DEFECT or bool(self.mask_paths[row])
        augment_rng = np.random.default_rng(augment_seed)
        self.transform.set_random_state(augment_rng, random.Random(int(augment_rng.integers(2**63))))
        if not self.geometry.is_square:
            return self._canvas_item(image, mask, source, has_mask, whole=tile == WHOLE_IMAGE)
        if self.with_masks:
            out = self.transform(image=image, mask=np.array(mask))  # writable: becomes a tensor
            mask_tensor = out["mask"].float().div_(255.0).unsqueeze(0)
        else:
            out = self.transform(image=image)
            mask_tensor = torch.zeros(1, 1, 1)
        return {"image": out["image"], "label": torch.tensor(float(source != NORMAL)),
                "mask": mask_tensor, "has_mask": torch.tensor(has_mask)}

    def _canvas_item(self, image: np.ndarray, mask: np.ndarray, source: int, has_mask: bool,
                     whole: bool) -> dict[str, torch.Tensor]:
        """The sample fitted to the canvas (letterbox padding, or a tile's fit), augmented with its mask
        and its `valid` map alike. A whole image in tile mode is letterboxed: no part of it is cut off."""
        geometry = replace(self.geometry, resize="letterbox") if self.tiled and whole else self.geometry
        canvas, valid = fit_to_canvas(image, geometry)
        item = {"label": torch.tensor(float(source != NORMAL)), "has_mask": torch.tensor(has_mask)}
        if not self.with_masks:
            item.update(image=self.transform(image=canvas)["image"], mask=torch.zeros(1, 1, 1))
            return item
        # mask and valid map as one two-channel mask: every geometric transform moves them together
        both = np.dstack([fit_mask_to_canvas(mask, geometry)[0], valid.astype(np.uint8) * 255])
        out = self.transform(image=canvas, mask=both)
        both = torch.as_tensor(out["mask"]).permute(2, 0, 1).float().div_(255.0)
        item.update(image=out["image"], mask=both[:1].contiguous(), valid=both[1:].contiguous())
        return item

    def sources(self) -> list[tuple[str, str]]:
        """(kind, image path) of every sample this epoch: for audits such as the no-leak test."""
        return [(_SOURCE_NAMES[int(s)], self.paths[int(r)]) for s, r in zip(self.plan_source, self.plan_row)]
