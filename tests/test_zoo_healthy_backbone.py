"""Random-init backbones of the zoo: live residual branches and BatchNorm statistics from the fit images
(`zoo.backbone_init: healthy`), against timm's zero-initialised branches (`timm`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from competition.zoo.api import ImageSet, ZooSettings
from competition.zoo.components.features import (
    FeatureExtractor,
    batchnorm_statistics,
    calibrate_backbones,
    create_backbone,
    shared_extractor,
)


def _images(n: int, seed: int = 0, size: int = 40) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet([rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8) for _ in range(n)])


def _settings(init: str = "healthy", **overrides) -> ZooSettings:
    return ZooSettings(**{"image_size": 32, "batch_size": 4, "progress": False, "backbone_init": init, **overrides})


def test_timm_init_makes_every_block_the_identity_and_healthy_does_not():
    """Untrained, timm zeroes each residual branch's last BatchNorm: a block returns its (non-negative)
    input. Healthy backbones keep the branches, and after calibration a block changes its input."""
    x = torch.relu(torch.randn(2, 64, 8, 8))
    degenerate = create_backbone("resnet18", (1, 2), False, seed=0, init="timm")
    assert torch.equal(degenerate.layer1[0](x), x)
    healthy = create_backbone("resnet18", (1, 2), False, seed=0, init="healthy")
    assert healthy.needs_calibration
    assert all(float(block.bn2.weight.abs().min()) > 0 for layer in (healthy.layer1, healthy.layer2) for block in layer)
    calibrate_backbones(healthy, np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                        _settings())
    assert not healthy.training and not healthy.needs_calibration
    with torch.no_grad():
        assert (healthy.layer1[0](x) - x).abs().mean() > 0.1
    # the same random draws: only the zeroed BatchNorm weights differ between the two
    changed = [k for k, v in degenerate.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, healthy.state_dict()[k])]
    assert changed and all(".bn2." in k for k in changed)


def test_calibration_is_deterministic_order_free_and_keyed():
    images = _images(7)
    first = FeatureExtractor("resnet18", [1, 2], _settings())
    uncalibrated_key = first.key
    with pytest.raises(RuntimeError, match="calibrate"):
        first.extract_all(images)
    stats = first.calibrate(images)
    assert stats.numel() > 0 and not torch.equal(stats, torch.zeros_like(stats))
    second = FeatureExtractor("resnet18", [1, 2], _settings(batch_size=3))  # zoo.batch_size: speed only
    second.model = create_backbone("resnet18", (1, 2), False, seed=0, init="healthy")  # a fresh network
    again = second.calibrate(images.subset([6, 5, 4, 3, 2, 1, 0]))
    assert torch.equal(stats, again)  # bitwise, whatever the order and the batch size
    assert second.key == first.key != uncalibrated_key
    other = FeatureExtractor("resnet18", [1, 2], _settings())
    other.calibrate(_images(7, seed=1))
    assert other.key != first.key  # other fit images, other statistics, other cache folder
    # features follow each extractor's statistics, also when extractors share one backbone module
    assert other.model is first.model
    maps = first.extract_all(images)
    assert not torch.equal(other.extract_all(images)[1], maps[1])
    assert all(torch.equal(a, b) for a, b in zip(maps, first.extract_all(images)))


def test_statistics_are_cached_per_image_set_and_restored_from_a_model(tmp_path):
    from competition.zoo.registry import build_model

    settings = _settings(cache_dir=str(tmp_path / "cache"))
    images = _images(6)
    stats = shared_extractor("resnet18", [1, 2, 3], settings).calibrate(images)  # PaDiM's backbone
    assert len(list((tmp_path / "cache" / "batchnorm").glob("*.safetensors"))) == 1
    assert torch.equal(shared_extractor("resnet18", [2, 3], settings).calibrate(images), stats)
    model = build_model("padim-resnet18", settings).fit(images)
    path = model.save(tmp_path / "padim.pt")
    assert torch.equal(model.model.backbone_statistics, stats)
    loaded = type(model).load(path, _settings())  # no cache: the statistics come from the checkpoint
    assert torch.equal(loaded.model.backbone_statistics, stats)
    # a saved PaDiM reloads to within float rounding of its einsum, whatever the backbone init
    np.testing.assert_allclose(model.score_samples(images), loaded.score_samples(images), rtol=1e-5)
    loaded.model.backbone_statistics = torch.empty(0)
    with pytest.raises(RuntimeError, match="BatchNorm statistics"):
        loaded.score_samples(images)


def test_loaded_weights_are_never_recalibrated(tmp_path):
    import timm

    from competition.weights import write_state_dict

    net = timm.create_model("resnet18", pretrained=False)
    write_state_dict(net.state_dict(), tmp_path / "resnet18.safetensors")
    healthy = FeatureExtractor("resnet18", [2], _settings("healthy", backbone_weights=str(tmp_path)))
    timm_init = FeatureExtractor("resnet18", [2], _settings("timm", backbone_weights=str(tmp_path)))
    before = batchnorm_statistics(healthy.model).clone()
    assert not healthy.needs_calibration and healthy.calibrate(_images(5)).numel() == 0
    assert torch.equal(batchnorm_statistics(healthy.model), before)
    assert healthy.key == timm_init.key  # the same features, the same cache
    assert not create_backbone("resnet18", (2,), str(tmp_path), seed=0, init="healthy").needs_calibration


def test_timm_init_keeps_the_former_cache_key():
    """init "timm" describes the extractor as before the option existed, so its cache stays valid."""
    extractor = FeatureExtractor("resnet18", [2], _settings("timm"))
    assert "init" not in extractor.description and "batchnorm" not in extractor.description
    assert extractor.calibrate(_images(3)).numel() == 0


def test_trained_students_keep_timm_init_and_teachers_are_calibrated():
    from competition.zoo.registry import build_model

    student = create_backbone("resnet18", (1,), False, seed=1, frozen=False, init="healthy")
    assert not getattr(student, "needs_calibration", False)
    assert float(student.layer1[0].bn2.weight.detach().abs().max()) == 0  # timm's training init
    for name in ("stfpm-resnet18", "reverse-distillation-resnet18", "fastflow-resnet18"):
        network = build_model(name, _settings()).build_model()
        calibrated = calibrate_backbones(network, np.zeros((2, 32, 32, 3), np.uint8) + 100, _settings())
        assert calibrated == 1, name


def test_bfloat16_features_are_keyed_apart_and_close_to_float32():
    """zoo.cpu_amp: bfloat16 features are other bits (another cache folder), near the float32 ones."""
    images = _images(5)
    full = FeatureExtractor("resnet18", [1, 2], _settings())
    half = FeatureExtractor("resnet18", [1, 2], _settings(cpu_amp="bf16"))
    assert "compute" not in full.description and half.description["compute"] == "bfloat16 autocast"
    full.calibrate(images)
    half.calibrate(images)
    assert half.key != full.key
    for a, b in zip(full.extract_all(images), half.extract_all(images)):
        assert not torch.equal(a, b)
        assert float((a - b).norm() / a.norm()) < 0.05


def test_a_draw_is_another_random_extractor_reproduced_on_load(tmp_path):
    """`draw: k` seeds the model's random backbone and channel subset apart from draw 0 (another member to
    average), the same draw twice gives the same scores, and a saved draw reloads as itself."""
    from competition.zoo.api import DRAW_SEED_STRIDE
    from competition.zoo.registry import build_model

    images = _images(6)
    first = build_model("padim-resnet18", _settings())
    assert first.settings.seed == 0
    drawn = build_model("padim-resnet18", _settings(), {"draw": 2})
    assert drawn.settings.seed == 2 * DRAW_SEED_STRIDE
    first.fit(images)
    drawn.fit(images)
    assert not torch.equal(first.model.channels, drawn.model.channels)
    assert not np.allclose(first.score_samples(images), drawn.score_samples(images))
    again = build_model("padim-resnet18", _settings(), {"draw": 2}).fit(images)
    np.testing.assert_array_equal(again.score_samples(images), drawn.score_samples(images))
    loaded = type(drawn).load(drawn.save(tmp_path / "padim.pt"))
    assert loaded.settings.seed == drawn.settings.seed  # the shift applied once, not twice
    np.testing.assert_allclose(loaded.score_samples(images), drawn.score_samples(images), rtol=1e-5)
    with pytest.raises(ValueError, match="draw"):
        build_model("padim-resnet18", _settings(), {"draw": -1})


def test_a_backbone_first_built_while_scoring_can_be_calibrated_by_a_later_fit(tmp_path):
    """Scoring runs in inference mode; the memoised backbone it builds must still take a later fit's
    in-place BatchNorm re-estimation (it raised "Inplace update to inference tensor" before)."""
    from competition.zoo.registry import build_model

    images = _images(5)
    path = build_model("padim-resnet18", _settings()).fit(images).save(tmp_path / "padim.pt")
    shared_extractor("resnet18", [1], _settings(seed=3))  # the memo now holds another backbone
    loaded = build_model("padim-resnet18", _settings()).load(path)
    scores = loaded.score_samples(images)  # rebuilds the seed-0 backbone inside inference mode
    refit = build_model("padim-resnet18", _settings()).fit(images)
    np.testing.assert_allclose(refit.score_samples(images), scores, rtol=1e-5)


@pytest.mark.parametrize("name", ["padim-resnet18", "dfm-resnet18", "dfkde-resnet18", "fre-resnet18",
                                  "patchcore-resnet18"])
def test_fit_takes_its_batchnorm_statistics_from_the_images_it_is_given_for_them(name):
    """`fit(..., batchnorm_images=X)` estimates a healthy backbone's statistics on X, not on the fit images."""
    from competition.zoo.registry import build_model

    images, others = _images(5), _images(6, seed=1)
    on_others = shared_extractor("resnet18", [1, 2, 3], _settings()).calibrate(others)
    on_images = shared_extractor("resnet18", [1, 2, 3], _settings()).calibrate(images)
    assert not torch.equal(on_others, on_images)
    model = build_model(name, _settings()).fit(images, batchnorm_images=others)
    assert torch.equal(model.model.backbone_statistics, on_others)
    assert torch.equal(build_model(name, _settings()).fit(images).model.backbone_statistics, on_images)


