"""Dinomaly: its pieces against the reference's formulas (hard-mined cosine loss, linear attention, loose
groups, top-1 % score), and a tiny random ViT's fit that separates painted defects and reloads the same.

The ViT here is timm's DINOv2-with-registers architecture cut to depth 4, width 64, random weights: what
the test measures is the recipe (noisy bottleneck, linear-attention decoder, grouped reconstruction), not
DINOv2 features, so its bar is lower than the pretrained-backbone models'."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from competition.metrics import auroc
from competition.zoo.api import NotFittedError, ZooSettings
from competition.zoo.models.dinomaly import (
    DinomalyModel,
    LinearAttention,
    create_vit_encoder,
    default_input_size,
    gaussian_kernel_blur,
    hard_mined_cosine_loss,
    hard_mining_quantile,
)
from competition.zoo.registry import build_model, load_model, resolved_params
from tests.zoo_textures import painted_test_sets

SIZE = 64
N_TEST = 12
TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2}
# 8 x 8 patches of 14 px (the canvas upsampled to 112); 120 steps with the hard-mining warmup scaled down.
TINY = {"encoder_args": TINY_VIT, "encoder_layers": [0, 1, 2, 3], "decoder_depth": 4, "input_size": 112,
        "epochs": 4, "steps_per_epoch": 30, "batch_size": 8, "warmup_epochs": 0.2, "hard_mining_warmup_steps": 30}
# The local models' bar: a random-init tiny ViT gives about 0.82 here (settings seeds 0-2).
LEAST_AUROC = 0.75


@pytest.fixture(scope="module")
def texture_sets():
    """Brushed-metal normals (40 to fit, 12 to test) and 12 with painted defects, as tests/test_zoo_models.py."""
    return painted_test_sets(SIZE, n_test=N_TEST)


@pytest.fixture(scope="module")
def fitted(texture_sets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dinomaly_run")
    settings = ZooSettings(image_size=SIZE, batch_size=16, progress=False, run_dir=str(run_dir))
    model = build_model("dinomaly-vits14", settings, TINY)
    with pytest.raises(NotFittedError):
        model.score_samples(texture_sets[1])
    assert model.fit(texture_sets[0]) is model
    return model, settings, run_dir


def test_fit_separates_painted_defects_and_the_saved_model_scores_the_same(fitted, texture_sets, tmp_path):
    import pandas as pd

    model, settings, run_dir = fitted
    _, test, labels = texture_sets
    history = pd.read_csv(run_dir / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["train_hard_mining_p"].iloc[-1] == pytest.approx(0.9)  # the warmup is over
    assert int(model.model.steps_done) == model.fit_info["steps_done"] > 0
    prediction = model.predict(test)
    assert prediction.scores.shape == (2 * N_TEST,) and np.isfinite(prediction.scores).all()
    assert prediction.maps.shape == (2 * N_TEST, SIZE, SIZE) and prediction.maps.dtype == np.float32
    assert auroc(labels, prediction.scores) >= LEAST_AUROC
    assert not any(p.requires_grad for p in model.model.encoder.parameters())
    model.model.train()
    assert not model.model.encoder.training and model.model.decoder.training  # the frozen encoder stays in eval

    path = model.save(tmp_path / "model.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["family"] == "dinomaly"
    assert checkpoint["state"].keys() == model.model.state_dict().keys()
    again = load_model(path, settings)
    np.testing.assert_allclose(again.score_samples(test), prediction.scores, rtol=1e-5, atol=1e-6)


def test_forward_is_the_top_share_of_the_mean_group_map(fitted, texture_sets):
    model, _, _ = fitted
    net = model.model.eval()
    images = torch.stack([texture_sets[1].tensors(SIZE, (0, 0, 0), (1, 1, 1))[i][1] for i in (0, N_TEST)])
    with torch.no_grad():
        scores, maps = net(images)
        encoder_maps, decoder_maps = net.reconstruct(images)
    assert len(encoder_maps) == 2 and encoder_maps[0].shape == (2, 64, 8, 8)  # 2 groups on the 8 x 8 patch grid
    groups = [F.interpolate((1 - F.cosine_similarity(e, d, dim=1))[:, None], size=(SIZE, SIZE), mode="bilinear",
                            align_corners=True)[:, 0] for e, d in zip(encoder_maps, decoder_maps)]
    expected = gaussian_kernel_blur((groups[0] + groups[1]) / 2, 4.0, 5)
    torch.testing.assert_close(maps, expected)
    top = int(SIZE * SIZE * 0.01)
    torch.testing.assert_close(scores, expected.flatten(1).sort(1, descending=True).values[:, :top].mean(1))


def test_hard_mining_scales_the_gradient_of_easy_positions_only():
    torch.manual_seed(0)
    encoded = torch.randn(2, 8, 4, 4)
    decoded = (encoded + 0.5 * torch.randn(2, 8, 4, 4)).requires_grad_(True)

    def gradient(quantile: float, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        decoded.grad = None
        loss = hard_mined_cosine_loss([encoded], [decoded * 1.0], quantile, factor)
        loss.backward()
        return loss.detach(), decoded.grad.clone()

    plain_loss, plain = gradient(0.0, 0.1)  # p = 0: nothing is easy
    expected = torch.mean(1 - F.cosine_similarity(encoded.flatten(1), decoded.detach().flatten(1), dim=1))
    assert plain_loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss itself is never changed
    mined_loss, mined = gradient(0.75, 0.1)
    assert mined_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    distance = 1 - F.cosine_similarity(encoded, decoded.detach(), dim=1)
    threshold = distance.flatten().topk(int(distance.numel() * 0.25)).values[-1]
    easy = (distance < threshold)[:, None].expand_as(mined)
    assert easy.float().mean().item() == pytest.approx(0.75, abs=0.05)
    torch.testing.assert_close(mined[easy], 0.1 * plain[easy])
    torch.testing.assert_close(mined[~easy], plain[~easy])


def test_hard_mining_quantile_rises_linearly_over_the_warmup():
    assert hard_mining_quantile(0, 0.9, 1000) == 0.0
    assert hard_mining_quantile(500, 0.9, 1000) == pytest.approx(0.45)
    assert hard_mining_quantile(5000, 0.9, 1000) == pytest.approx(0.9)
    assert hard_mining_quantile(0, 0.9, 0) == pytest.approx(0.9)


def test_linear_attention_is_the_normalised_kernel_product():
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, num_heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = attention.qkv(x).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    weights = q @ k.transpose(-2, -1)
    weights = weights / weights.sum(-1, keepdim=True)  # each query's weights sum to one, no softmax
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


def test_groups_average_layers_and_drop_prefix_tokens():
    encoder = create_vit_encoder("vit_small_patch14_reg4_dinov2", TINY_VIT, False, seed=0)
    net = DinomalyModel(encoder, [0, 1, 2, 3], groups=2, decoder_depth=4, input_size=28)
    assert encoder.num_prefix_tokens == 5  # class token and 4 registers
    tokens = [torch.randn(2, 5 + 4, 64) for _ in range(4)]
    maps = net._grouped_maps(tokens)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 2, 2), (2, 64, 2, 2)]
    expected = ((tokens[2] + tokens[3]) / 2)[:, 5:].transpose(1, 2).reshape(2, 64, 2, 2)
    torch.testing.assert_close(maps[1], expected)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14; e.g. 126"):
        DinomalyModel(create_vit_encoder("vit_small_patch14_reg4_dinov2", TINY_VIT, False, 0), [0, 1], 2, 2,
                      input_size=128)
    short = DinomalyModel(create_vit_encoder("vit_small_patch14_reg4_dinov2", TINY_VIT, False, 0), [0, 1], 1, 1,
                          input_size=28)
    assert len(short.encoder.blocks) == 2  # blocks past the last encoder layer are never run: cut


def test_input_size_defaults_to_the_nearest_multiple_of_the_patch():
    assert default_input_size(128, 14) == 126 and default_input_size(224, 14) == 224
    assert default_input_size(64, 14) == 70 and default_input_size(5, 14) == 14


def test_params_are_checked():
    with pytest.raises(ValueError, match="groups 3 must divide"):
        resolved_params("dinomaly-vits14", {"groups": 3})
    with pytest.raises(ValueError, match="increasing order"):
        resolved_params("dinomaly-vits14", {"encoder_layers": [3, 2]})
    with pytest.raises(ValueError, match="hard_mining_quantile must be in"):
        resolved_params("dinomaly-vits14", {"hard_mining_quantile": 1.0})
    with pytest.raises(ValueError, match="reach beyond the encoder's 4 blocks"):
        build_model("dinomaly-vits14", ZooSettings(image_size=SIZE), {"encoder_args": TINY_VIT}).build_model()
