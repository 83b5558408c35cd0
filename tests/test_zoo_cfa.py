"""CFA: the coupled-hypersphere loss and softmin score against hand computations, memorised centres, a
short fit on brushed-metal normals that separates painted defects, the save / load round trip,
determinism, and the scoring module."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.metrics import auroc
from competition.zoo.api import NotFittedError, ZooSettings
from competition.zoo.components.features import with_backbone_statistics
from competition.zoo.models.cfa import CFA, CFAModel
from competition.zoo.registry import build_model, load_model
from tests.zoo_textures import painted_test_sets

SIZE = 64
N_TEST = 12


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    fit, test, _ = painted_test_sets(SIZE, n_test=N_TEST)
    return fit, test, str(tmp_path_factory.mktemp("cfa_cache"))


def _settings(cache: str) -> ZooSettings:
    return ZooSettings(image_size=SIZE, batch_size=16, cache_dir=cache, progress=False)


def test_loss_and_score_follow_the_paper():
    model = CFAModel(num_nearest=2, num_hard_negatives=1, radius=0.5, alpha=0.1, nu=1e-3)
    model.centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    phi = torch.tensor([[0.5, 0.0], [0.0, 0.1]]).T.reshape(1, 2, 1, 2)  # two patches on a 1 x 2 grid
    d = model.nearest_distances(phi, 3)
    torch.testing.assert_close(d[0], torch.tensor([[0.25, 0.25, 4.25], [0.01, 1.01, 3.61]]))
    r2 = 0.25
    attraction = torch.relu(d[0, :, :2] - r2).mean() / 1e-3
    repulsion = torch.relu(r2 - d[0, :, 2:] - 0.1).mean() / 1e-3
    losses = model.loss(phi)
    torch.testing.assert_close(losses["attraction"], attraction)
    torch.testing.assert_close(losses["repulsion"], repulsion)
    near = d[0, :, :2]
    expected = torch.softmax(-near, dim=-1)[:, 0] * near[:, 0]
    model.describe = lambda maps: phi  # the descriptor aside: forward scores phi's patches
    torch.testing.assert_close(model([phi])[0, 0], expected)


def test_params_are_checked():
    with pytest.raises(ValueError, match="radius must be positive"):
        build_model("cfa-resnet18", ZooSettings(), {"radius": 0.0})


def test_cfa_fits_separates_and_round_trips(textures, tmp_path):
    fit, test, cache = textures
    params = {"epochs": 10}  # 100 steps of batch 4; the paper trains 30 epochs
    model = build_model("cfa-resnet18", _settings(cache), params)
    assert isinstance(model, CFA)
    with pytest.raises(NotFittedError):
        model.score_samples(test)
    model.fit(fit)
    info = model.fit_info
    assert info["centres"] == (SIZE // 4) ** 2 and info["descriptor_channels"] == 64 + 128 + 256
    assert info["final_loss"] < info["first_loss"] and info["radius"] > 1e-5  # r trains with the descriptor
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE) and prediction.maps.dtype == np.float32
    np.testing.assert_allclose(prediction.scores, prediction.maps.reshape(2 * N_TEST, -1).max(1), rtol=1e-6)
    labels = [0] * N_TEST + [1] * N_TEST
    assert auroc(labels, prediction.scores) >= 0.75

    path = model.save(tmp_path / "cfa.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "cfa" and checkpoint["state"].keys() == model.model.state_dict().keys()
    reloaded = load_model(path)
    assert type(reloaded) is CFA and reloaded.get_params() == model.get_params()
    np.testing.assert_allclose(reloaded.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-7)

    graph_scores, _ = model.predict_with(model.scoring_module(), test, with_maps=True)
    np.testing.assert_allclose(graph_scores, prediction.scores, rtol=1e-4, atol=1e-6)


def test_cfa_is_deterministic_and_memorises_the_mean_descriptor(textures):
    fit, _, cache = textures
    params = {"epochs": 1, "batch_size": 8}
    first = build_model("cfa-resnet18", _settings(cache), params).fit(fit)
    second = build_model("cfa-resnet18", _settings(cache), params).fit(fit)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    untrained = build_model("cfa-resnet18", _settings(cache), {"epochs": 1, "lr": 1e-12, "weight_decay": 0.0})
    untrained.fit(fit)
    extractor = with_backbone_statistics(untrained._extractor(), untrained.model)
    maps = extractor.select(extractor.extract_all(fit), (1, 2, 3))
    with torch.no_grad():
        phi = untrained.model.describe(maps)
    torch.testing.assert_close(untrained.model.centres, phi.mean(0).flatten(1).T, rtol=1e-4, atol=1e-4)
