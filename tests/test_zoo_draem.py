"""DRAEM: sub-network shapes, SSIM and focal loss, Perlin-anomaly training samples, texture folders,
and a short fit that lowers the loss and separates obvious defects."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from competition.data.painters import paint_defect
from competition.data.textures import make_texture
from competition.metrics import auroc
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.models.draem import DRAEMModel, focal_loss, ssim
from competition.zoo.registry import build_model

SIZE = 64


def test_networks_keep_the_image_size():
    net = DRAEMModel(8, 4)
    images = torch.rand(2, 3, SIZE, SIZE)
    reconstruction, logits = net.reconstruct_and_segment(images)
    assert reconstruction.shape == images.shape and logits.shape == (2, 2, SIZE, SIZE)
    scores, maps = net.eval()(images)
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
    assert ((maps >= 0) & (maps <= 1)).all()


def test_ssim_and_focal_loss():
    a = torch.rand(2, 3, 32, 32)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, torch.rand_like(a)).item() < 0.2
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    right = torch.cat([(1 - mask) * 10, mask * 10], dim=1) - 5  # confident and correct
    wrong = -right
    assert focal_loss(right, mask).item() < 1e-3 < focal_loss(wrong, mask).item()
    # gamma 0 is plain cross-entropy
    logits = torch.randn(1, 2, 8, 8)
    ce = torch.nn.functional.cross_entropy(logits, mask[:, 0].long())
    assert focal_loss(logits, mask, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-5)


def test_training_samples_paint_perlin_anomalies_inside_their_mask(tmp_path):
    model = build_model("draem", ZooSettings(image_size=SIZE), {"augment": []})
    rng = np.random.default_rng(0)
    image = make_texture("wood", (SIZE, SIZE), rng)
    samples = [model.training_sample(image, np.random.default_rng(i)) for i in range(20)]
    with_anomaly = [s for s in samples if s["mask"].any()]
    assert 4 <= len(with_anomaly) <= 16  # anomaly_probability 0.5
    for s in samples:
        assert torch.equal(s["image"], torch.from_numpy(image).permute(2, 0, 1) / 255.0)
        outside = s["mask"][0] == 0
        assert torch.equal(s["augmented"][:, outside], s["image"][:, outside])
    assert "families the dataset does not use" in model.fit_summary()["anomaly_source"]

    for i in range(2):
        Image.fromarray(make_texture("marble", (30, 40), rng)).save(tmp_path / f"t{i}.png")
    folder_model = build_model("draem", ZooSettings(image_size=SIZE), {"anomaly_source": str(tmp_path)})
    assert len(folder_model.anomaly_sources()) == 2
    assert str(tmp_path) in folder_model.fit_summary()["anomaly_source"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        empty = build_model("draem", ZooSettings(image_size=SIZE), {"anomaly_source": str(tmp_path / "empty")})
        empty.anomaly_sources()


def test_draem_trains_and_separates(tmp_path):
    rng = np.random.default_rng(0)
    normals = ImageSet([make_texture("wood", (SIZE, SIZE), rng) for _ in range(32)])
    clean = [make_texture("wood", (SIZE, SIZE), rng) for _ in range(16)]
    kinds = ["stain", "hole", "scratch", "crack"]
    painted = [paint_defect(make_texture("wood", (SIZE, SIZE), rng), kinds[i % 4], rng, severity=0.0)[0]
               for i in range(16)]
    settings = ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(tmp_path))
    model = build_model("draem", settings, {"epochs": 5, "reconstructive_width": 16, "discriminative_width": 8})
    model.fit(normals)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["train_l2"].iloc[-1] < history["train_l2"].iloc[0]
    prediction = model.predict(ImageSet(clean + painted))
    assert np.isfinite(prediction.scores).all() and prediction.maps.shape == (32, SIZE, SIZE)
    assert auroc([0] * 16 + [1] * 16, prediction.scores) > 0.6
