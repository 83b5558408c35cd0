"""The classifier's input geometry: letterboxed samples keep their masks and valid maps aligned, tiled
defect images give positive tiles exactly where the mask is, padding carries no mask loss, and a tiled
fold trains and writes one score per image."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, quick_config
from PIL import Image

from competition.classifier.data import (
    DEFECT,
    NORMAL,
    PAINTED,
    WHOLE_IMAGE,
    EvalDataset,
    ImageStore,
    TrainDataset,
    classifier_geometry,
    tile_defect_labels,
)
from competition.classifier.train import image_scores, load_fold_classifier, mask_loss, train_fold
from competition.config import load_config
from competition.folds import load_index, read_folds, write_folds
from competition.metrics import auroc
from competition.preprocess import canvas_box, fit_to_canvas, tile_boxes

PLAIN = ["augment.mean=[0.0, 0.0, 0.0]", "augment.std=[1.0, 1.0, 1.0]"]  # tensors = pixels / 255
HEIGHT, WIDTH = 64, 128  # a wide image: letterboxed to 32, its content is 16 x 32 (a 4x shrink)
DEFECT_BOX = (16, 64, 32, 96)  # top, left, bottom, right of the defect; multiples of 4 keep edges sharp


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _wide_set(tmp_path, n: int = 6, defects: int = 2) -> pd.DataFrame:
    """Grey noise below 100 (paintable), the first `defects` with a white rectangle and its mask."""
    rows, rng = [], np.random.default_rng(0)
    top, left, bottom, right = DEFECT_BOX
    for i in range(n):
        image = rng.integers(0, 100, (HEIGHT, WIDTH)).astype(np.uint8)
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        if i < defects:
            image[top:bottom, left:right], mask[top:bottom, left:right] = 255, 255
        Image.fromarray(image).save(tmp_path / f"im{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append({"image_id": f"im{i}", "path": str(tmp_path / f"im{i}.png"), "label": int(i < defects),
                     "mask_path": str(tmp_path / f"m{i}.png") if i < defects else "", "fold": 1})
    return pd.DataFrame(rows)


def _config(*overrides: str):
    return load_config(ROOT / "configs" / "quick.yaml", ["model.image_size=32", *PLAIN, *overrides])


def test_letterboxed_samples_keep_mask_and_valid_map_aligned(tmp_path):
    """Through oversampling rotations, flips and quarter turns, the bright pixels are exactly the mask and
    the valid map covers exactly the content's area; evaluation shows the letterboxed canvas itself."""
    rows = _wide_set(tmp_path)
    cfg = _config("model.resize=letterbox", "oversample.defect_ratio=2.0", "oversample.angle_step=90",
                  "positives.ratio=1.0",
                  "augment.train=[{name: HorizontalFlip, p: 0.5}, {name: RandomRotate90, p: 1.0}]")
    store = ImageStore(classifier_geometry(cfg))
    dataset = TrainDataset(rows, cfg, store, with_masks=True)
    _, _, content_h, content_w = canvas_box(HEIGHT, WIDTH, store.geometry)
    assert store.image(rows["path"][0]).shape[:2] == (content_h, content_w) == (16, 32)
    seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        pixels, mask, valid = _pixels(item["image"]), item["mask"][0].numpy(), item["valid"][0].numpy()
        assert pixels.shape[:2] == mask.shape == valid.shape == (32, 32)
        assert set(np.unique(valid)) == {0.0, 1.0} and valid.sum() == content_h * content_w
        source = dataset.plan_source[i]
        seen.add(source)
        if source == DEFECT:  # mirrored padding mirrors image and mask alike: aligned everywhere
            assert np.array_equal(pixels[..., 0] > 127, mask > 0.5)
            assert (mask * valid).sum() > 0
        elif source == NORMAL:
            assert not mask.any()
    assert seen == {NORMAL, DEFECT, PAINTED}
    evaluation = EvalDataset(list(rows["path"]), cfg.augment, store)
    image, index = evaluation[0]
    expected, _ = fit_to_canvas(np.asarray(Image.open(rows["path"][0]).convert("RGB")), store.geometry)
    assert index == 0 and np.array_equal(_pixels(image), expected)