def test_runner_gives_every_fold_the_test_images_statistics_when_asked(tiny_cfg):
    """zoo.batchnorm_images: test: every fold's healthy backbone is the one calibrated on the test images (so
    the folds share one network); fit: each fold's own fit normals, different per fold."""
    from competition.folds import load_index, read_folds
    from competition.zoo.registry import run_shared_layers
    from competition.zoo.runner import fit_fold

    index = load_index(tiny_cfg)
    folds = read_folds(tiny_cfg, index)
    test = ImageSet.from_frame(index[index["split"] == "test"])
    tiny_cfg.zoo.backbone_init, tiny_cfg.zoo.image_size = "healthy", 32
    run = run_shared_layers(tiny_cfg, [*tiny_cfg.zoo.models, "padim-resnet18"])  # the network the runner builds
    on_test = shared_extractor("resnet18", [1, 2, 3], _settings(seed=tiny_cfg.seed, shared_layers=run)).calibrate(test)

    def statistics(fold: int, which: str) -> tuple[torch.Tensor, str]:
        tiny_cfg.zoo.batchnorm_images = which
        model, facts = fit_fold(tiny_cfg, "padim-resnet18", fold, folds, Path(tiny_cfg.paths.work) / f"{which}{fold}",
                                test)
        return model.model.backbone_statistics, facts["batchnorm_images"]

    (fit0, said0), (fit1, _) = statistics(0, "fit"), statistics(1, "fit")
    assert said0 == "fit" and not torch.equal(fit0, fit1) and not torch.equal(fit0, on_test)
    (test0, said), (test1, _) = statistics(0, "test"), statistics(1, "test")
    assert said == "test" and torch.equal(test0, on_test) and torch.equal(test1, on_test)


