"""The zoo's -ssl twins find the experiment's pretrained backbone by convention, or say to pretrain."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from competition.pretrain import pretrained_weights_path
from competition.weights import write_state_dict
from competition.zoo.base import MODEL_CLASSES, AnomalyModel, ImageSet
from competition.zoo.padim import PaDiM
from competition.zoo.patchcore import PatchCore
from competition.zoo.registry import build_from_config, entries
from competition.zoo.ssl_entries import PaDiMSSL, PatchCoreSSL, STFPMSSL
from competition.zoo.stfpm import STFPM
from conftest import quick_config

BACKBONE = "test_resnet"


def ssl_config(data, work, *overrides):
    return quick_config(data, work, f"pretrain.backbone={BACKBONE}", "zoo.image_size=32", "zoo.cache=false",
                        "zoo.params={stfpm-ssl: {epochs: 1, batch_size: 4}}", *overrides)


def write_pretrained(cfg):
    torch.manual_seed(1)
    state = timm.create_model(BACKBONE, num_classes=0).state_dict()
    return write_state_dict(state, pretrained_weights_path(cfg.paths.work, BACKBONE))


def test_twins_are_registered_beside_their_base():
    known = entries()
    for twin, base in ((PatchCoreSSL, PatchCore), (PaDiMSSL, PaDiM), (STFPMSSL, STFPM)):
        assert known[f"{base.family}-ssl"].model_class is twin
        assert issubclass(twin, base) and twin.family == f"{base.family}-ssl"
        assert MODEL_CLASSES[base.family] is base  # the base family is left alone
    assert known["patchcore-resnet18"].model_class is PatchCore


def test_patchcore_twin_extracts_with_the_pretrained_backbone(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    path = write_pretrained(cfg)
    model = build_from_config("patchcore-ssl", cfg)
    extractor = model._extractor()
    assert extractor.backbone_name == BACKBONE
    saved = load_file(str(path))
    state = extractor.model.state_dict()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in state.items() if key in saved)
    assert sum(key in saved for key in state) > 10


def test_missing_pretraining_says_to_run_make_pretrain(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    expected = pretrained_weights_path(cfg.paths.work, BACKBONE)
    with pytest.raises(FileNotFoundError, match=rf"no self-supervised weights for {BACKBONE} at "
                                                rf"{expected}; run `make pretrain` first"):
        build_from_config("stfpm-ssl", cfg)


def test_backbone_and_weights_follow_the_pretraining_output(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path, "zoo.backbone_weights=false")
    path = write_pretrained(cfg)
    model = build_from_config("stfpm-ssl", cfg)
    assert model.backbone == BACKBONE
    assert model.settings.backbone_weights == str(path)
    teacher = model.build_network().teacher.state_dict()
    saved = load_file(str(path))
    assert all(torch.equal(tensor, saved[key]) for key, tensor in teacher.items() if key in saved)
    assert sum(key in saved for key in teacher) > 10


def test_a_backbone_that_was_not_pretrained_names_the_pretrain_command(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path, "zoo.params={stfpm-ssl: {backbone: test_efficientnet}}")
    write_pretrained(cfg)
    with pytest.raises(FileNotFoundError, match=r"--set pretrain.backbone=test_efficientnet"):
        build_from_config("stfpm-ssl", cfg)


def test_fitted_twin_saves_and_loads_as_itself(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    write_pretrained(cfg)
    rng = np.random.default_rng(0)
    images = ImageSet([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)])
    model = build_from_config("stfpm-ssl", cfg)
    model.settings.progress = False
    scores = model.fit(images).score_samples(images)
    path = model.save(tmp_path / "model.pt")
    loaded = AnomalyModel.load(path)
    assert type(loaded) is STFPMSSL and loaded.backbone == BACKBONE
    np.testing.assert_allclose(loaded.score_samples(images), scores, rtol=1e-5, atol=1e-6)
