"""FastFlow, CFlow and U-Flow: a few epochs of training lower the loss, scores are finite and separate
obvious painted defects, a resumed fit equals an uninterrupted one, and U-Flow's NFA threshold
stays quiet on pure N(0, I) latents but fires on a planted anomalous blob."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from competition import training
from competition.data.painters import paint_defect
from competition.data.textures import make_texture
from competition.metrics import auroc
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.components.flow_blocks import gaussian_log_likelihood
from competition.zoo.models.cflow import positional_encoding_2d
from competition.zoo.models.fastflow import FastFlowModel
from competition.zoo.models.uflow import UFlowModel, log10_nfa_map, nfa_decisions
from competition.zoo.registry import build_model, load_model

SIZE = 64

# Tiny variants: few flow steps, so each fit takes seconds on one core.
TINY = {
    "fastflow-resnet18": {"epochs": 3, "batch_size": 8, "flow_steps": 2, "hidden_ratio": 0.5},
    "cflow-resnet18": {"epochs": 3, "batch_size": 8, "coupling_blocks": 2, "condition_vector": 16,
                       "fiber_batch_size": 512, "lr": 1.0e-3, "warmup_epochs": 0.0},
    "uflow-resnet18": {"epochs": 3, "batch_size": 8, "flow_steps": 2, "subnet_ratio": 0.5},
}


def _texture_sets(family: str = "wood", seed: int = 0) -> tuple[ImageSet, ImageSet, np.ndarray]:
    """32 training normals; 16 clean and 16 obviously defective test images of the same surface."""
    rng = np.random.default_rng(seed)
    normals = [make_texture(family, (SIZE, SIZE), rng) for _ in range(32)]
    clean = [make_texture(family, (SIZE, SIZE), rng) for _ in range(16)]
    kinds = ["stain", "hole", "scratch", "crack"]
    painted = [paint_defect(make_texture(family, (SIZE, SIZE), rng), kinds[i % 4], rng, severity=0.0)[0]
               for i in range(16)]
    return ImageSet(normals), ImageSet(clean + painted), np.array([0] * 16 + [1] * 16)


def _settings(run_dir) -> ZooSettings:
    return ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(run_dir))


@pytest.mark.parametrize("name", sorted(TINY))
def test_flow_trains_separates_and_reloads(name, tmp_path):
    normals, test, labels = _texture_sets()
    settings = _settings(tmp_path)
    model = build_model(name, settings, TINY[name]).fit(normals)
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == 3
    loss = history["train_fiber_mean" if name.startswith("cflow") else "train_loss"]  # CFlow: all fiber batches
    assert loss.iloc[-1] < loss.iloc[0]
    prediction = model.predict(test)
    assert prediction.maps.shape == (32, SIZE, SIZE)
    assert np.isfinite(prediction.scores).all() and np.isfinite(prediction.maps).all()
    assert auroc(labels, prediction.scores) > 0.6
    # The frozen backbone is never trained and stays in eval mode.
    backbone = model.model.features.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    model.model.train()
    assert not backbone.training
    model.save(tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt", settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cflow-resnet18", "uflow-resnet18"])
def test_resumed_fit_equals_uninterrupted(name, tmp_path, monkeypatch):
    """CFlow draws random fiber batches every step; U-Flow stands for the deterministic flows."""
    normals, test, _ = _texture_sets(seed=1)
    params = {**TINY[name], "epochs": 2}
    whole = build_model(name, _settings(tmp_path / "whole"), params).fit(normals)
    with monkeypatch.context() as patch:
        real_save = training.save_training_state

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt  # killed right after the first epoch's last.pt
        patch.setattr(training, "save_training_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            build_model(name, _settings(tmp_path / "cut"), params).fit(normals)
    resumed = build_model(name, _settings(tmp_path / "cut"), params).fit(normals)
    assert resumed.fit_info["resumed_from_epoch"] == 1
    history_whole = pd.read_csv(tmp_path / "whole" / "history.csv")
    history_cut = pd.read_csv(tmp_path / "cut" / "history.csv")
    np.testing.assert_allclose(history_cut["train_loss"], history_whole["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.score_samples(test), whole.score_samples(test), rtol=1e-4, atol=1e-6)


def test_fastflow_loss_is_the_negative_log_likelihood_up_to_a_constant():
    latents = [torch.randn(3, 4, 5, 5), torch.randn(3, 8, 2, 2)]
    log_dets = [torch.randn(3), torch.randn(3)]
    loss = FastFlowModel.loss(latents, log_dets)
    nll = -sum(gaussian_log_likelihood(z, ld).mean() for z, ld in zip(latents, log_dets))
    constant = 0.5 * math.log(2 * math.pi) * (4 * 25 + 8 * 4)
    assert loss.item() == pytest.approx(nll.item() - constant, rel=1e-5)
    # The map is -exp(-0.5 mean_c z^2): -1 where z = 0, towards 0 where z is large; U-Flow's is 1 + FastFlow's.
    latents = [torch.zeros(1, 4, 2, 2), torch.full((1, 4, 1, 1), 10.0)]
    maps = FastFlowModel.anomaly_map(latents, (4, 4))
    torch.testing.assert_close(maps, torch.full((1, 4, 4), -0.5))
    torch.testing.assert_close(UFlowModel.anomaly_map(latents, (4, 4)), torch.full((1, 4, 4), 0.5))


def test_cflow_positional_encoding_tells_every_position_apart():
    enc = positional_encoding_2d(16, 6, 5)
    assert enc.shape == (16, 6, 5)
    columns = enc.flatten(1).T  # one condition vector per position
    assert torch.cdist(columns, columns).add(torch.eye(30) * 10).min() > 1e-3
    # First half varies along x only, second half along y only.
    assert torch.allclose(enc[:8], enc[:8, :1].expand(-1, 6, -1))
    assert torch.allclose(enc[8:], enc[8:, :, :1].expand(-1, -1, 5))
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_uflow_latents_keep_every_feature_dimension():
    """The U-shaped flow is a bijection: its latents hold exactly as many numbers as the features."""
    model = build_model("uflow-resnet18", _settings("unused"), TINY["uflow-resnet18"])
    network = model.build_model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = network.features(images)
        latents, log_det = network.encode(images)
    assert [z.shape[-1] for z in latents] == [f.shape[-1] for f in features]  # finest first
    assert sum(z[0].numel() for z in latents) == sum(f[0].numel() for f in features)
    assert log_det.shape == (2,) and torch.isfinite(log_det).all()


def _noise_latents(batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(batch, 24, 32, 32, generator=generator), torch.randn(batch, 40, 16, 16, generator=generator),
            torch.randn(batch, 64, 8, 8, generator=generator)]


def test_nfa_is_quiet_on_pure_noise_latents():
    """Under the null hypothesis NFA < 1 means at most one false detection per image on average;
    the window and scale combination must not undo that guarantee."""
    latents = _noise_latents(100, torch.Generator().manual_seed(0))
    log_nfa = log10_nfa_map(latents, window=5, probability_threshold=0.9)
    assert log_nfa.shape == (100, 32, 32)
    ng, strength = nfa_decisions(log_nfa, epsilon=1.0)
    assert ng.mean() <= 0.05
    assert (log_nfa < 0).float().mean() < 1e-3


def test_nfa_detects_a_planted_blob_where_it_is():
    latents = _noise_latents(4, torch.Generator().manual_seed(1))
    latents[0][:, :, 10:16, 20:26] += 1.0  # a 6x6 anomalous blob at the finest scale
    latents[1][:, :, 5:8, 10:13] += 1.0  # and where it falls at the next scale
    log_nfa = log10_nfa_map(latents, window=5, probability_threshold=0.9)
    ng, strength = nfa_decisions(log_nfa, epsilon=1.0)
    assert ng.all() and (strength > 3).all()
    detected = log_nfa < 0
    assert detected[:, 11:15, 21:25].all()  # the blob's inside
    assert not detected[:, :, :8].any()  # far away from it
    # A stricter epsilon detects less, never more.
    strict, _ = nfa_decisions(log_nfa, epsilon=1e-40)
    assert not strict.any()


@pytest.mark.slow
def test_runner_reports_uflow_nfa_decision_beside_the_score(tiny_data, tmp_path):
    """One fold through `competition zoo`: the score feeds oof.csv, the NFA OK/NG goes to the results."""
    import json

    from conftest import quick_config

    from competition.folds import write_folds
    from competition.zoo.runner import main as zoo_main

    tiny = ", ".join(f"{k}: {v}" for k, v in {**TINY["uflow-resnet18"], "epochs": 1}.items())
    cfg = quick_config(tiny_data, tmp_path, f"zoo.params={{uflow-resnet18: {{{tiny}}}}}", "zoo.gallery_size=2")
    write_folds(cfg)
    zoo_main(cfg, model="uflow-resnet18", fold="0", force=False)
    out = tmp_path / "runs" / cfg.experiment / "uflow-resnet18" / "fold0"
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["image_id", "label", "score"] and np.isfinite(oof["score"]).all()
    results = json.loads((out / "results.json").read_text())
    own = results["own_decision"]
    assert "NFA < 1" in own["rule"]
    assert own["oof"]["tn"] + own["oof"]["fp"] + own["oof"]["fn"] + own["oof"]["tp"] == len(oof)
    decisions = pd.read_csv(out / "test_decisions.csv")
    assert set(decisions["own_decision"]) <= {"OK", "NG"}
    assert own["test_ng"] == int((decisions["own_decision"] == "NG").sum())
    assert np.isfinite(decisions["own_decision_strength"]).all()


def test_cflow_batch_visits_every_position_one_step_per_fiber_batch(monkeypatch):
    """Reference training: each layer's positions shuffled into fiber batches, an optimizer step each."""
    model = build_model("cflow-resnet18", _settings("unused"), {**TINY["cflow-resnet18"], "fiber_batch_size": 100})
    model.model = model.build_model()
    images = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        fibers = model.model.fiber_batches(images, 100)
        features = model.model.features(images)
    for layer, feature in enumerate(features):
        rows = model.model._rows(feature)[0]
        mine = [f for f in fibers if f[0] == layer]
        assert len(mine) == math.ceil(rows.shape[0] / 100) and all(len(f[1]) <= 100 for f in mine)
        visited = torch.cat([f[1] for f in mine])
        assert visited.shape == rows.shape  # every position once: the same rows, in another order
        torch.testing.assert_close(visited.sort(0).values, rows.sort(0).values)
    assert not torch.equal(fibers[0][1], model.model._rows(features[0])[0][:100])  # shuffled
    optimizer = model.build_optimizer(model.parameters_to_train())
    steps = []
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: steps.append(1))
    out = model.training_step({"image": images})
    assert len(steps) == len(fibers) - 1  # the engine takes the last step with the returned loss
    assert set(out) == {"loss", "fiber_mean"} and out["loss"].requires_grad
