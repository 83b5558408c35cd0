"""The input geometry: letterbox canvases keep the aspect and carry masks along exactly; tiles cover
every pixel and stitch back; maps of tiled and letterboxed inputs land on their masks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from competition.preprocess import (
    Geometry,
    canvas_box,
    canvas_to_image,
    fit_mask_to_canvas,
    fit_to_canvas,
    image_tiles,
    reduce_tile_scores,
    resize_square,
    scaled_shape,
    scaled_to_image,
    stitch_maps,
    tile_boxes,
)


def _image_with_square(height: int, width: int, top: int, left: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[top:top + side, left:left + side] = 255
    mask[top:top + side, left:left + side] = 255
    return image, mask


def test_square_is_resize_square():
    image = np.random.default_rng(1).integers(0, 256, (230, 282, 3), dtype=np.uint8)
    canvas, valid = fit_to_canvas(image, Geometry(image_size=96))
    assert np.array_equal(canvas, resize_square(image, 96)) and valid.all()


@pytest.mark.parametrize("shape", [(230, 282), (400, 100), (64, 64), (33, 200)])
def test_letterbox_keeps_aspect_and_valid_marks_the_image(shape):
    height, width = shape
    geometry = Geometry(image_size=128, resize="letterbox")
    image = np.full((height, width, 3), 200, np.uint8)
    canvas, valid = fit_to_canvas(image, geometry)
    assert canvas.shape == (128, 128, 3) and valid.shape == (128, 128)
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    content_h, content_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(content_h, content_w) == 128
    assert abs(content_h / content_w - height / width) < 2.5 / min(content_h, content_w)
    assert valid.sum() == content_h * content_w  # one rectangle
    assert (canvas == 200).all()  # mirrored padding: only image colours, no flat border colour


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_mask_follows_its_image(resize):
    image, mask = _image_with_square(230, 282, top=100, left=40, side=30)
    geometry = Geometry(image_size=96, resize=resize)
    canvas, valid = fit_to_canvas(image, geometry)
    canvas_mask, mask_valid = fit_mask_to_canvas(mask, geometry)
    assert np.array_equal(valid, mask_valid)
    assert set(np.unique(canvas_mask)) <= {0, 255}
    bright = canvas.min(axis=2) >= 200  # the drawn square in the image (interpolated edges excluded)
    marked = (canvas_mask == 255) & valid
    assert (bright & valid).sum() > 0
    assert marked[bright & valid].all()  # every fully bright pixel is in the mask
    assert np.isin(canvas[marked].min(axis=1), np.arange(128, 256)).mean() > 0.8


def test_canvas_map_returns_to_the_image():
    image, mask = _image_with_square(230, 282, top=100, left=40, side=30)
    geometry = Geometry(image_size=128, resize="letterbox")
    canvas_mask, _ = fit_mask_to_canvas(mask, geometry)
    back = canvas_to_image(canvas_mask.astype(np.float32) / 255, 230, 282, geometry)
    assert back.shape == (230, 282)
    assert ((back > 0.5) == (mask > 0)).mean() > 0.995
    top, left, h, w = canvas_box(230, 282, geometry)
    assert (w, h) == (128, round(230 * 128 / 282)) and left == 0 and top == (128 - h) // 2


@pytest.mark.parametrize("shape,scale", [((640, 640), 1.0), ((230, 282), 1.0), ((230, 282), 0.5),
                                         ((100, 400), 1.0), ((161, 159), 1.0)])
def test_tiles_cover_every_pixel_and_stay_inside(shape, scale):
    geometry = Geometry(tiles=True, tile_size=160, tile_overlap=0.25, tile_scale=scale)
    boxes = tile_boxes(*shape, geometry)
    scaled_h, scaled_w = scaled_shape(*shape, geometry)
    covered = np.zeros((scaled_h, scaled_w), int)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= scaled_h and 0 <= left < right <= scaled_w
        assert bottom - top == min(160, scaled_h) and right - left == min(160, scaled_w)
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    assert boxes[:, 2].max() == scaled_h and boxes[:, 3].max() == scaled_w  # the last tile is flush
    if shape == (640, 640):
        assert len(boxes) == 25  # 5 x 5 tiles of 160 with at least 40 px overlap


def test_stitching_an_images_own_tiles_gives_it_back():
    geometry = Geometry(tiles=True, tile_size=64, tile_overlap=0.3)
    pixel_map = np.random.default_rng(2).random((150, 217)).astype(np.float32)
    tiles, boxes = image_tiles(pixel_map, geometry)
    for reduce in ("max", "mean"):
        assert np.array_equal(stitch_maps(tiles, boxes, (150, 217), reduce=reduce), pixel_map)


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_maps_of_tiled_inputs_align_with_masks(resize):
    """Each tile goes to a model canvas; a 'model' that finds the bright square there gives maps that,
    stitched and scaled back, fall on the mask."""
    image, mask = _image_with_square(400, 300, top=250, left=170, side=24)
    geometry = Geometry(image_size=64, resize=resize, tiles=True, tile_size=96, tile_overlap=0.25, tile_scale=0.5)
    tiles, boxes = image_tiles(image, geometry)
    mask_tiles, mask_boxes = image_tiles(mask, geometry, nearest=True)
    assert np.array_equal(boxes, mask_boxes) and all(t.shape[:2] == m.shape for t, m in zip(tiles, mask_tiles))
    tile_maps = []
    for tile in tiles:
        canvas, valid = fit_to_canvas(tile, geometry)
        detected = (canvas.min(axis=2) >= 128).astype(np.float32) * valid  # padding never scores
        tile_maps.append(canvas_to_image(detected, tile.shape[0], tile.shape[1], geometry))
    stitched = stitch_maps(tile_maps, boxes, scaled_shape(400, 300, geometry))
    back = scaled_to_image(stitched, 400, 300)
    assert back.shape == mask.shape
    found = back > 0.5
    assert (found == (mask > 0)).mean() > 0.995
    assert found[mask > 0].mean() > 0.8 and (~found[mask == 0]).mean() > 0.995


def test_reduce_tile_scores():
    scores = [0.1, 0.9, 0.5, 0.7]
    assert reduce_tile_scores(scores, Geometry(tile_reduce="max")) == 0.9
    assert reduce_tile_scores(scores, Geometry(tile_reduce="topk_mean", tile_topk=2)) == pytest.approx(0.8)
    assert reduce_tile_scores(scores, Geometry(tile_reduce="topk_mean", tile_topk=9)) == pytest.approx(0.55)


def test_bad_geometry_names_the_value():
    with pytest.raises(ValueError, match="resize"):
        Geometry(resize="crop")
    with pytest.raises(ValueError, match="overlap"):
        Geometry(tile_overlap=1.0)


# ---------------------------------------------------------------- the zoo on letterboxed and tiled inputs

def _boards(count: int, rng: np.random.Generator, height: int = 96, width: int = 160) -> list[np.ndarray]:
    """Wide binary 'circuit boards': regular stripes with a little noise, of a non-square aspect."""
    boards = []
    for _ in range(count):
        board = np.zeros((height, width), np.uint8)
        board[:, (np.arange(width) // 6) % 2 == 0] = 255
        flips = rng.random((height, width)) < 0.002
        board[flips] = 255 - board[flips]
        boards.append(np.repeat(board[:, :, None], 3, axis=2))
    return boards


@pytest.mark.parametrize("name", ["padim-resnet18", "patchcore-resnet18"])
@pytest.mark.parametrize("layout", ["letterbox", "tiles"])
def test_zoo_models_on_letterboxed_and_tiled_inputs(name, layout, tmp_path):
    from competition.metrics import auroc
    from competition.zoo.api import ImageSet, ZooSettings
    from competition.zoo.components.features import FeatureExtractor
    from competition.zoo.registry import build_model, load_model

    rng = np.random.default_rng(3)
    fit = ImageSet(_boards(16, rng))
    normal = _boards(4, rng)
    defects, masks = [], []
    for board in _boards(4, rng):
        top, left = int(rng.integers(10, 70)), int(rng.integers(10, 130))
        board[top:top + 10, left:left + 10] = 255 - board[top:top + 10, left:left + 10]
        mask = np.zeros(board.shape[:2], np.uint8)
        mask[top:top + 10, left:left + 10] = 255
        defects.append(board)
        masks.append(mask)
    test = ImageSet(normal + defects)
    extra = {"resize": "letterbox"} if layout == "letterbox" else \
        {"resize": "square", "tiles": True, "tile_size": 64, "tile_overlap": 0.25}
    settings = ZooSettings(image_size=64, batch_size=8, cache_dir=str(tmp_path / "cache"), progress=False, **extra)
    model = build_model(name, settings).fit(fit)
    prediction = model.predict(test)
    assert prediction.scores.shape == (8,) and prediction.maps.shape == (8, 64, 64)
    assert auroc(np.r_[np.zeros(4), np.ones(4)], prediction.scores) >= 0.9
    whole = Geometry(image_size=64, resize=settings.resize)  # tiled maps come back on the whole image's canvas
    for anomaly_map, mask in zip(prediction.maps[4:], masks):
        back = canvas_to_image(anomaly_map, *mask.shape, whole)
        near = cv2.dilate(mask, np.ones((17, 17), np.uint8)) > 0
        assert back[mask > 0].max() > np.quantile(back[~near], 0.95)  # the map lights up on the defect
    model.save(tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt")
    assert np.allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)
    square = FeatureExtractor("resnet18", (2,), ZooSettings(image_size=64, cache_dir=str(tmp_path)))
    other = FeatureExtractor("resnet18", (2,), settings)
    assert square.key != other.key  # the feature cache never mixes geometries
