"""SuperSimpleNet: the losses against torchvision and hand computations, the upscaled feature grid, Perlin
masks of the training samples, a short fit on brushed-metal normals that separates painted defects, the
save / load round trip, the scoring module, and determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.data.textures import make_texture
from competition.metrics import auroc
from competition.zoo.api import NotFittedError, ZooSettings
from competition.zoo.models.supersimplenet import (
    SuperSimpleNet,
    focal_loss_with_logits,
    truncated_l1_loss,
)
from competition.zoo.registry import build_model, load_model
from tests.zoo_textures import painted_test_sets

SIZE = 64
N_TEST = 12
# Narrow heads (the paper: 1024 / 128 channels) and a higher lr, so that a few epochs run in seconds on one core.
SMALL = {"seg_hidden": 128, "cls_channels": 32, "batch_size": 8, "lr": 1.0e-3, "head_lr": 2.0e-3}


@pytest.fixture(scope="module")
def textures():
    return painted_test_sets(SIZE, n_test=N_TEST)[:2]


def _settings(**kwargs) -> ZooSettings:
    # healthy random backbones (live residual branches, BatchNorm statistics of the fit images): with timm's
    # zero-initialised branches layer2 and layer3 mostly repeat the stem, and the short fit separates less
    return ZooSettings(image_size=SIZE, batch_size=16, progress=False, backbone_init="healthy", **kwargs)


def test_losses_follow_the_reference():
    from torchvision.ops import sigmoid_focal_loss

    logits, target = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.7).float()
    expected = sigmoid_focal_loss(logits, target, alpha=-1, gamma=4.0, reduction="mean")
    torch.testing.assert_close(focal_loss_with_logits(logits, target, 4.0), expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(focal_loss_with_logits(logits, target, 0.0), bce)
    seg = torch.tensor([[-1.0, 0.0, 0.25, 2.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # normal: max(0, -1 + .5), max(0, 0 + .5) -> mean .25; anomalous: max(0, .5 - .25), max(0, .5 - 2) -> .125
    assert truncated_l1_loss(seg, mask, 0.5).item() == pytest.approx(0.375)
    assert truncated_l1_loss(seg, torch.zeros_like(seg), 0.5).item() == pytest.approx((0.5 + 0.75 + 2.5) / 4)


def test_params_are_checked():
    with pytest.raises(ValueError, match="cls_kernel must be odd"):
        build_model("supersimplenet-resnet18", ZooSettings(), {"cls_kernel": 4})
    with pytest.raises(ValueError, match="anomaly_probability"):
        build_model("supersimplenet-resnet18", ZooSettings(), {"anomaly_probability": 1.5})


def test_features_grid_and_perlin_masks():
    model = build_model("supersimplenet-resnet18", _settings(), SMALL)
    net = model.model = model.build_model()
    features = net.features(torch.rand(2, 3, SIZE, SIZE))
    # layer2 (128) + layer3 (256) channels at twice layer2's 8 x 8 grid
    assert features.shape == (2, 128 + 256, SIZE // 4, SIZE // 4) and not features.requires_grad
    scores, maps = net.eval()(torch.rand(3, 3, SIZE, SIZE))
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    image = make_texture("brushed_metal", (SIZE, SIZE), np.random.default_rng(1))
    samples = [model.training_sample(image, np.random.default_rng(i)) for i in range(20)]
    masks = torch.stack([s["masks"] for s in samples])  # (20, 2, h, w)
    assert masks.shape == (20, 2, SIZE // 4, SIZE // 4) and set(masks.unique().tolist()) <= {0.0, 1.0}
    with_anomaly = int((masks.flatten(2).amax(2) > 0).sum())
    assert 10 <= with_anomaly <= 30  # anomaly_probability 0.5 of 40 copies
    again = model.training_sample(image, np.random.default_rng(3))
    assert torch.equal(again["masks"], samples[3]["masks"])

    batch = {"image": torch.stack([s["image"] for s in samples[:4]]), "masks": masks[:4]}
    losses = model.training_step(batch)
    assert set(losses) == {"loss", "seg_focal", "seg_l1", "cls_focal"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.adaptor.weight.grad is not None and net.heads.cls_fc.weight.grad is not None


def test_supersimplenet_fits_separates_and_round_trips(textures, tmp_path):
    fit, test = textures
    model = build_model("supersimplenet-resnet18", _settings(run_dir=str(tmp_path / "run")), {**SMALL, "epochs": 6})
    assert isinstance(model, SuperSimpleNet)
    with pytest.raises(NotFittedError):
        model.score_samples(test)
    model.fit(fit)
    assert model.fit_info["epochs_run"] == 6
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE) and prediction.maps.dtype == np.float32
    labels = [0] * N_TEST + [1] * N_TEST
    # 24 steps of narrow heads on a random backbone: the class head separates (about 0.84 here), the seg map's
    # peak less (about 0.65): feature noise on random features is a weak stand-in for painted defects
    assert auroc(labels, prediction.scores) >= 0.75, "the class head barely separates painted defects"
    assert auroc(labels, prediction.maps.reshape(2 * N_TEST, -1).max(1)) >= 0.55

    path = model.save(tmp_path / "ssn.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "supersimplenet"
    assert checkpoint["state"].keys() == model.model.state_dict().keys()
    reloaded = load_model(path)
    assert type(reloaded) is SuperSimpleNet and reloaded.get_params() == model.get_params()
    np.testing.assert_allclose(reloaded.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-5)
    graph_scores, graph_maps = model.predict_with(model.scoring_module(), test, with_maps=True)
    np.testing.assert_allclose(graph_scores, prediction.scores, rtol=1e-4, atol=1e-5)


def test_supersimplenet_is_deterministic(textures):
    fit, _ = textures
    params = {**SMALL, "epochs": 1}
    first = build_model("supersimplenet-resnet18", _settings(), params).fit(fit)
    second = build_model("supersimplenet-resnet18", _settings(), params).fit(fit)
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), key
