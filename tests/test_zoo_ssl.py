"""The backbone_weights tag "ssl": the -ssl entries find the experiment's pretrained backbone by convention,
or say to pretrain."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import quick_config
from safetensors.torch import load_file

from competition.artifacts import pretrained_weights_path
from competition.weights import write_state_dict
from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.models.stfpm import STFPM
from competition.zoo.registry import build_from_config, build_model, load_model

BACKBONE = "test_resnet"
SSL_BACKBONE = f"{{backbone: {BACKBONE}}}"


def ssl_config(data, work, *overrides):
    return quick_config(data, work, "zoo.image_size=32", "zoo.cache=false",
                        f"zoo.params={{patchcore-ssl: {SSL_BACKBONE}, padim-ssl: {SSL_BACKBONE}, "
                        f"stfpm-ssl: {{backbone: {BACKBONE}, epochs: 1, batch_size: 4}}}}", *overrides)


def write_pretrained(cfg, backbone: str = BACKBONE):
    torch.manual_seed(1)
    state = timm.create_model(backbone, num_classes=0).state_dict()
    return write_state_dict(state, pretrained_weights_path(cfg.paths.work, backbone))


def _same_weights(module: torch.nn.Module, path) -> bool:
    saved = load_file(str(path))
    state = module.state_dict()
    shared = [key for key in state if key in saved]
    return len(shared) > 10 and all(torch.equal(state[key], saved[key]) for key in shared)


def test_ssl_tag_replaces_zoo_backbone_weights_and_none_keeps_them(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path, f"zoo.backbone_weights={tmp_path / 'elsewhere'}")
    path = write_pretrained(cfg)
    assert build_from_config("patchcore-ssl", cfg).settings.backbone_weights == str(path)
    assert build_from_config("patchcore-resnet18", cfg).settings.backbone_weights == str(tmp_path / "elsewhere")
    # the resnet18 default of the -ssl entries: weights of another backbone do not stand in for it
    with pytest.raises(FileNotFoundError, match=r"no self-supervised weights for resnet18"):
        build_model("patchcore-ssl", ZooSettings(work_dir=cfg.paths.work))


def test_patchcore_ssl_extracts_with_the_pretrained_backbone(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    path = write_pretrained(cfg)
    model = build_from_config("patchcore-ssl", cfg)
    extractor = model._extractor()
    assert extractor.backbone_name == BACKBONE
    assert _same_weights(extractor.model, path)


def test_missing_pretraining_says_to_run_make_pretrain(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    expected = pretrained_weights_path(cfg.paths.work, BACKBONE)
    with pytest.raises(FileNotFoundError, match=rf"no self-supervised weights for {BACKBONE} at "
                                                rf"{expected}; run `make pretrain` first \(python -m competition "
                                                rf"pretrain --set pretrain.backbone={BACKBONE}"):
        build_from_config("stfpm-ssl", cfg)
    with pytest.raises(ValueError, match="needs ZooSettings.work_dir"):
        build_model("stfpm-ssl", ZooSettings())


def test_stfpm_ssl_teacher_has_the_pretrained_weights(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path, "zoo.backbone_weights=false")
    path = write_pretrained(cfg)
    model = build_from_config("stfpm-ssl", cfg)
    assert model.params.backbone == BACKBONE and model.params.epochs == 1
    assert model.settings.backbone_weights == str(path)
    assert _same_weights(model.build_model().teacher, path)


def test_fitted_ssl_entry_saves_and_loads_with_its_weights(tmp_path):
    cfg = ssl_config(tmp_path, tmp_path)
    write_pretrained(cfg)
    rng = np.random.default_rng(0)
    images = ImageSet([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)])
    model = build_from_config("stfpm-ssl", cfg)
    model.settings.progress = False
    scores = model.fit(images).score_samples(images)
    path = model.save(tmp_path / "model.pt")
    loaded = load_model(path)
    assert type(loaded) is STFPM and loaded.params.backbone == BACKBONE
    assert loaded.params.backbone_weights == "ssl"
    np.testing.assert_allclose(loaded.score_samples(images), scores, rtol=1e-5, atol=1e-6)
