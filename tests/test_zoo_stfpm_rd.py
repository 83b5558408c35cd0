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
from competition.zoo.base import AnomalyModel, ImageSet, ZooSettings
from competition.zoo.registry import build_model, get_entry
from competition.zoo.reverse_distillation import OneClassBottleneck, ReverseDistillationNetwork, ReverseResNetDecoder
from competition.zoo.stfpm import STFPMNetwork

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
    again = AnomalyModel.load(tmp_path / "model.pt", settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)
    return model


def test_stfpm_trains_and_separates(tmp_path):
    model = _fit_and_check("stfpm-resnet18", {"epochs": 3, "batch_size": 8}, tmp_path)
    assert not any(p.requires_grad for p in model.network.teacher.parameters())
    assert not model.network.teacher.training  # frozen teacher stays in eval mode


def test_reverse_distillation_trains_and_separates(tmp_path):
    _fit_and_check("reverse-distillation-resnet18",
                   {"epochs": 8, "batch_size": 8, "backbone": "resnet10t", "oce_blocks": 1,
                    "decoder_blocks": [1, 1, 1]}, tmp_path)


def test_stfpm_map_is_zero_when_student_equals_teacher_and_loss_matches_the_paper():
    t = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    net = STFPMNetwork(torch.nn.Identity(), torch.nn.Identity())
    assert torch.allclose(net.anomaly_map(t, t, (8, 8)), torch.zeros(2, 8, 8))
    s = [x + 0.3 * torch.randn_like(x) for x in t]
    expected = sum(0.5 / (x.shape[2] * x.shape[3]) *
                   ((x / x.norm(dim=1, keepdim=True) - y / y.norm(dim=1, keepdim=True)) ** 2).sum()
                   for x, y in zip(t, s))
    assert net.loss(t, s).item() == pytest.approx(expected.item(), rel=1e-5)
    # per position 1/2 ||t^ - s^||^2 = 1 - cos(t, s)
    cos = torch.nn.functional.cosine_similarity(t[0], s[0], dim=1)
    sum_net = STFPMNetwork(torch.nn.Identity(), torch.nn.Identity(), map_combination="sum")
    assert torch.allclose(sum_net.anomaly_map(t[:1], s[:1], (4, 4)), 1 - cos, atol=1e-5)


@pytest.mark.parametrize("channels,expansion", [((64, 128, 256), 1), ((256, 512, 1024), 4)])
def test_reverse_distillation_decoder_mirrors_the_encoder(channels, expansion):
    features = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(channels)]
    bottleneck = OneClassBottleneck(channels, expansion, blocks=1, width_per_group=64)
    embedding = bottleneck(features)
    assert embedding.shape == (1, 2 * channels[2], 2, 2)  # resnet layer4 shape
    decoded = ReverseResNetDecoder(channels, expansion, [1, 1, 1])(embedding)
    assert [tuple(d.shape) for d in decoded] == [tuple(f.shape) for f in features]
    net = ReverseDistillationNetwork(torch.nn.Identity(), bottleneck, ReverseResNetDecoder(channels, expansion, [1, 1, 1]))
    loss = net.loss(features, decoded).detach()
    flat = [1 - torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)) for a, b in zip(features, decoded)]
    assert loss.item() == pytest.approx(float(sum(f.mean() for f in flat).detach()), rel=1e-5)


def test_registry_names_start_with_the_family():
    for name in ("stfpm-resnet18", "reverse-distillation-resnet18", "reverse-distillation-wide-resnet50"):
        entry = get_entry(name)
        assert name.startswith(entry.model_class.family)
