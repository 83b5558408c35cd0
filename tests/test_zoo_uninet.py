"""UniNet: its pieces against the reference's formulas (feature selection, contrastive and margin loss,
weighted decision), the two teachers and their learning rates, and a short fit that separates painted
defects and reloads the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from competition.metrics import auroc
from competition.zoo.api import NotFittedError, ZooSettings
from competition.zoo.models.uninet import DomainFeatureSelection, contrastive_margin_loss, weighted_decision
from competition.zoo.registry import build_model, load_model, resolved_params
from tests.zoo_textures import painted_test_sets

SIZE = 64
N_TEST = 12
# A small ResNet and decoder, as tests/test_zoo_stfpm_rd.py does for Reverse Distillation.
SMALL = {"epochs": 6, "batch_size": 8, "backbone": "resnet10t", "oce_blocks": 1, "decoder_blocks": [1, 1, 1]}
LEAST_AUROC = 0.75  # the local models' bar: about 0.81-0.90 here (settings seeds 0-2)


@pytest.fixture(scope="module")
def texture_sets():
    """Brushed-metal normals (40 to fit, 12 to test) and 12 with painted defects, as tests/test_zoo_models.py."""
    return painted_test_sets(SIZE, n_test=N_TEST)


def test_fit_separates_painted_defects_and_the_saved_model_scores_the_same(texture_sets, tmp_path):
    import pandas as pd

    fit, test, labels = texture_sets
    settings = ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(tmp_path / "run"))
    model = build_model("uninet-resnet18", settings, SMALL)
    with pytest.raises(NotFittedError):
        model.score_samples(test)
    assert model.fit(fit) is model
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE) and prediction.maps.dtype == np.float32
    assert auroc(labels, prediction.scores) >= LEAST_AUROC

    net = model.model
    assert not any(p.requires_grad for p in net.source_teacher.parameters())
    assert all(p.requires_grad for p in net.target_teacher.parameters())
    net.train()
    assert not net.source_teacher.training and net.target_teacher.training and net.decoder.training
    optimizer = model.build_optimizer(model.parameters_to_train())
    assert [group["lr"] for group in optimizer.param_groups] == [5e-3, 1e-6]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in net.target_teacher.parameters()}
    net.eval()

    path = model.save(tmp_path / "model.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "uninet"
    assert checkpoint["state"].keys() == model.model.state_dict().keys()
    again = load_model(path, settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)


def test_feature_selection_weights_students_by_their_teacher():
    torch.manual_seed(0)
    selection = DomainFeatureSelection([4, 8])
    students = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2), torch.randn(2, 4, 3, 3)]
    teachers = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2), torch.randn(2, 4, 3, 3)]
    out = selection(students, teachers)
    for x, t, y in zip(students, teachers, out):
        b, c, h, w = t.shape
        softmax = torch.softmax(t.reshape(b, c, -1), dim=-1).view(b, c, h, w)
        theta = 1.0  # min(sigmoid(0) + 0.5, 1) at initialisation
        torch.testing.assert_close(y, x * softmax * (theta + t.mean(dim=(2, 3), keepdim=True)))
    with torch.no_grad():
        selection.thetas[0].fill_(-3.0)  # shared by the first and the third pair (the same scale)
    low = torch.sigmoid(torch.tensor(-3.0)) + 0.5
    out = selection(students, teachers)
    for i in (0, 2):
        b, c, h, w = teachers[i].shape
        softmax = torch.softmax(teachers[i].reshape(b, c, -1), dim=-1).view(b, c, h, w)
        expected = students[i] * softmax * (low + teachers[i].mean(dim=(2, 3), keepdim=True))
        torch.testing.assert_close(out[i], expected)


def test_loss_is_the_reference_formula_and_prefers_matching_positions():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    s = F.normalize(student.flatten(2).transpose(1, 2), dim=2)
    t = F.normalize(teacher.flatten(2).transpose(1, 2), dim=2)
    cosine = (1 - F.cosine_similarity(s, t, dim=2)).mean()
    similarity = torch.exp(s @ t.transpose(1, 2) / 2.0)
    diagonal = torch.diagonal(similarity / similarity.sum(2, keepdim=True), dim1=1, dim2=2)
    expected = 0.7 * cosine + 0.3 * -torch.log(diagonal + 1e-8).mean() + F.relu(1.0 - diagonal).mean()
    loss = contrastive_margin_loss(teacher, student, temperature=2.0, balance=0.7, margin=1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    matched = contrastive_margin_loss(teacher, 3.0 * teacher, 0.1, 0.7, 1.0)
    shuffled = contrastive_margin_loss(teacher, teacher.flip(-1), 0.1, 0.7, 1.0)
    assert matched < shuffled
    assert contrastive_margin_loss(teacher, teacher, 0.1, 1.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("side", [8, 16, 32])
def test_the_abnormal_margin_term_is_inert_at_the_reference_temperature(side):
    """As in the reference, p_ii is a softmax over all h*w positions at T = 2: under e / (h w) even for a student
    equal to its teacher, so relu(p_ii - margin / 2) is zero and a defect position adds no loss and no gradient
    (the README's finding on bsdata_tiles). At T = 0.01 the same positions do push."""
    torch.manual_seed(0)
    teacher = torch.randn(1, 64, side, side)
    student = teacher.clone().requires_grad_(True)
    everywhere = torch.ones(1, side, side, dtype=torch.bool)
    loss = contrastive_margin_loss(teacher, student, 2.0, 0.7, 1.0, abnormal=everywhere)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max().item() == 0.0
    s = F.normalize(teacher.flatten(2).transpose(1, 2), dim=2)
    p_ii = torch.softmax(s @ s.transpose(1, 2) / 2.0, dim=2).diagonal(dim1=1, dim2=2)
    assert p_ii.max().item() < np.e / side**2 < 0.5
    assert contrastive_margin_loss(teacher, teacher, 0.01, 0.7, 1.0, abnormal=everywhere).item() > 0.1


def test_weighted_decision_scores_the_contrast_of_the_summed_map():
    flat = [torch.full((1, 4, 4), 0.2), torch.full((1, 2, 2), 0.1)]
    scores, total = weighted_decision(flat, (8, 8), alpha=0.01, beta=3e-5)
    torch.testing.assert_close(total, torch.full((1, 8, 8), 0.3))
    assert scores.item() == pytest.approx(0.0, abs=1e-6)  # no position stands out
    peaked = [torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)]
    peaked[0][0, 1, 1] = 1.0
    scores, total = weighted_decision(peaked, (4, 4), alpha=0.5, beta=3e-5)
    # maxima 1 and 0: only the first is above the mean probability, w = 0.5 * 1 -> the top 8 of 16 values
    expected = (1 - torch.exp(total - total.max())).flatten().sort(descending=True).values[:8].mean()
    assert scores.item() == pytest.approx(expected.item(), rel=1e-6)
    tiny, _ = weighted_decision(peaked, (4, 4), alpha=1e-6, beta=1e-6)  # w * H * W below one pixel: one is taken
    assert tiny.item() == pytest.approx((1 - torch.exp(total - total.max())).max().item(), rel=1e-6)


def test_params_are_checked():
    with pytest.raises(ValueError, match="balance must be in"):
        resolved_params("uninet-resnet18", {"balance": 1.5})
    with pytest.raises(ValueError, match="temperature must be positive"):
        resolved_params("uninet-resnet18", {"temperature": 0.0})
    with pytest.raises(ValueError, match="decoder_blocks must be 3"):
        resolved_params("uninet-resnet18", {"decoder_blocks": [1, 1]})
    assert resolved_params("uninet-wide-resnet50").backbone == "wide_resnet50_2"
