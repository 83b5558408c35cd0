"""The trained zoo models and pretraining follow the input geometry: with `resize: letterbox`, every
image a trained model trains on, validates on and scores is letterboxed (aspect kept, padding
mirrored), and pretraining holds and monitors letterboxed images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import quick_config

from competition import pretrain
from competition.data.textures import make_texture
from competition.preprocess import Geometry, canvas_box, fit_to_canvas, resize_square
from competition.zoo.api import ImageSet, ZooSettings, unit_tensor
from competition.zoo.models.efficientad import _centre_crop_at_double_size
from competition.zoo.models.fastflow import FastFlow
from competition.zoo.registry import build_model
from competition.zoo.trained import fit_record

SIZE = 64
WIDE = (24, 64)  # (height, width): letterboxed onto 64 x 64, the image covers rows 20..43
LETTERBOX = Geometry(image_size=SIZE, resize="letterbox")
TINY_FASTFLOW = {"epochs": 1, "batch_size": 4, "flow_steps": 2, "hidden_ratio": 0.5}


def _wide_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_texture("wood", WIDE, rng) for _ in range(count)]


def _mirrored_about_the_content(canvas: torch.Tensor, top: int, bottom: int) -> bool:
    """(C, S, S): rows above `top` mirror the rows below it, rows from `bottom` mirror those above
    (BORDER_REFLECT_101, the edge row itself not repeated)."""
    above = all(torch.equal(canvas[:, top - k], canvas[:, top + k]) for k in range(1, top + 1))
    below = all(torch.equal(canvas[:, bottom - 1 + k], canvas[:, bottom - 1 - k])
                for k in range(1, canvas.shape[1] - bottom + 1))
    return above and below


def test_a_letterboxed_trained_model_trains_validates_and_scores_on_letterboxed_canvases(tmp_path, monkeypatch):
    images = _wide_images(12)
    expected = [unit_tensor(fit_to_canvas(image, LETTERBOX)[0]) for image in images]
    stretched = [unit_tensor(resize_square(image, SIZE)) for image in images]
    top, _, content_h, _ = canvas_box(*WIDE, LETTERBOX)
    trained_on, scored = [], []
    real_step, real_score = FastFlow.training_step, FastFlow.score_batch

    def spy_step(self, batch):
        trained_on.extend(batch["image"].detach().cpu())
        return real_step(self, batch)

    def spy_score(self, batch):
        scored.extend(batch.detach().float().cpu())
        return real_score(self, batch)

    monkeypatch.setattr(FastFlow, "training_step", spy_step)
    monkeypatch.setattr(FastFlow, "score_batch", spy_score)
    settings = ZooSettings(image_size=SIZE, batch_size=8, resize="letterbox", progress=False, run_dir=str(tmp_path))
    model = build_model("fastflow-resnet18", settings, TINY_FASTFLOW).fit(ImageSet(images))
    validated = len(scored)
    prediction = model.predict(ImageSet(images[:3]))

    assert trained_on and validated and len(scored) == validated + 3
    for canvas in trained_on + scored:  # validation paints defects on its normals: those canvases are new
        assert canvas.shape == (3, SIZE, SIZE)
        assert _mirrored_about_the_content(canvas, top, top + content_h)
        assert not any(torch.equal(canvas, s) for s in stretched)
    for canvas in trained_on:
        assert any(torch.equal(canvas, e) for e in expected), "a training input is not a letterboxed normal"
    for canvas, image in zip(scored[validated:], expected[:3]):  # scoring keeps the order
        assert torch.equal(canvas, image)
    # padding never looks anomalous: the map's rows outside the image hold its minimum
    valid = fit_to_canvas(images[0], LETTERBOX)[1]
    assert np.all(prediction.maps[0][~valid] == prediction.maps[0][valid].min())
    assert fit_record(model)["zoo"]["resize"] == "letterbox"


def test_square_records_and_inputs_are_unchanged():
    square = build_model("fastflow-resnet18", ZooSettings(image_size=SIZE, progress=False), TINY_FASTFLOW)
    assert "resize" not in fit_record(square)["zoo"] and "tiles" not in fit_record(square)["zoo"]
    image = _wide_images(1)[0]
    # the square geometry is the historical resize, byte for byte
    assert np.array_equal(fit_to_canvas(image, Geometry(image_size=SIZE))[0], resize_square(image, SIZE))


def test_efficientad_penalty_view_keeps_the_aspect_when_letterboxed():
    rng = np.random.default_rng(1)
    image = make_texture("wood", (40, 80), rng)  # 1:2, as wide as the centre crop of the 2S canvas allows
    size = 32
    letterboxed = _centre_crop_at_double_size(image, size, "letterbox")
    content = fit_to_canvas(image, Geometry(image_size=2 * size, resize="letterbox"))[0][size // 2:size // 2 + size]
    assert letterboxed.shape == (size, size, 3)
    assert np.array_equal(letterboxed, content[:, size // 2:size // 2 + size])
    assert np.array_equal(_centre_crop_at_double_size(image, size),
                          resize_square(image, 2 * size)[size // 2:size // 2 + size, size // 2:size // 2 + size])


def test_letterboxed_hold_keeps_the_aspect_on_a_square_canvas():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, :, 0] = np.arange(600, dtype=np.uint8)[None, :]  # columns differ, rows alike
    image[:, :, 1] = (np.arange(300) % 256).astype(np.uint8)[:, None]
    held = pretrain.hold_image(image, 100, "letterbox")
    assert held.shape == (100, 100, 3)
    top, left, content_h, content_w = canvas_box(300, 600, Geometry(image_size=100, resize="letterbox"))
    assert (top, left, content_h, content_w) == (25, 0, 50, 100)
    assert _mirrored_about_the_content(torch.from_numpy(held).permute(2, 0, 1), top, top + content_h)
    # never enlarged: the canvas side is at most the longer side, the image kept at its own pixels
    big = pretrain.hold_image(image, 1000, "letterbox")
    assert big.shape == (600, 600, 3) and np.array_equal(big[150:450], image)
    # square keeps the historical hold (shorter side at most hold_size)
    assert pretrain.hold_image(image, 100).shape == (100, 200, 3)
    with pytest.raises(ValueError, match="pretrain.resize must be square or letterbox"):
        pretrain.hold_image(image, 100, "stretch")


def test_pretraining_with_letterbox_holds_and_monitors_letterboxed_images(tiny_data, tmp_path, monkeypatch):
    cfg = quick_config(tiny_data, tmp_path, "pretrain.resize=letterbox", "pretrain.backbone=test_resnet",
                       "pretrain.image_size=32", "pretrain.hold_size=64", "pretrain.monitor_images=4",
                       "pretrain.monitor_reference=8", "train.threads=1")
    assert cfg.pretrain.resize == "letterbox"
    import competition.data.images as image_io

    real_read = image_io.read_image
    shapes = []  # of the wide images, in reading order

    def twice_as_wide(path):
        image = np.concatenate([real_read(path)] * 2, axis=1)
        shapes.append(image.shape[:2])
        return image

    monkeypatch.setattr(image_io, "read_image", twice_as_wide)
    seen = {}

    class Stop(Exception):
        pass

    def spy_monitor(normals, p, mean, std, seed):
        seen["normals"], seen["monitor"] = normals, real_monitor(normals, p, mean, std, seed)
        return seen["monitor"]

    def spy_views(images, *args, **kwargs):
        seen["held"] = images
        raise Stop

    real_monitor = pretrain.build_monitor_set
    monkeypatch.setattr(pretrain, "build_monitor_set", spy_monitor)
    monkeypatch.setattr(pretrain, "PretrainViews", spy_views)
    with pytest.raises(Stop):
        pretrain.main(cfg)

    held = seen["held"]
    assert len(held) == len(shapes) and all(image.shape[0] == image.shape[1] <= 64 for image in held)
    for image, shape in zip(held, shapes):  # a twice-as-wide image: about half the canvas is mirrored padding
        top, _, content_h, _ = canvas_box(*shape, Geometry(image_size=image.shape[0], resize="letterbox"))
        assert top > 0 and _mirrored_about_the_content(torch.from_numpy(image).permute(2, 0, 1), top, top + content_h)
    to_tensor = pretrain.whole_image_transform(32, cfg.augment.mean, cfg.augment.std, "letterbox")
    expected = [to_tensor(image=image)["image"] for image in seen["normals"]]
    monitor = seen["monitor"]
    assert monitor.reference.shape[1:] == (3, 32, 32)
    for tensor in list(monitor.reference) + list(monitor.clean):
        assert any(torch.equal(tensor, e) for e in expected)


def test_the_letterboxed_monitor_transform_is_the_canvas_normalised():
    image = _wide_images(1)[0]
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    tensor = pretrain.whole_image_transform(SIZE, mean, std, "letterbox")(image=image)["image"]
    canvas = unit_tensor(fit_to_canvas(image, LETTERBOX)[0])
    torch.testing.assert_close(tensor, (canvas - 0.5) / 0.25, rtol=0, atol=1e-6)
    top, _, content_h, _ = canvas_box(*WIDE, LETTERBOX)
    assert _mirrored_about_the_content(tensor, top, top + content_h)