def test_run_widens_each_network_to_its_readers_layers_only():
    """`zoo.models` of configs/real.yaml: PaDiM layer1, its defect probe and FRE layer3 read draw 0's network, so it
    computes layers 1 and 3 (one cache entry for the three); the draws @1 and @2 and the probe's further networks
    (draws 1-4) are read at layer1 alone, so those networks stop there."""
    from competition.config import load_config
    from competition.zoo.api import DRAW_SEED_STRIDE
    from competition.zoo.registry import build_from_config, run_shared_layers

    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "real.yaml"), ["zoo.backbone_init=healthy"])
    assert run_shared_layers(cfg, list(cfg.zoo.models)) == {
        f"resnet18@{cfg.seed}": [1, 3], **{f"resnet18@{cfg.seed + k * DRAW_SEED_STRIDE}": [1] for k in range(1, 5)}}
    draw = build_from_config("padim-resnet18-layer1@1", cfg)
    assert draw._extractor().layers == (1,)
    assert build_from_config("padim-resnet18-layer1", cfg)._extractor().layers == (1, 3)
    assert build_from_config("padim-resnet18-layer1-probe", cfg)._extractor().layers == (1, 3)
    # the probe over three networks reads layer1 of draws 0, 1 and 2: the networks of PaDiM, @1 and @2
    seeds = [cfg.seed + k * DRAW_SEED_STRIDE for k in range(3)]
    assert run_shared_layers(cfg, ["padim-resnet18-layer1-probe3"]) == {f"resnet18@{s}": [1] for s in seeds}
    probe3 = build_from_config("padim-resnet18-layer1-probe3", cfg)
    assert [probe3._extractor(k).settings.seed for k in range(3)] == seeds
    assert probe3._extractor(2).layers == (1,)
    # a model outside zoo.models still gets its own layers, and a model built outside a run the superset
    assert build_from_config("patchcore-resnet18", cfg)._extractor().layers == (1, 2, 3)
    assert shared_extractor("resnet18", [1], _settings()).layers == (1, 2, 3, 4)