def test_padding_carries_no_mask_loss():
    """With a valid map, logits on padding change nothing; without one every pixel counts."""
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:8, 4:8] = 1.0
    valid = torch.zeros(2, 1, 16, 16)
    valid[:, :, :, :10] = 1.0  # columns 10.. are padding: map columns 5.. on the 8 x 8 map
    has_mask = torch.tensor([True, True])
    changed = logits.clone()
    changed[..., 5:] += 10.0
    assert torch.allclose(mask_loss(logits, masks, has_mask, valid), mask_loss(changed, masks, has_mask, valid))
    assert not torch.allclose(mask_loss(logits, masks, has_mask), mask_loss(changed, masks, has_mask))


def _rectangle_overlap(box, rect) -> int:
    top, left, bottom, right = box
    rtop, rleft, rbottom, rright = rect
    return max(0, min(bottom, rbottom) - max(top, rtop)) * max(0, min(right, rright) - max(left, rleft))


def test_a_tiled_defect_image_has_positive_tiles_exactly_where_its_mask_is(tmp_path):
    """Tiles at native scale: the positive tiles are those the defect rectangle overlaps by at least
    MIN_TILE_DEFECT_PX pixels (computed from the boxes alone), and every defect sample shows one of them
    with the bright pixels exactly on its mask; normal and painted samples are tiles of normals."""
    rows = _wide_set(tmp_path)
    cfg = _config("model.tiles.enabled=true", "model.tiles.size=32", "model.tiles.overlap=0.25",
                  "oversample.defect_ratio=2.0", "oversample.angle_step=360", "oversample.flips=false",
                  "positives.ratio=0.5", "oversample.normal_tiles=2", "augment.train=[]")
    store = ImageStore(classifier_geometry(cfg))
    boxes = tile_boxes(HEIGHT, WIDTH, store.geometry)
    assert len(boxes) > 4 and np.array_equal(store.boxes(rows["path"][0]), boxes)
    expected = np.array([_rectangle_overlap(box, DEFECT_BOX) >= 8 for box in boxes])
    assert 0 < expected.sum() < len(boxes)
    mask = np.asarray(Image.open(rows["mask_path"][0]))
    assert np.array_equal(tile_defect_labels(mask, boxes), expected)
    assert not tile_defect_labels(np.zeros_like(mask), boxes).any()

    dataset = TrainDataset(rows, cfg, store, with_masks=True)
    assert np.array_equal(dataset.positive_tiles[0], np.flatnonzero(expected))
    n_normal_tiles = 4 * 2  # four normals, two tiles each per epoch
    assert np.bincount(dataset.plan_source, minlength=3).tolist() == [n_normal_tiles, 2 * n_normal_tiles,
                                                                       n_normal_tiles // 2]
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            source, row, tile = dataset.plan_source[i], dataset.plan_row[i], dataset.plan_tile[i]
            item = dataset[i]
            pixels, item_mask = _pixels(item["image"]), item["mask"][0].numpy()
            assert pixels.shape[:2] == (32, 32) and item["valid"].all()  # full tiles at native scale
            if source == DEFECT:
                assert expected[tile] and item["label"] == 1
                assert np.array_equal(pixels[..., 0] > 127, item_mask > 0.5) and item_mask.any()
                top, left, bottom, right = boxes[tile]
                assert np.array_equal(item_mask > 0.5, mask[top:bottom, left:right] > 0)
            else:
                assert rows["label"][row] == 0 and 0 <= tile < len(boxes)
                assert (item["label"] == 1) == (source == PAINTED)


def test_a_defect_without_a_mask_is_shown_whole_and_never_as_a_negative(tmp_path):
    rows = _wide_set(tmp_path)
    rows.loc[1, "mask_path"] = ""
    cfg = _config("model.tiles.enabled=true", "model.tiles.size=32", "oversample.defect_ratio=1.0",
                  "positives.ratio=0.0", "augment.train=[]")
    dataset = TrainDataset(rows, cfg, ImageStore(classifier_geometry(cfg)), with_masks=True)
    assert "1 defect(s) without a tile holding a mask, shown whole" in dataset.describe()
    weak = (dataset.plan_source == DEFECT) & (dataset.plan_row == 1)
    assert weak.any() and (dataset.plan_tile[weak] == WHOLE_IMAGE).all()
    assert set(dataset.plan_row[dataset.plan_source == NORMAL]) == {2, 3, 4, 5}
    item = dataset[int(np.flatnonzero(weak)[0])]
    assert item["label"] == 1 and not item["has_mask"]
    assert item["valid"][0].sum() == 16 * 32  # the whole 64 x 128 image letterboxed onto the canvas


@pytest.mark.slow
@pytest.mark.parametrize("geometry", [["model.tiles.enabled=true", "model.tiles.size=24", "train.tta=flips"],
                                      ["model.resize=letterbox", "model.tiles.reduce=topk_mean"]])
def test_a_tiled_or_letterboxed_fold_trains_and_writes_one_row_per_image(tiny_data, tmp_path, geometry):
    cfg = quick_config(tiny_data, tmp_path, "model.name=test_efficientnet", "model.image_size=32",
                       "train.batch_size=8", "train.epochs=1", "train.threads=1", *geometry)
    write_folds(cfg)
    index = load_index(cfg)
    folds, test_rows = read_folds(cfg, index), index[index["split"] == "test"]
    summary = train_fold(cfg, 0, folds, test_rows, ImageStore(32), torch.device("cpu"))  # store rebuilt
    out = tmp_path / "runs" / cfg.experiment / cfg.model.name / "fold0"
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    test = pd.read_csv(out / "test.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(folds.loc[folds["fold"] == 0, "image_id"])
    assert list(test["image_id"]) == list(test_rows["image_id"])
    assert oof["score"].between(0, 1).all() and test["score"].between(0, 1).all()
    assert summary["epochs_run"] == 1


@pytest.mark.slow
def test_a_denser_scoring_grid_writes_the_predictions_and_leaves_validation_on_the_training_grid(tiny_data, tmp_path):
    """`model.tiles.predict_overlap`: each epoch's validation (the checkpoint's choice) scores the training
    grid; oof.csv and test.csv are best.pt's scores on the denser grid, which holds more tiles."""
    cfg = quick_config(tiny_data, tmp_path, "model.name=test_efficientnet", "model.image_size=32",
                       "train.batch_size=8", "train.epochs=1", "train.threads=1", "model.tiles.enabled=true",
                       "model.tiles.size=24", "model.tiles.overlap=0.0", "model.tiles.predict_overlap=0.5")
    write_folds(cfg)
    index = load_index(cfg)
    folds, test_rows = read_folds(cfg, index), index[index["split"] == "test"]
    train_fold(cfg, 0, folds, test_rows, ImageStore(classifier_geometry(cfg)), torch.device("cpu"))
    out = tmp_path / "runs" / cfg.experiment / cfg.model.name / "fold0"
    model = load_fold_classifier(cfg, out, torch.device("cpu"))
    training, dense = ImageStore(classifier_geometry(cfg)), ImageStore(classifier_geometry(cfg, scoring=True))
    val = folds[folds["fold"] == 0]
    val_paths, test_paths = val["path"].astype(str).tolist(), test_rows["path"].astype(str).tolist()
    assert len(dense.boxes(test_paths[0])) > len(training.boxes(test_paths[0]))

    def scores(paths, store):
        return image_scores(model, paths, cfg, store, torch.device("cpu"))

    test = pd.read_csv(out / "test.csv", dtype={"image_id": str})
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str}).set_index("image_id").loc[val["image_id"]]
    np.testing.assert_allclose(test["score"], scores(test_paths, dense), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(oof["score"], scores(val_paths, dense), rtol=1e-5, atol=1e-7)
    assert not np.allclose(test["score"], scores(test_paths, training), rtol=1e-5, atol=1e-7)
    history = pd.read_csv(out / "history.csv")
    assert history["val_auroc"].iloc[-1] == pytest.approx(auroc(val["label"], scores(val_paths, training)))
    assert history["val_auroc"].iloc[-1] != pytest.approx(auroc(val["label"], scores(val_paths, dense)))


def test_predict_overlap_is_a_fraction_below_one():
    with pytest.raises(ValueError, match="predict_overlap"):
        _config("model.tiles.predict_overlap=1.0")
