"""FRE: the tied autoencoder, a short fit on brushed-metal normals that separates painted defects, the
save / load round trip, determinism, and the scoring module."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.metrics import auroc
from competition.zoo.api import NotFittedError, ZooSettings
from competition.zoo.models.fre import FRE, FREModel
from competition.zoo.registry import build_model, load_model
from tests.zoo_textures import painted_test_sets

SIZE = 64
N_TEST = 12
FAST = {"epochs": 40, "latent_dim": 16, "pool": 1}  # 80 steps on the 4 x 4 layer3 grid of a 64-px image


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    fit, test, _ = painted_test_sets(SIZE, n_test=N_TEST)
    return fit, test, str(tmp_path_factory.mktemp("fre_cache"))


def _settings(cache: str, **extra) -> ZooSettings:
    return ZooSettings(image_size=SIZE, batch_size=16, cache_dir=cache, progress=False, **extra)


def test_tied_autoencoder_shares_one_weight_and_loads_its_fitted_shape():
    model = FREModel()
    model.autoencoder.initialise(12, 3, torch.Generator().manual_seed(0))
    names = [name for name, _ in model.autoencoder.named_parameters()]
    assert names == ["weight", "encoder_bias", "decoder_bias"]  # the decoder has no weight of its own
    x = torch.randn(5, 12)
    ae = model.autoencoder
    expected = (x @ ae.weight.T + ae.encoder_bias) @ ae.weight + ae.decoder_bias
    torch.testing.assert_close(ae(x), expected)
    scores, maps = model(x.reshape(5, 3, 2, 2))
    torch.testing.assert_close(scores, ((x - expected) ** 2).sum(1))
    assert maps.shape == (5, 2, 2)
    fresh = FREModel()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.autoencoder(x), expected)


def test_params_are_checked():
    with pytest.raises(ValueError, match="latent_dim must be at least 1"):
        build_model("fre-resnet18", ZooSettings(), {"latent_dim": 0})


def test_fre_fits_separates_and_round_trips(textures, tmp_path):
    fit, test, cache = textures
    model = build_model("fre-resnet18", _settings(cache), FAST)
    assert isinstance(model, FRE)
    with pytest.raises(NotFittedError):
        model.score_samples(test)
    model.fit(fit)
    assert model.fit_info["final_loss"] < model.fit_info["first_loss"]
    assert model.fit_info["feature_dim"] == 256 * 4 * 4 and model.fit_info["latent_dim"] == 16
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE) and prediction.maps.dtype == np.float32
    labels = [0] * N_TEST + [1] * N_TEST
    assert auroc(labels, prediction.scores) >= 0.75
    assert auroc(labels, prediction.maps.reshape(2 * N_TEST, -1).max(1)) >= 0.7

    path = model.save(tmp_path / "fre.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "fre" and checkpoint["state"].keys() == model.model.state_dict().keys()
    reloaded = load_model(path)
    assert type(reloaded) is FRE and reloaded.get_params() == model.get_params()
    np.testing.assert_allclose(reloaded.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)

    # the scoring module gives the eager scores from [0, 1] images
    scorer = model.scoring_module()
    graph_scores, graph_maps = model.predict_with(scorer, test, with_maps=True)
    np.testing.assert_allclose(graph_scores, prediction.scores, rtol=1e-4, atol=1e-5)

    # the same seed fits the same autoencoder; a finished run folder resumes without training
    # the entry's 2 x 2 pooling is non-overlapping, as the reference: a 2 x 2 grid from layer3's 4 x 4
    pooled = build_model("fre-resnet18", _settings(cache), {"epochs": 2}).fit(fit)
    assert pooled.fit_info["feature_dim"] == 256 * 2 * 2 and pooled.fit_info["latent_dim"] == 220

    run = str(tmp_path / "run")
    again = build_model("fre-resnet18", _settings(cache, run_dir=run), FAST).fit(fit)
    assert again.fit_info["resumed_from_epoch"] is None and (tmp_path / "run" / "last.pt").exists()
    resumed = build_model("fre-resnet18", _settings(cache, run_dir=run), FAST).fit(fit)
    assert resumed.fit_info["resumed_from_epoch"] == FAST["epochs"]
    for a, b, c in zip(model.model.state_dict().values(), again.model.state_dict().values(),
                       resumed.model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
