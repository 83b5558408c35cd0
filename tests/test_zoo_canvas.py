"""`zoo.image_sizes`: an entry on its own canvas beside the rest of the zoo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from competition.config import ConfigError, load_config
from competition.stage import ConfigChangedError
from competition.zoo.registry import build_from_config, entry_image_size, load_model
from competition.zoo.runner import main, zoo_record

MODELS = "zoo.models=[padim-resnet18-layer1, fre-resnet18, padim-resnet18-layer1-probe3]"


def test_an_entry_takes_its_own_canvas_and_reads_only_its_canvas_networks():
    cfg = load_config(None, [MODELS, "zoo.image_size=48", "zoo.image_sizes={padim-resnet18-layer1-probe3: 64}"])
    probe = build_from_config("padim-resnet18-layer1-probe3", cfg)
    padim = build_from_config("padim-resnet18-layer1", cfg)
    assert probe.settings.image_size == 64 and padim.settings.image_size == 48
    assert build_from_config("fre-resnet18", cfg).settings.image_size == 48
    # the probe's canvas holds no FRE: its extractor computes layer1 alone, while at 48 px the first network
    # also computes FRE's layer3 for the models there
    assert len(probe.settings.shared_layers) == 3
    assert all(layers == [1] for layers in probe.settings.shared_layers.values())
    assert 3 in next(iter(padim.settings.shared_layers.values()))
    # a draw NAME@K takes NAME's canvas unless it is named itself
    cfg = load_config(None, ["zoo.image_size=48", "zoo.image_sizes={padim-resnet18-layer1: 64, "
                                                  "padim-resnet18-layer1@2: 80}"])
    assert [entry_image_size(cfg, n) for n in ("padim-resnet18-layer1", "padim-resnet18-layer1@1",
                                               "padim-resnet18-layer1@2", "fre-resnet18")] == [64, 64, 80, 48]


def test_another_entrys_canvas_leaves_a_models_record_alone():
    plain = load_config(None, [MODELS, "zoo.image_size=48"])
    other = load_config(None, [MODELS, "zoo.image_size=48", "zoo.image_sizes={padim-resnet18-layer1-probe3: 64}"])
    assert zoo_record(plain, "padim-resnet18-layer1") == zoo_record(other, "padim-resnet18-layer1")
    assert zoo_record(other, "padim-resnet18-layer1-probe3")["zoo"]["image_size"] == 64
    assert zoo_record(plain, "padim-resnet18-layer1-probe3")["zoo"]["image_size"] == 48


@pytest.mark.parametrize("side", ["8", "true", "64.5"])
def test_a_canvas_below_16_or_not_a_side_is_refused_naming_its_key(side):
    with pytest.raises(ConfigError, match="zoo.image_sizes"):
        load_config(None, [f"zoo.image_sizes={{padim-resnet18: {side}}}"])


def test_the_runner_fits_an_entry_on_its_canvas_and_refuses_an_unknown_name(tiny_cfg):
    overrides = [f"paths.data={tiny_cfg.paths.data}", f"paths.work={tiny_cfg.paths.work}", "experiment=canvas",
                 f"folds.n_splits={tiny_cfg.folds.n_splits}", "zoo.image_size=48", "zoo.batch_size=16",
                 "zoo.gallery_size=2", "train.threads=1", "zoo.backbone_init=healthy"]
    cfg = load_config(None, [*overrides, "zoo.image_sizes={padim-resnet18-layer1: 64}"])
    main(cfg, model="padim-resnet18-layer1", fold="0", force=False)
    out = Path(tiny_cfg.paths.work) / "canvas" / "padim-resnet18-layer1" / "fold0"
    assert load_model(out / "model.pt").settings.image_size == 64
    assert json.loads((out / "summary.json").read_text())["n_fit"] > 0
    # the fold's record names its canvas: the same entry at zoo.image_size is another result
    stamp = (out / "summary.json").stat().st_mtime_ns
    main(cfg, model="padim-resnet18-layer1", fold="0", force=False)
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigChangedError, match="zoo.image_size: 64 -> 48"):
        main(load_config(None, overrides), model="padim-resnet18-layer1", fold="0", force=False)
    with pytest.raises(ValueError, match="zoo.image_sizes"):
        main(load_config(None, [*overrides, "zoo.image_sizes={padim-resnet18-layer9: 64}"]), model=None,
             fold="0", force=False)
