"""EfficientAD: PDN and autoencoder geometry, the hard-feature loss, quantile map normalisation,
penalty images, and a short fit that lowers the losses and separates obvious defects."""
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
from competition.zoo.models.efficientad import (
    EfficientADAutoencoder,
    EfficientADModel,
    PatchDescriptionNetwork,
    hard_feature_loss,
    pdn_output_side,
)
from competition.zoo.registry import build_model

SIZE = 64


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_geometry_matches_the_reference(size):
    pdn = PatchDescriptionNetwork(size, 384)
    # 256 px: 56 x 56 unpadded (scoring), 64 x 64 padded (distillation, = backbone layer 2 at 512 px)
    assert pdn_output_side(256, size) == 56 and pdn_output_side(128, size) == 24
    out = pdn(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 384, 24, 24)
    assert pdn(torch.zeros(1, 3, 128, 128), padded=True).shape == (1, 384, 32, 32)
    autoencoder = EfficientADAutoencoder(128, 24)
    assert autoencoder(torch.zeros(2, 3, 128, 128)).shape == (2, 384, 24, 24)


def test_hard_feature_loss_keeps_the_top_tenth_of_a_percent():
    # 0..9999: the 0.999 quantile is 9989.001, so the ten largest (9990..9999) remain, mean 9994.5
    distance = torch.arange(10000, dtype=torch.float32).reshape(1, 4, 50, 50)
    assert hard_feature_loss(distance, 0.999).item() == pytest.approx(9994.5)
    assert hard_feature_loss(distance, 0.0).item() == pytest.approx(4999.5)  # quantile 0 keeps everything


def test_quantile_normalisation_maps_qa_to_zero_and_qb_to_a_tenth():
    net = EfficientADModel(SIZE).eval()  # eval: the autoencoder's dropout off, as in scoring
    model = build_model("efficientad-s", ZooSettings(image_size=SIZE, progress=False))
    model.model = net
    normals = torch.rand(6, 3, SIZE, SIZE)
    with torch.no_grad():
        model.calibrate(normals)
        map_st, map_ae = net.raw_maps(normals)
    st_a, st_b, ae_a, ae_b = net.map_quantiles.tolist()
    assert st_a == pytest.approx(torch.quantile(map_st.flatten(), 0.9).item(), rel=1e-5)
    assert ae_b == pytest.approx(torch.quantile(map_ae.flatten(), 0.995).item(), rel=1e-5)
    assert st_b > st_a and ae_b > ae_a
    with torch.no_grad():
        scores, maps = net(normals)
    assert maps.shape == (6, SIZE, SIZE) and torch.isfinite(scores).all()
    # The combined map is the mean of the two normalised maps; its 0.9-quantile pixel sits near 0.
    inner = maps[:, 16:-16, 16:-16]  # away from the 4-pixel zero padding
    assert inner.flatten().quantile(0.5).item() < 0.0 < inner.max().item()


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    normals = [make_texture("wood", (SIZE, SIZE), rng) for _ in range(32)]
    clean = [make_texture("wood", (SIZE, SIZE), rng) for _ in range(16)]
    kinds = ["stain", "hole", "scratch", "crack"]
    painted = [paint_defect(make_texture("wood", (SIZE, SIZE), rng), kinds[i % 4], rng, severity=0.0)[0]
               for i in range(16)]
    return ImageSet(normals), ImageSet(clean + painted), np.array([0] * 16 + [1] * 16)


@pytest.mark.slow
def test_efficientad_small_trains_and_separates(tmp_path):
    normals, test, labels = _data()
    settings = ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(tmp_path))
    model = build_model("efficientad-s", settings, {
        "epochs": 3, "steps_per_epoch": 8, "batch_size": 4, "lr": 1.0e-3, "teacher_steps": 20, "teacher_batch_size": 4,
        "penalty_count": 16})
    model.fit(normals)
    distillation = model.fit_info["teacher_distillation_loss"]
    assert distillation["last"] < distillation["first"]
    history = pd.read_csv(tmp_path / "history.csv")
    for column in ("train_hard", "train_penalty", "train_ae", "train_stae"):
        assert column in history.columns
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert not any(p.requires_grad for p in model.model.teacher.parameters())
    assert "families the dataset does not use" in model.fit_info["penalty_images"]
    prediction = model.predict(test)
    assert prediction.maps.shape == (32, SIZE, SIZE)
    assert np.isfinite(prediction.scores).all()
    assert auroc(labels, prediction.scores) > 0.6


def test_penalty_images_from_a_folder(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(make_texture("marble", (40, 50), rng)).save(tmp_path / f"p{i}.png")
    model = build_model("efficientad-s", ZooSettings(image_size=SIZE, progress=False),
                        {"penalty_images": str(tmp_path), "penalty_count": 2})
    pool = model.penalty_pool()
    assert pool.shape == (2, SIZE, SIZE, 3) and pool.dtype == np.uint8
    assert str(tmp_path) in model._penalty_source
    sample = model.training_sample(make_texture("wood", (SIZE, SIZE), rng), np.random.default_rng(0))
    assert set(sample) == {"image", "image_ae", "penalty"} and sample["penalty"].shape == (3, SIZE, SIZE)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        build_model("efficientad-s", ZooSettings(image_size=SIZE), {"penalty_images": str(empty)}).penalty_pool()


def test_paper_entries_keep_the_papers_budget_and_learning_rate():
    from competition.zoo.registry import entries, resolved_params

    for name in ("efficientad-s-paper", "efficientad-m-paper"):
        params = resolved_params(name)
        assert params.lr == 1.0e-4 and params.epochs * params.steps_per_epoch == 70_000 and params.batch_size == 1
        assert params.teacher_steps == 60_000 and params.teacher_lr == 1.0e-4
    for name in ("efficientad-s", "efficientad-m"):  # the CPU entries say what they cut
        assert "CPU budget" in entries()[name].description
