"""Artificial defects for judging zoo models where real ones are scarce, without touching held-out data.

`painted_copies` paints one random defect (the foundation's painters: drawn defects, CutPaste,
DRAEM Perlin anomalies; or the kinds asked, transplanted real defects and NSA among them) onto each
of some normal images. `split_validation` gives trained models their validation signal inside the
training folds: a held-out slice of the training normals, the same images with painted defects, and
the real defects of the training folds (those with masks are also the transplant bank).
`split_defects` shares those real defects between a supervised model's training and its validation.
"""
from __future__ import annotations

import numpy as np

from competition.data.transplant import DefectBank, NormalPool
from competition.zoo.api import DefectSet, ImageSet, ValidationSet


def painted_copies(images: ImageSet, indices, seed: int, prefix: str = "painted", kinds: list[str] | None = None,
                   bank: DefectBank | None = None, pool: NormalPool | None = None) -> tuple[ImageSet, list[np.ndarray]]:
    """One painted defect per image of `indices` (`painters.random_anomaly` over `kinds`; None = its own
    mix); returns the painted images and their masks. transplant reads `bank`, nsa `pool`."""
    from competition.data.anomalies import random_anomaly

    rng = np.random.default_rng(seed)
    painted, masks, ids = [], [], []
    for i in indices:
        image, mask = random_anomaly(images.read(int(i)), rng, kinds=kinds, bank=bank, pool=pool,
                                     exclude=images.ids[int(i)])
        painted.append(np.ascontiguousarray(image, dtype=np.uint8))
        masks.append(mask)
        ids.append(f"{prefix}:{images.ids[int(i)]}")
    return ImageSet(painted, ids), masks


def defect_masks(rows) -> list[np.ndarray | None]:
    """The masks of index/folds rows (`mask_path`; None where a defect has none)."""
    from competition.data.images import read_mask

    return [read_mask(p) if isinstance(p, str) and p else None for p in rows["mask_path"]]


def held_out_indices(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(held, kept) positions of `n` items: `share` of them held out (rounded, at least one of two or more, never
    all, none when `share` is 0), drawn by `seed`; both in input order."""
    n_held = min(max(1, int(round(share * n))), n - 1) if n > 1 and share > 0 else 0
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())


def split_validation(normals: ImageSet, defects: ImageSet | None, share: float, seed: int,
                     defect_masks: list[np.ndarray | None] | None = None,
                     kinds: list[str] | None = None) -> tuple[ImageSet, ValidationSet]:
    """(normals to fit on, validation set): `share` of the normals held out, with painted copies of them.

    The real `defects` (training folds only) join the validation set as they are; painted copies
    draw from `kinds` (None: the painters' own mix). transplant moves those of the real defects
    that have a mask; nsa cuts patches from the other held-out normals (all normals if one is held).
    """
    held, kept = held_out_indices(len(normals), share, seed)
    held_set = normals.subset(held)
    bank = pool = None
    if kinds is not None and "transplant" in kinds:
        masks = defect_masks if defects is not None and defect_masks is not None else []
        bank = DefectBank.from_pairs((defects.ids[i], defects.read(i), mask) for i, mask in enumerate(masks))
    if kinds is not None and "nsa" in kinds:
        sources = held_set if len(held_set) > 1 else normals
        position = {image_id: i for i, image_id in enumerate(sources.ids)}
        pool = NormalPool(list(sources.ids), lambda image_id: sources.read(position[image_id]))
    painted, painted_masks = painted_copies(held_set, range(len(held_set)), seed + 1, kinds=kinds, bank=bank, pool=pool)
    images = held_set + painted
    labels = [0] * len(held_set) + [1] * len(painted)
    kinds = ["normal"] * len(held_set) + ["painted"] * len(painted)
    masks: list[np.ndarray | None] = [None] * len(held_set) + list(painted_masks)
    if defects is not None and len(defects):
        images = images + defects
        labels += [1] * len(defects)
        kinds += ["real"] * len(defects)
        masks += list(defect_masks) if defect_masks is not None else [None] * len(defects)
    return normals.subset(kept), ValidationSet(images, np.asarray(labels, dtype=int), kinds, masks)


def split_defects(defects: ImageSet, masks: list[np.ndarray | None] | None, share: float,
                  seed: int) -> tuple[DefectSet, DefectSet]:
    """(defects to train on, defects to validate on): the training folds' real defects of a model that trains
    on them, split so that no defect is both trained on and judged on.

    `share` of them (rounded, at least one when there are two or more, never all) go to validation, drawn
    by `seed`; a single defect is trained on (the validation then has painted defects only). Both parts
    keep the input order and their masks (None where unknown).
    """
    masks = list(masks) if masks is not None else [None] * len(defects)
    held, kept = held_out_indices(len(defects), share, seed)
    return (DefectSet(defects.subset(kept), [masks[i] for i in kept]),
            DefectSet(defects.subset(held), [masks[i] for i in held]))
