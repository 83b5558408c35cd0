"""STFPM and Reverse Distillation: shapes and formulas, a few epochs of training that lower the
loss, finite scores and better-than-chance separation of obvious painted defects."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from competition.data.painters import paint_defect
from competition.data.textures import make_texture
from competition.metrics import auroc
from competition.zoo.api import AnomalyModel, ImageSet, ZooSettings
from competition.zoo.models.reverse_distillation import (
    OneClassBottleneck,
    ReverseDistillationModel,
    ReverseResNetDecoder,
)
from competition.zoo.models.stfpm import STFPMModel
from competition.zoo.registry import build_model, load_model

SIZE = 64


def _texture_sets(family: str = "wood", seed: int = 0) -> tuple[ImageSet, ImageSet, np.ndarray]:
    """32 training normals; 16 clean and 16 obviously defective test images of the same surface."""
    rng = np.random.default_rng(seed)
    normals = [make_texture(family, (SIZE, SIZE), rng) for _ in range(32)]
    clean = [make_texture(family, (SIZE, SIZE), rng) for _ in range(16)]
    kinds = ["stain", "hole", "scratch", "crack"]
    painted = [paint_defect(make_texture(family, (SIZE, SIZE), rng), kinds[i % 4], rng, severity=0.0)[0]
               for i in range(16)]
    return ImageSet(normals), ImageSet(clean + painted), np.array([0] * 16 + [1] * 16)


def _fit_and_check(name: str, params: dict, tmp_path, min_auroc: float = 0.6) -> AnomalyModel:
    normals, test, labels = _texture_sets()
    settings = ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(tmp_path))
    model = build_model(name, settings, params).fit(normals)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    prediction = model.predict(test)
    assert prediction.maps.shape == (32, SIZE, SIZE)
    assert np.isfinite(prediction.scores).all() and np.isfinite(prediction.maps).all()
    assert auroc(labels, prediction.scores) > min_auroc
    # The saved model scores the same.
    model.save(tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt", settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)
    return model


def test_stfpm_trains_and_separates(tmp_path):
    model = _fit_and_check("stfpm-resnet18", {"epochs": 3, "batch_size": 8}, tmp_path)
    assert not any(p.requires_grad for p in model.model.teacher.parameters())
    model.model.train()
    assert not model.model.teacher.training and model.model.student.training  # the frozen teacher stays in eval


def test_reverse_distillation_trains_and_separates(tmp_path):
    _fit_and_check("reverse-distillation-resnet18",
                   {"epochs": 8, "batch_size": 8, "backbone": "resnet10t", "oce_blocks": 1,
                    "decoder_blocks": [1, 1, 1]}, tmp_path)


def test_stfpm_map_and_loss_are_one_minus_cosine():
    """Per position 1/2 ||t/|t| - s/|s| ||^2 = 1 - cos(t, s): the loss is, per layer, the mean over the
    positions of 1 - cos summed over the batch; zero for an identical student, blind to the student's scale."""
    torch.manual_seed(0)
    t = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    net = STFPMModel(torch.nn.Identity(), torch.nn.Identity())
    assert torch.allclose(net.anomaly_map(t, t, (8, 8)), torch.zeros(2, 8, 8))
    assert net.loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = [x + 0.3 * torch.randn_like(x) for x in t]
    one_minus_cos = [1 - torch.nn.functional.cosine_similarity(x, y, dim=1) for x, y in zip(t, s)]  # (B, h, w)
    expected = sum(c.sum() / (c.shape[1] * c.shape[2]) for c in one_minus_cos)
    assert net.loss(t, s).item() == pytest.approx(expected.item(), rel=1e-5)
    assert net.loss(t, [3.0 * y for y in s]).item() == pytest.approx(expected.item(), rel=1e-5)
    sum_net = STFPMModel(torch.nn.Identity(), torch.nn.Identity(), map_combination="sum")
    assert torch.allclose(sum_net.anomaly_map(t[:1], s[:1], (4, 4)), one_minus_cos[0], atol=1e-5)
    product = net.anomaly_map(t, s, (4, 4))  # the paper's product: layer 2 upsampled to layer 1's grid
    upsampled = torch.nn.functional.interpolate(one_minus_cos[1][:, None], size=(4, 4), mode="bilinear",
                                                align_corners=False)[:, 0]
    assert torch.allclose(product, one_minus_cos[0] * upsampled, atol=1e-5)


@pytest.mark.parametrize("channels,expansion", [((64, 128, 256), 1), ((256, 512, 1024), 4)])
def test_reverse_distillation_decoder_mirrors_the_encoder(channels, expansion):
    features = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(channels)]
    bottleneck = OneClassBottleneck(channels, expansion, blocks=1, width_per_group=64)
    embedding = bottleneck(features)
    assert embedding.shape == (1, 2 * channels[2], 2, 2)  # resnet layer4 shape
    decoded = ReverseResNetDecoder(channels, expansion, [1, 1, 1])(embedding)
    assert [tuple(d.shape) for d in decoded] == [tuple(f.shape) for f in features]
    # the loss compares whole maps by their cosine: 0 for a perfect student at any scale, 2 per scale when opposite
    loss = ReverseDistillationModel.loss
    assert loss(features, [2.0 * f for f in features]).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(features, [-f for f in features]).item() == pytest.approx(2.0 * len(features), rel=1e-6)
    assert 0.0 < loss(features, decoded).item() < 2.0 * len(features)
