"""Transplanted real defects and NSA: masks aligned with what changed, never a validation image in a
training sample (classifier and zoo validation), a visible result on awkward images, and the fallbacks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import ROOT

import competition.classifier.data as data_module
import competition.data.images as images_module
from competition.classifier.data import PAINTED, ImageStore, TrainDataset, fold_rows
from competition.config import load_config
from competition.data.anomalies import paint_kind, random_anomaly
from competition.data.transplant import MIN_MARGIN_PX, DefectBank, NormalPool, nsa, transplant
from competition.folds import read_folds
from competition.zoo.api import ImageSet
from competition.zoo.validation import split_validation


def _cfg(tiny_cfg, *overrides):
    sets = [f"paths.data={tiny_cfg.paths.data}", f"paths.work={tiny_cfg.paths.work}"] + list(overrides)
    return load_config(ROOT / "configs" / "quick.yaml", sets)


def _texture(rng, size=64, sigma=1.5) -> np.ndarray:
    noise = rng.integers(60, 190, (size, size, 3)).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), sigma)


def _blob_defect(size=64, value=230):
    """A flat grey image with a bright rectangle and its exact mask."""
    image = np.full((size, size, 3), 110, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    image[24:32, 20:34] = value
    mask[24:32, 20:34] = 255
    return image, mask


# ---------------------------------------------------------------- transplant

def test_the_bank_keeps_masked_defects_only_one_piece_per_separate_defect():
    image, mask = _blob_defect()
    bank = DefectBank.from_pairs([("a", image, mask), ("b", image, None), ("c", image, np.zeros_like(mask))])
    assert bank.source_ids == ["a"] and bank.skipped == 2
    piece = bank.pieces[0]
    assert piece.defect.sum() == (mask > 0).sum()  # the whole defect, nothing else
    assert piece.region.sum() > piece.defect.sum() and not (piece.defect & ~piece.region).any()
    two = mask.copy()
    two[50:54, 50:56] = 255  # a second defect far from the first: cut and moved on its own
    pieces = DefectBank.from_pairs([("d", image, two)]).pieces
    assert [p.source_id for p in pieces] == ["d", "d"] and sorted(p.defect.sum() for p in pieces) == [24, 112]
    with pytest.raises(ValueError, match="defect a: mask is 8x8"):
        DefectBank.from_pairs([("a", image, np.zeros((8, 8), np.uint8))])


@pytest.mark.parametrize("size", [64, 20])  # Poisson blending, and the tiny image where alpha feathering takes over
def test_transplanted_mask_is_aligned_with_the_pasted_pixels(size):
    source, source_mask = _blob_defect()
    bank = DefectBank.from_pairs([("a", source, source_mask)])
    rng = np.random.default_rng(0)
    for _ in range(30):
        normal = np.full((size, size), 110, np.uint8)
        out, mask = transplant(normal, rng, bank, severity=0.0)
        assert out.shape == normal.shape and mask.shape == normal.shape and mask.dtype == np.uint8
        defect = mask > 0
        changed = np.abs(out.astype(int) - normal) > 40
        assert defect.any()
        # The bright pixels are the moved defect: inside its mask (one pixel of slack for interpolated edges) ...
        assert not (changed & ~cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool)).any()
        # ... and fill most of it.
        assert changed[defect].mean() > 0.6
        # Only the defect and its blending margin change.
        near = cv2.dilate(mask, np.ones((2 * MIN_MARGIN_PX + 3,) * 2, np.uint8)).astype(bool)
        assert not (out != normal)[~cv2.dilate(near.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)].any()


def test_transplant_on_texture_changes_the_masked_pixels_most():
    rng = np.random.default_rng(1)
    source, source_mask = _blob_defect()
    bank = DefectBank.from_pairs([("a", source, source_mask)])
    for _ in range(10):
        normal = _texture(rng)
        out, mask = transplant(normal, rng, bank, severity=0.0)
        diff = np.abs(out.astype(int) - normal).mean(axis=2)
        defect = mask > 0
        assert diff[defect].mean() > 3 * max(1.0, diff[~defect].mean())


# ---------------------------------------------------------------- NSA

def test_nsa_mask_is_what_changed_and_never_the_target_itself():
    rng = np.random.default_rng(2)
    images = {f"n{i}": _texture(rng, sigma=0.8 + i) for i in range(4)}
    read = []
    pool = NormalPool(list(images), lambda image_id: read.append(image_id) or images[image_id])
    for _ in range(10):
        out, mask = nsa(images["n0"], rng, pool, exclude="n0")
        changed = (out != images["n0"]).any(axis=2)
        assert (mask > 0).any() and not (changed & (mask == 0)).any()  # outside the mask: untouched
        assert changed[mask > 0].mean() > 0.5
    assert read and "n0" not in read


# ---------------------------------------------------------------- awkward images and fallbacks

@pytest.mark.parametrize("kind", ["transplant", "nsa"])
def test_flat_binary_and_tiny_images_always_get_a_visible_defect(kind):
    rng = np.random.default_rng(3)
    source, source_mask = _blob_defect()
    bank = DefectBank.from_pairs([("a", source, source_mask)])
    pool = NormalPool(["p", "q"], {"p": _texture(rng), "q": np.zeros((30, 40, 3), np.uint8)}.__getitem__)
    binary = (rng.random((48, 48)) > 0.5).astype(np.uint8) * 255
    for image in (np.zeros((64, 64), np.uint8), np.full((64, 64, 3), 255, np.uint8), binary,
                  np.full((5, 5), 128, np.uint8), np.zeros((1, 1, 3), np.uint8), np.full((9, 200), 40, np.uint8)):
        out, mask = paint_kind(image, kind, rng, bank=bank, pool=pool, exclude="p")
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert (mask > 0).any() and np.any(out[mask > 0] != image[mask > 0])


def test_an_empty_bank_or_pool_lets_a_painted_kind_stand_in():
    rng = np.random.default_rng(4)
    normal = _texture(rng)
    for out, mask in (transplant(normal, rng, DefectBank([])), transplant(normal, rng, None),
                      nsa(normal, rng, NormalPool(["self"], lambda _: normal), exclude="self")):
        assert (mask > 0).any() and np.any(out[mask > 0] != normal[mask > 0])


def test_random_anomaly_without_kinds_draws_as_before():
    image = _texture(np.random.default_rng(5))
    first = random_anomaly(image, np.random.default_rng(9))
    second = random_anomaly(image, np.random.default_rng(9), kinds=None, bank=DefectBank([]))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- no validation image reaches training

@pytest.mark.parametrize("fold", [0, 2])
def test_classifier_transplant_and_nsa_never_use_a_validation_image(tiny_cfg, monkeypatch, fold):
    cfg = _cfg(tiny_cfg, "positives.ratio=1.0", "positives.kinds=[transplant, nsa]")
    train_rows, val_rows = fold_rows(read_folds(cfg), fold)
    val_paths = set(val_rows["path"].astype(str)) | set(val_rows["mask_path"].astype(str)) - {""}
    train_defects = train_rows[train_rows["label"] == 1]
    train_normals = set(train_rows.loc[train_rows["label"] == 0, "path"].astype(str))

    read = []  # every file any training sample decodes, through the one loader
    real_read_image, real_read_mask = data_module.read_image, data_module.read_mask
    monkeypatch.setattr(data_module, "read_image", lambda p: read.append(str(p)) or real_read_image(p))
    monkeypatch.setattr(data_module, "read_mask", lambda p, size=None: read.append(str(p)) or real_read_mask(p, size))
    used = {"transplant": 0, "nsa": []}
    real_transplant = data_module.transplant

    def counting_transplant(*args, **kwargs):
        used["transplant"] += 1
        return real_transplant(*args, **kwargs)

    monkeypatch.setattr(data_module, "transplant", counting_transplant)
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size, keep=False), with_masks=True)
    assert set(dataset.defect_bank.source_ids) == set(train_defects.loc[train_defects["mask_path"] != "", "path"])
    assert set(dataset.normal_pool.ids) == train_normals
    pool_read = dataset.normal_pool.read
    dataset.normal_pool.read = lambda image_id: used["nsa"].append(image_id) or pool_read(image_id)
    for i in np.flatnonzero(dataset.plan_source == PAINTED):
        item = dataset[int(i)]
        assert item["has_mask"] and item["mask"].sum() > 0
    assert used["transplant"] > 0 and used["nsa"]
    assert set(used["nsa"]) <= train_normals
    assert read and not val_paths & set(read)
    assert set(read) <= set(train_rows["path"].astype(str)) | set(train_rows["mask_path"].astype(str))


def test_classifier_without_masked_defects_drops_transplant_and_says_so(tiny_cfg):
    cfg = _cfg(tiny_cfg, "positives.ratio=0.5", "positives.kinds=[transplant, scratch]")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    train_rows = train_rows.assign(mask_path="")
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size), with_masks=True)
    assert len(dataset.defect_bank) == 0 and dataset.kinds == ["scratch"]
    assert "transplant has no masked defect to move; scratch stand in" in dataset.describe()
    painted = np.flatnonzero(dataset.plan_source == PAINTED)[:3]
    assert all(dataset[int(i)]["mask"].sum() > 0 for i in painted)


def test_zoo_validation_transplants_and_nsa_read_training_fold_images_only(tiny_cfg, monkeypatch):
    folds = read_folds(tiny_cfg)
    train_rows = folds[folds["fold"] != 1]
    val_paths = set(folds.loc[folds["fold"] == 1, "path"].astype(str))
    normals, defects = train_rows[train_rows["label"] == 0], train_rows[train_rows["label"] == 1]
    read = []
    real_read_image = images_module.read_image
    monkeypatch.setattr(images_module, "read_image", lambda p: read.append(str(p)) or real_read_image(p))
    masks = [images_module.read_mask(p) if p else None for p in defects["mask_path"]]
    masks[0] = None  # a defect without mask: a real validation defect, never a transplant source
    fit, validation = split_validation(ImageSet.from_frame(normals), ImageSet.from_frame(defects), 0.2, 5,
                                       defect_masks=masks, kinds=["transplant", "nsa"])
    painted = [i for i, kind in enumerate(validation.kinds) if kind == "painted"]
    assert painted and all(validation.masks[i] is not None and validation.masks[i].any() for i in painted)
    assert read and set(read) <= set(train_rows["path"].astype(str)) and not val_paths & set(read)
    assert not set(fit.ids) & {validation.images.ids[i] for i, kind in enumerate(validation.kinds) if kind == "normal"}


def test_pretraining_refuses_transplant_and_paints_nsa_views():
    from competition.config import PretrainConfig
    from competition.pretrain import PaintedObjective, PretrainViews, normalisation, view_augmentation

    p = PretrainConfig(image_size=32)
    with pytest.raises(ValueError, match="transplant would put every fold's real defects"):
        PaintedObjective(p, kinds=["nsa", "transplant"])
    assert PaintedObjective(p, kinds=["nsa"]).kinds == ["nsa"] and PaintedObjective(p).kinds is None
    rng = np.random.default_rng(6)
    images = [_texture(rng, size=48) for _ in range(4)]
    views = PretrainViews(images, view_augmentation(p), normalisation([0.5] * 3, [0.25] * 3), painted=True,
                          painted_kinds=["nsa"], normal_indices=[0, 1, 2])
    item = views[0]
    assert item["painted_valid"] and item["painted"].shape == (3, 32, 32)
    assert views.normal_pool.ids == ["0", "1", "2"]
