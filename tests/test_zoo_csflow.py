"""CS-Flow: the image at three scales through one frozen layer, a cross-scale flow trained by likelihood;
training lowers the loss, painted defects score higher than clean surfaces, a saved model reloads."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_zoo_flows import SIZE, _texture_sets

from competition.metrics import auroc
from competition.zoo.api import ZooSettings
from competition.zoo.components.flow_blocks import gaussian_log_likelihood
from competition.zoo.models.csflow import CSFlowModel
from competition.zoo.registry import build_model, entries, load_model

TINY = {"epochs": 3, "batch_size": 4, "coupling_blocks": 2, "kernel_sizes": [3, 5], "hidden_channels": 32, "lr": 5.0e-3}


def _settings(run_dir) -> ZooSettings:
    return ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(run_dir))


def test_csflow_trains_separates_and_reloads(tmp_path):
    normals, test, labels = _texture_sets()
    settings = _settings(tmp_path)
    model = build_model("csflow-resnet18", settings, TINY).fit(normals)
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == 3
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    prediction = model.predict(test)
    assert prediction.maps.shape == (32, SIZE, SIZE)
    assert np.isfinite(prediction.scores).all() and np.isfinite(prediction.maps).all()
    assert auroc(labels, prediction.scores) > 0.6
    backbone = model.model.features.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    model.model.train()
    assert not backbone.training
    model.save(tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["family"] == "csflow"
    again = load_model(tmp_path / "model.pt", settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.anomaly_maps(test), prediction.maps, rtol=1e-4, atol=1e-6)


def test_csflow_sees_three_scales_and_its_loss_is_the_nll():
    model = build_model("csflow-resnet18", _settings("unused"), TINY)
    network = model.build_model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        latents, log_det = network.encode(images)
        features = network.scale_features(images)
    assert [z.shape[-1] for z in latents] == [SIZE // 8, SIZE // 16, SIZE // 32]  # resnet18 layer2 at S, S/2, S/4
    assert [z.shape for z in latents] == [f.shape for f in features]
    # A fresh flow (gammas 0) only permutes channels (features not yet standardised: mean 0, std 1).
    assert torch.equal(log_det, torch.zeros(2))
    torch.testing.assert_close(sorted(latents[0].flatten().tolist()), sorted(features[0].flatten().tolist()))
    d = sum(z[0].numel() for z in latents)
    loss = CSFlowModel.loss(latents, log_det)
    nll = -gaussian_log_likelihood(torch.cat([z.flatten(1) for z in latents], 1), log_det).mean()
    assert loss.item() == pytest.approx((nll.item() - 0.5 * d * math.log(2 * math.pi)) / d, rel=1e-5)
    # Score: mean z^2 / 2 over every number; map: the finest scale's, upsampled.
    latents = [torch.zeros(1, 4, 4, 4), torch.full((1, 4, 2, 2), 2.0), torch.zeros(1, 4, 1, 1)]
    assert CSFlowModel.image_scores(latents).item() == pytest.approx(0.5 * 4 * 16 / (4 * 21))
    torch.testing.assert_close(CSFlowModel.anomaly_map(latents, (8, 8)), torch.zeros(1, 8, 8))


def test_csflow_entries_state_their_budget():
    described = {name: entry.description for name, entry in entries().items() if name.startswith("csflow")}
    assert set(described) == {"csflow-resnet18", "csflow-paper"}
    assert "CPU budget" in described["csflow-resnet18"] and "240 epochs" in described["csflow-paper"]


def test_csflow_standardises_features_with_the_training_normals(tmp_path):
    normals, _, _ = _texture_sets()
    model = build_model("csflow-resnet18", _settings(tmp_path), {**TINY, "epochs": 1}).fit(normals)
    network = model.model.eval()
    assert not torch.equal(network.feature_std, torch.ones_like(network.feature_std))
    from competition.zoo.trained import evaluation_tensors
    with torch.no_grad():
        features = network.scale_features(evaluation_tensors(normals, SIZE))
    for scale, feature in enumerate(features):  # near mean 0, std 1 on the images they came from (most used)
        standard = (feature - network.feature_mean[scale][:, None, None]) / network.feature_std[scale][:, None, None]
        assert standard.mean().abs() < 0.2 and (standard.std() - 1).abs() < 0.2
