"""Classifier data: no-leak oversampling and painting, the expansion recipe, deterministic eval, masks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import competition.classifier.data as data_module
from competition.classifier.data import (
    DEFECT,
    NORMAL,
    PAINTED,
    EvalDataset,
    ImageStore,
    TrainDataset,
    build_train_transform,
    fold_rows,
)
from competition.config import PAINTED_KINDS
from competition.folds import read_folds

PLAIN = ["augment.mean=[0.0, 0.0, 0.0]", "augment.std=[1.0, 1.0, 1.0]"]  # tensors = pixels / 255


def _cfg(tiny_cfg, *overrides):
    from conftest import ROOT

    from competition.config import load_config  # rebuild with overrides on top of the test config

    sets = [f"paths.data={tiny_cfg.paths.data}", f"paths.work={tiny_cfg.paths.work}"] + list(overrides)
    return load_config(ROOT / "configs" / "quick.yaml", sets)


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.mark.parametrize("fold", [0, 2])
def test_no_copy_of_a_validation_image_ever_enters_training(tiny_cfg, monkeypatch, fold):
    cfg = _cfg(tiny_cfg, "positives.ratio=1.0", "positives.texture_source=dataset", "oversample.defect_ratio=0.5")
    train_rows, val_rows = fold_rows(read_folds(cfg), fold)
    val_paths = set(val_rows["path"].astype(str))
    assert not val_paths & set(train_rows["path"].astype(str))

    read = []  # every file any training sample decodes, through the one loader
    real_read_image, real_read_mask = data_module.read_image, data_module.read_mask
    monkeypatch.setattr(data_module, "read_image", lambda p: read.append(str(p)) or real_read_image(p))
    monkeypatch.setattr(data_module, "read_mask", lambda p, size=None: read.append(str(p)) or real_read_mask(p, size))
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size, keep=False), with_masks=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        kinds = {kind for kind, _ in dataset.sources()}
        assert kinds == {"normal", "defect copy", "painted positive"}
        assert not val_paths & {path for _, path in dataset.sources()}
        for i in range(len(dataset)):
            dataset[i]
    assert read and not val_paths & set(read)
    assert set(read) <= set(train_rows["path"].astype(str)) | set(train_rows["mask_path"].astype(str))


def test_painted_positives_come_from_training_normals_pixel_for_pixel(tiny_cfg):
    # the painters only: a transplant is Poisson-blended over a margin around its mask (tests/test_transplant.py)
    cfg = _cfg(tiny_cfg, "positives.ratio=1.0", "augment.train=[]", *PLAIN,
               f"positives.kinds=[{', '.join(PAINTED_KINDS)}]")
    train_rows, val_rows = fold_rows(read_folds(cfg), 1)
    store = ImageStore(cfg.model.image_size)
    dataset = TrainDataset(train_rows, cfg, store, with_masks=True)
    val_images = [store.image(p).astype(int) for p in val_rows["path"]]
    painted = np.flatnonzero(dataset.plan_source == PAINTED)
    assert len(painted) == len(dataset.normal_idx)
    for position in painted:
        item = dataset[position]
        pixels, mask = _pixels(item["image"]), item["mask"][0].numpy() > 0.5
        base = store.image(dataset.paths[dataset.plan_row[position]])
        assert item["label"] == 1 and item["has_mask"] and mask.any()
        assert np.array_equal(pixels[~mask], base[~mask])  # outside its mask, the training normal itself
        assert all(np.abs(pixels.astype(int) - v).mean() > 1 for v in val_images)


def test_defect_oversampling_recipe(tiny_cfg):
    cfg = _cfg(tiny_cfg, "oversample.defect_ratio=0.5", "oversample.angle_step=30", "positives.ratio=0")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size))
    n_normal = len(dataset.normal_idx)
    copies = dataset.plan_source == DEFECT
    assert (dataset.plan_source == NORMAL).sum() == n_normal
    assert copies.sum() == round(0.5 * n_normal)
    assert len(dataset.variants) == 2 * 12  # flips x angles 0, 30, ..., 330
    assert {angle for angle, _ in dataset.variants} == set(range(0, 360, 30))
    per_defect = np.bincount(dataset.plan_row[copies], minlength=len(train_rows))[dataset.defect_idx]
    assert per_defect.max() - per_defect.min() <= 1  # every defect equally often
    for row in dataset.defect_idx:  # and as distinct variants
        variants = dataset.plan_variant[copies][dataset.plan_row[copies] == row]
        assert len(set(variants)) == len(variants)
    assert sorted(dataset.plan_row[dataset.plan_source == NORMAL]) == sorted(dataset.normal_idx)


def test_expansion_off_shows_each_defect_once(tiny_cfg):
    cfg = _cfg(tiny_cfg, "oversample.defect_ratio=0", "positives.ratio=0")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    dataset = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size))
    copies = dataset.plan_source == DEFECT
    assert sorted(dataset.plan_row[copies]) == sorted(dataset.defect_idx)
    assert not dataset.plan_variant[copies].any()


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_defect_variants_are_the_flips_and_rotations(tiny_cfg, mode):
    cfg = _cfg(tiny_cfg, "oversample.angle_step=90", f"oversample.mode={mode}")
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    store = ImageStore(cfg.model.image_size)
    dataset = TrainDataset(train_rows, cfg, store)
    row = int(dataset.defect_idx[0])
    image, mask = store.image(dataset.paths[row]), store.mask(dataset.mask_paths[row])
    for variant, (angle, flip) in enumerate(dataset.variants):
        expected_image, expected_mask = (image[:, ::-1], mask[:, ::-1]) if flip else (image, mask)
        got_image, got_mask = dataset._defect_variant(row, variant)
        assert np.array_equal(got_image, np.rot90(expected_image, angle // 90))  # cv2 turns anticlockwise
        assert np.array_equal(got_mask, np.rot90(expected_mask, angle // 90))


def test_training_epochs_are_deterministic_and_differ_between_epochs(tiny_cfg):
    cfg = _cfg(tiny_cfg)
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    first = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size), with_masks=True)
    second = TrainDataset(train_rows, cfg, ImageStore(cfg.model.image_size), with_masks=True)
    torch.manual_seed(0), np.random.seed(0)
    a = [first[i]["image"] for i in range(8)]
    torch.manual_seed(1), np.random.seed(1)  # global RNGs play no part
    b = [second[i]["image"] for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    second.set_epoch(1)
    assert not np.array_equal(first.plan_row, second.plan_row)


def test_eval_pipeline_is_deterministic_and_does_not_augment(tiny_cfg):
    cfg = _cfg(tiny_cfg, *PLAIN)
    _, val_rows = fold_rows(read_folds(cfg), 0)
    paths = val_rows["path"].astype(str).tolist()
    cached = EvalDataset(paths, cfg.augment, ImageStore(cfg.model.image_size, keep=True))
    uncached = EvalDataset(paths, cfg.augment, ImageStore(cfg.model.image_size, keep=False))
    for i in range(len(paths)):
        torch.manual_seed(i), np.random.seed(i)
        x, index = cached[i]
        assert index == i and x.shape == (3, cfg.model.image_size, cfg.model.image_size)
        assert torch.equal(x, cached[i][0]) and torch.equal(x, uncached[i][0])
        assert np.array_equal(_pixels(x), cached.store.image(paths[i]))  # only resized, never flipped
    assert all(type(t).__name__ in {"Normalize", "ToTensorV2"} for t in cached.transform.transforms)


def test_masks_follow_the_image_through_augmentation_and_grey_stays_grey(tmp_path):
    """A white square on black (grey PNG) with its mask: after flips/rotations/oversampling, the
    bright pixels are exactly the mask; painted positives on grey images stay grey."""
    from conftest import ROOT

    from competition.config import load_config

    rows, rng = [], np.random.default_rng(0)
    for i in range(6):
        image = rng.integers(0, 100, (64, 64)).astype(np.uint8)  # dim grey noise: paintable, below 127
        mask = np.zeros((64, 64), np.uint8)
        if i < 2:  # even bounds: the 2x downscale to 32 px keeps the edge sharp
            image[8 + 2 * i:24 + 2 * i, 16:40], mask[8 + 2 * i:24 + 2 * i, 16:40] = 255, 255
        Image.fromarray(image).save(tmp_path / f"im{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append({"image_id": f"im{i}", "path": str(tmp_path / f"im{i}.png"), "label": int(i < 2),
                     "mask_path": str(tmp_path / f"m{i}.png") if i < 2 else "", "fold": 1})
    cfg = load_config(ROOT / "configs" / "quick.yaml", [
        "model.image_size=32", "oversample.defect_ratio=2.0", "oversample.angle_step=90", "positives.ratio=1.0",
        "augment.train=[{name: HorizontalFlip, p: 0.5}, {name: RandomRotate90, p: 1.0}]", *PLAIN])
    dataset = TrainDataset(pd.DataFrame(rows), cfg, ImageStore(32), with_masks=True)
    for i in range(len(dataset)):
        item = dataset[i]
        pixels, mask = _pixels(item["image"]), item["mask"][0].numpy()
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0.0, 1.0}
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
        if dataset.plan_source[i] == DEFECT:
            assert np.array_equal(pixels[..., 0] > 127, mask > 0.5)
        if dataset.plan_source[i] == NORMAL:
            assert not mask.any() and item["has_mask"]


def test_unknown_transform_is_named():
    from competition.config import AugmentConfig

    with pytest.raises(ValueError, match=r"augment.train\[1\]: albumentations has no transform named 'Flipp'"):
        build_train_transform(AugmentConfig(train=[{"name": "HorizontalFlip"}, {"name": "Flipp"}]))


def test_painted_kinds_match_the_painters():
    from competition.data.painters import DEFECT_KINDS

    assert set(PAINTED_KINDS) == set(DEFECT_KINDS) | {"cutpaste", "cutpaste_scar", "perlin"}


@pytest.mark.parametrize("tiles", [[], ["model.tiles.enabled=true", "model.tiles.size=24",
                                         "oversample.normal_tiles=0"]], ids=["images", "tiles"])
def test_frequency_of_use_shows_every_normal_before_any_repeats(tiny_cfg, tiles):
    cfg = _cfg(tiny_cfg, "oversample.normals_per_epoch=0.3", "model.image_size=32", *tiles)
    train_rows, _ = fold_rows(read_folds(cfg), 0)
    dataset = TrainDataset(train_rows, cfg, ImageStore(data_module.classifier_geometry(cfg)))
    full = TrainDataset(train_rows, _cfg(tiny_cfg, "model.image_size=32", *tiles),
                        ImageStore(data_module.classifier_geometry(cfg)))
    per_epoch = dataset.n_normal
    assert per_epoch == round(0.3 * full.n_normal) and dataset.n_painted < full.n_painted
    units = full.normal_units if not tiles else int(full.tile_counts[full.normal_idx].sum())
    epochs = []
    for epoch in range(-(-units // per_epoch)):
        dataset.set_epoch(epoch)
        normal = dataset.plan_source == NORMAL
        assert normal.sum() == per_epoch
        epochs.append(list(zip(dataset.plan_row[normal], dataset.plan_tile[normal])))
    within = [unit for shown in epochs[:units // per_epoch] for unit in shown]
    assert len(set(within)) == len(within)  # nothing repeats within a pass over the normals
    assert len({unit for shown in epochs for unit in shown}) == units  # and the pass shows every one
    again = TrainDataset(train_rows, cfg, ImageStore(data_module.classifier_geometry(cfg)))
    again.set_epoch(3)
    dataset.set_epoch(3)
    assert (again.plan_row == dataset.plan_row).all() and (again.plan_tile == dataset.plan_tile).all()
