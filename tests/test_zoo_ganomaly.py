"""GANomaly: network shapes, the generator's updates leaving D alone (and D's leaving G alone), a short
fit on brushed-metal normals that separates painted defects by the latent distance, the save / load
round trip and determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.data.painters import paint_defect
from competition.data.textures import make_texture
from competition.metrics import auroc
from competition.zoo.api import ImageSet, NotFittedError, ZooSettings
from competition.zoo.models.ganomaly import GANomaly, GANomalyModel
from competition.zoo.registry import build_model, load_model

SIZE = 64
N_TEST = 12
# 200 steps of batch 8 at 16 base channels (the paper: 64 channels, batch 64, 15 epochs of large sets)
FAST = {"epochs": 10, "steps_per_epoch": 20, "batch_size": 8, "width": 16, "lr": 5e-4}


def test_networks_and_the_two_losses_update_their_own_network():
    model = GANomalyModel(SIZE, latent_dim=10, width=8)
    images = torch.rand(4, 3, SIZE, SIZE)
    x, fake, z, z_hat = model.generate(images)
    assert fake.shape == x.shape and z.shape == z_hat.shape == (4, 10)
    assert fake.min() >= -1 and fake.max() <= 1
    scores, maps = model.eval()(images)
    assert scores.shape == (4,) and maps.shape == (4, SIZE, SIZE)
    _, _, z, z_hat = model.generate(images)
    torch.testing.assert_close(scores, ((z - z_hat) ** 2).mean(1))
    with pytest.raises(ValueError, match="power of two"):
        GANomalyModel(96)

    wrapper = build_model("ganomaly", ZooSettings(image_size=SIZE, progress=False), {"width": 8, "latent_dim": 10})
    wrapper.model = model.train()
    losses = wrapper.training_step({"image": images})
    assert set(losses) == {"loss", "generator", "adversarial", "contextual", "encoder", "discriminator"}
    model.zero_grad()
    losses["generator"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.discriminator.parameters())  # L_adv trains G only
    assert model.encoder[0].weight.grad is not None
    model.zero_grad(set_to_none=True)
    losses["discriminator"].backward()
    assert all(p.grad is None for net in (model.encoder, model.decoder, model.reencoder) for p in net.parameters())


def test_ganomaly_fits_separates_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)

    def texture():
        return make_texture("brushed_metal", (SIZE, SIZE), rng)

    kinds = ("hole", "stain", "missing_pattern", "cut")
    fit = ImageSet([texture() for _ in range(40)])
    test = ImageSet([texture() for _ in range(N_TEST)] +
                    [paint_defect(texture(), kinds[i % 4], rng, severity=0.0)[0] for i in range(N_TEST)])
    model = build_model("ganomaly", ZooSettings(image_size=SIZE, batch_size=16, progress=False), FAST)
    assert isinstance(model, GANomaly) and not model.has_maps
    with pytest.raises(NotFittedError):
        model.score_samples(test)
    model.fit(fit)
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE)
    assert np.allclose(prediction.maps, prediction.scores[:, None, None])  # no map: the score spread
    labels = [0] * N_TEST + [1] * N_TEST
    assert auroc(labels, prediction.scores) >= 0.65  # a global latent score: weak on small defects

    path = model.save(tmp_path / "ganomaly.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "ganomaly" and checkpoint["state"].keys() == model.model.state_dict().keys()
    reloaded = load_model(path)
    assert type(reloaded) is GANomaly and reloaded.get_params() == model.get_params()
    np.testing.assert_allclose(reloaded.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-7)

    # the same seed trains the same networks
    tiny = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "width": 8, "latent_dim": 8}
    first = build_model("ganomaly", ZooSettings(image_size=SIZE, progress=False), tiny).fit(fit)
    second = build_model("ganomaly", ZooSettings(image_size=SIZE, progress=False), tiny).fit(fit)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