def test_a_network_stopped_at_layer1_gives_the_widened_network_s_features():
    """Widening only shares a cache entry: a healthy random resnet18 computed to layer1 alone has bitwise the
    layer1 features and BatchNorm statistics (of those layers) of the same network computed to layer4."""
    images = _images(6)
    wide = shared_extractor("resnet18", [1], _settings())
    wide_stats = wide.calibrate(images)
    wide_maps = wide.select(wide.extract_all(images), [1])[0]
    narrow = shared_extractor("resnet18", [1], _settings(shared_layers={"resnet18@0": [1]}))
    assert narrow.layers == (1,) and narrow.key != wide.key
    narrow_stats = narrow.calibrate(images)
    assert torch.equal(narrow_stats, wide_stats[:narrow_stats.numel()])
    assert torch.equal(narrow.extract_all(images)[0], wide_maps)


def test_reflect_padding_removes_the_zero_frame_and_keys_the_cache_apart():
    """zoo.backbone_padding: a flat grey image gives flat features with reflection (every cell sees grey), while
    zero padding makes the border cells differ from the interior; reflect is its own cache key, zeros the former."""
    grey = np.full((1, 32, 32, 3), 128, np.uint8)
    spread = {}
    for padding in ("zeros", "reflect"):
        extractor = FeatureExtractor("resnet18", [1], _settings(backbone_padding=padding))
        extractor.calibrate(_images(4))
        layer1 = extractor.extract_all(ImageSet(list(grey)))[0][0].float()  # (C, h, w)
        spread[padding] = float((layer1 - layer1[:, 3:5, 3:5].mean((1, 2), keepdim=True)).abs().amax())
        assert ("padding" in extractor.description) == (padding == "reflect")
    assert spread["reflect"] < 1e-3 < spread["zeros"]
    with pytest.raises(ValueError, match="backbone_padding"):
        create_backbone("resnet18", (1,), False, seed=0, padding="circular-ish")
    with pytest.raises(ValueError, match="image_size above 32"):  # layer4 of a 32-px canvas is 1x1: nothing to mirror
        FeatureExtractor("resnet18", [1, 4], _settings(backbone_padding="reflect"))
