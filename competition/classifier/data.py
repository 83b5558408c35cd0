"""Classifier data: one fold's training set (oversampled defects, painted positives) and eval sets.

Leak-proof by construction: `TrainDataset` is given only the fold's training rows (fold != k), so
defect copies, painted positives and Perlin textures can only come from those images; validation
rows go through `EvalDataset`, whose pipeline is deterministic (resize, normalise).
Every random choice is seeded by (seed, epoch, sample position), so an epoch is the same whatever
the worker count, and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset
from tqdm import tqdm

from competition.config import PAINTED_KINDS, AugmentConfig, Config
from competition.data.images import read_image, read_mask
from competition.data.painters import DEFECT_KINDS, cutpaste, paint_defect, perlin_anomaly

NORMAL, DEFECT, PAINTED = 0, 1, 2  # where a training sample comes from
_SOURCE_NAMES = {NORMAL: "normal", DEFECT: "defect copy", PAINTED: "painted positive"}
_PLURALS = {NORMAL: "normals", DEFECT: "defect copies", PAINTED: "painted positives"}

assert set(PAINTED_KINDS) == set(DEFECT_KINDS) | {"cutpaste", "cutpaste_scar", "perlin"}, \
    "config.PAINTED_KINDS must list the painters' DEFECT_KINDS plus cutpaste, cutpaste_scar, perlin"


# ---------------------------------------------------------------- transforms

def _normalise(augment: AugmentConfig) -> list[A.BasicTransform]:
    return [A.Normalize(mean=augment.mean, std=augment.std, max_pixel_value=255.0), ToTensorV2()]


def build_train_transform(augment: AugmentConfig) -> A.Compose:
    """`augment.train` (albumentations class names + kwargs), then normalise; images arrive resized."""
    transforms = []
    for i, spec in enumerate(augment.train):
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            raise ValueError(f"augment.train[{i}].name {name!r} is not an albumentations transform "
                             f"(e.g. HorizontalFlip, RandomBrightnessContrast, GaussianBlur)")
        try:
            transforms.append(cls(**spec))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"augment.train[{i}] ({name}): bad arguments {spec}: {exc}") from None
    return A.Compose(transforms + _normalise(augment))


def build_eval_transform(augment: AugmentConfig) -> A.Compose:
    """Deterministic: normalise only (resizing happens once, in ImageStore)."""
    return A.Compose(_normalise(augment))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """The one resize of the classifier: to size x size, area averaging down, bilinear up."""
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] * image.shape[1] > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# ---------------------------------------------------------------- decoded images

class ImageStore:
    """Decoded, resized images and masks by path; kept in memory when `keep` (decode once per run)."""

    def __init__(self, size: int, keep: bool = True):
        self.size = size
        self.keep = keep
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    def image(self, path: str) -> np.ndarray:
        cached = self._images.get(path)
        if cached is not None:
            return cached
        image = resize_square(read_image(path), self.size)
        image.setflags(write=False)  # shared between samples: painters and transforms must copy
        if self.keep:
            self._images[path] = image
        return image

    def mask(self, path: str) -> np.ndarray:
        """(size, size) uint8 {0, 255}; an empty path gives an empty mask."""
        if not path:
            return np.zeros((self.size, self.size), np.uint8)
        cached = self._masks.get(path)
        if cached is not None:
            return cached
        mask = read_mask(path, (self.size, self.size))
        mask.setflags(write=False)
        if self.keep:
            self._masks[path] = mask
        return mask

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
    """Validation or test images: resized and normalised, nothing random. Items: (image, index)."""

    def __init__(self, paths: list[str], augment: AugmentConfig, store: ImageStore):
        self.paths = list(paths)
        self.store = store
        self.transform = build_eval_transform(augment)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.store.image(self.paths[index]))["image"], index


def _rotate(image: np.ndarray, angle: float, interpolation: int) -> np.ndarray:
    if angle % 360 == 0:
        return image
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)
    # Reflected borders: the corners a rotation uncovers show (mirrored) surface, never black.
    return cv2.warpAffine(image, matrix, (w, h), flags=interpolation, borderMode=cv2.BORDER_REFLECT_101)


class TrainDataset(Dataset):
    """One epoch of the fold's training set: every normal once, defect copies up to
    `oversample.defect_ratio` (flips x rotations every `angle_step` degrees), and painted positives
    (`positives.ratio` per normal) made from the fold's own normals. Call `set_epoch` before each epoch.

    Items: dict(image float (3, H, W), label float, mask float (1, H, W) in [0, 1], has_mask bool).
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
        over = cfg.oversample
        self.angles = list(range(0, 360, over.angle_step))
        self.variants = [(angle, flip) for flip in ((False, True) if over.flips else (False,)) for angle in self.angles]
        n_normal = len(self.normal_idx)
        self.n_defect_copies = (int(round(over.defect_ratio * n_normal)) if over.defect_ratio > 0
                                else len(self.defect_idx))
        self.n_painted = int(round(cfg.positives.ratio * n_normal))
        self._variant_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        if over.mode == "cached" and over.defect_ratio > 0:
            # every flip x rotation of every defect, made once here, before DataLoader workers fork
            pairs = [(int(row), v) for row in self.defect_idx for v in range(len(self.variants))]
            for row, variant in tqdm(pairs, desc="defect copies", leave=False, disable=len(pairs) < 200):
                self._defect_variant(row, variant)
        self.epoch = -1
        self.set_epoch(0)

    # -- the epoch plan: which image each position shows (deterministic in seed and epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        rng = np.random.default_rng([self.cfg.seed, epoch, 7])
        sources = [np.full(len(self.normal_idx), NORMAL), np.full(self.n_defect_copies, DEFECT),
                   np.full(self.n_painted, PAINTED)]
        rows = [self.normal_idx, self._defect_copy_rows(rng), rng.choice(self.normal_idx, self.n_painted)]
        variants = [np.zeros(len(self.normal_idx), int), self._defect_copy_variants(rng, rows[1]),
                    np.zeros(self.n_painted, int)]
        order = rng.permutation(len(self.normal_idx) + self.n_defect_copies + self.n_painted)
        self.plan_source = np.concatenate(sources)[order]
        self.plan_row = np.concatenate(rows).astype(int)[order]
        self.plan_variant = np.concatenate(variants).astype(int)[order]

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
        return ", ".join(f"{counts[s]} {_SOURCE_NAMES[s] if counts[s] == 1 else _PLURALS[s]}" for s in (NORMAL, DEFECT, PAINTED))

    # -- one sample

    def _defect_variant(self, row: int, variant: int) -> tuple[np.ndarray, np.ndarray]:
        key = (row, variant)
        if key in self._variant_cache:
            return self._variant_cache[key]
        angle, flip = self.variants[variant]
        image, mask = self.store.image(self.paths[row]), self.store.mask(self.mask_paths[row])
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = _rotate(np.ascontiguousarray(image), angle, cv2.INTER_LINEAR)
        mask = _rotate(np.ascontiguousarray(mask), angle, cv2.INTER_NEAREST)
        if self.cfg.oversample.mode == "cached":
            self._variant_cache[key] = (image, mask)
        return image, mask

    def _severity_range(self) -> tuple[float, float]:
        low, high = self.cfg.positives.severity
        if self.cfg.positives.curriculum:
            high = low + (high - low) * min(1.0, (self.epoch + 1) / self.cfg.train.epochs)
        return low, high

    def _painted(self, row: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        base = self.store.image(self.paths[row])
        grey = bool(np.array_equal(base[..., 0], base[..., 1]) and np.array_equal(base[..., 0], base[..., 2]))
        image = base[..., 0] if grey else base  # grey data gets grey defects
        kinds = self.cfg.positives.kinds
        kind = kinds[int(rng.integers(len(kinds)))]
        severity = float(rng.uniform(*self._severity_range()))
        if kind == "cutpaste" or kind == "cutpaste_scar":
            painted, mask = cutpaste(image, rng, scar=kind == "cutpaste_scar")
        elif kind == "perlin":
            texture = None
            if self.cfg.positives.texture_source == "dataset":
                others = self.normal_idx[self.normal_idx != row]
                if len(others):
                    texture = self.store.image(self.paths[int(rng.choice(others))])
                    texture = texture[..., 0] if grey else texture
            painted, mask = perlin_anomaly(image, rng, texture_source=texture, beta=1.0 - 0.9 * severity)
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
        if source == NORMAL:
            image, mask = self.store.image(self.paths[row]), self.store.mask("")
        elif source == DEFECT:
            image, mask = self._defect_variant(row, int(self.plan_variant[position]))
        else:
            image, mask = self._painted(row, np.random.default_rng(paint_seed))
        has_mask = source != DEFECT or bool(self.mask_paths[row])
        augment_rng = np.random.default_rng(augment_seed)
        self.transform.set_random_state(augment_rng, random.Random(int(augment_rng.integers(2**63))))
        if self.with_masks:
            out = self.transform(image=image, mask=np.array(mask))  # writable: becomes a tensor
            mask_tensor = out["mask"].float().div_(255.0).unsqueeze(0)
        else:
            out = self.transform(image=image)
            mask_tensor = torch.zeros(1, 1, 1)
        return {"image": out["image"], "label": torch.tensor(float(source != NORMAL)),
                "mask": mask_tensor, "has_mask": torch.tensor(has_mask)}

    def sources(self) -> list[tuple[str, str]]:
        """(kind, image path) of every sample this epoch: for audits such as the no-leak test."""
        return [(_SOURCE_NAMES[int(s)], self.paths[int(r)]) for s, r in zip(self.plan_source, self.plan_row)]
