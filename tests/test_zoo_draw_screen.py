"""Screened draws (`screen_draws`): NAME, NAME@1 stand on the best and second-best of the screened random networks,
exactly as if that draw had been asked for; a fold screens once; the screen reads training-fold images only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition.artifacts import read_json
from competition.config import load_config
from competition.ensemble.gather import model_names
from competition.folds import load_index, read_folds
from competition.zoo import draws
from competition.zoo.runner import main

NAME = "padim-resnet18-layer1"


def _config(tiny_cfg, experiment: str, *overrides: str):
    sets = {"paths.data": tiny_cfg.paths.data, "paths.work": tiny_cfg.paths.work, "experiment": experiment,
            "folds.n_splits": tiny_cfg.folds.n_splits, "zoo.image_size": 32, "zoo.batch_size": 16,
            "zoo.gallery_size": 0, "zoo.painted_per_fold": 0, "train.threads": 1, "zoo.backbone_init": "healthy"}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()] + list(overrides))


def test_draws_are_the_screens_best_in_order_screened_once_and_fitted_as_that_draw(tiny_cfg, monkeypatch):
    calls = []
    screen_fold = draws.screen_fold
    monkeypatch.setattr(draws, "screen_fold", lambda *a, **k: calls.append(a[2]) or screen_fold(*a, **k))
    cfg = _config(tiny_cfg, "screen", f"zoo.models=[{NAME}, {NAME}@1]", f"zoo.params={{{NAME}: {{screen_draws: 4}}}}")
    main(cfg, model=None, fold="0", force=False)
    assert calls == [0]  # NAME@1 read the screen NAME made
    root = Path(cfg.paths.work) / "screen"
    screen = read_json(root / "_draw_screen" / NAME / "fold0.json")
    ranked = screen["candidates"]
    assert sorted(c["draw"] for c in ranked) == [0, 1, 2, 3]
    assert [c["auroc"] for c in ranked] == sorted((c["auroc"] for c in ranked), reverse=True)
    assert len({c["auroc"] for c in ranked}) > 1  # the networks do differ
    for rank, name in enumerate((NAME, f"{NAME}@1")):
        summary = read_json(root / name / "fold0" / "summary.json")
        assert summary["params"]["draw"] == ranked[rank]["draw"]
        assert summary["screened_draw"] == {"draw": ranked[rank]["draw"], "rank": rank,
                                            "auroc": ranked[rank]["auroc"]}
        assert read_json(root / name / "fold0" / "draw_screen.json")["draw"] == ranked[rank]["draw"]
    # the second-best network, asked for by its number without a screen, scores the same
    second = ranked[1]["draw"]
    plain = _config(tiny_cfg, "plain", f"zoo.models=[{NAME}]", f"zoo.params={{{NAME}: {{draw: {second}}}}}")
    main(plain, model=NAME, fold="0", force=False)
    screened = pd.read_csv(root / f"{NAME}@1" / "fold0" / "oof.csv")
    asked = pd.read_csv(Path(cfg.paths.work) / "plain" / NAME / "fold0" / "oof.csv")
    np.testing.assert_allclose(screened["score"], asked["score"], rtol=1e-6)
    assert model_names(cfg.paths.work, "screen") == [NAME, f"{NAME}@1"]  # the stack skips _draw_screen


@pytest.mark.parametrize("min_real_defects", [1, 1000])  # real defects only / real and painted ones
def test_the_screen_reads_only_training_fold_images(tiny_cfg, min_real_defects):
    cfg = _config(tiny_cfg, "split", f"zoo.min_real_defects={min_real_defects}")
    folds = read_folds(cfg, load_index(cfg))
    train_rows, held = folds[folds["fold"] != 1], folds[folds["fold"] == 1]
    fit, judged, labels, positives = draws.judging_split(cfg, train_rows, 1)
    judged_ids = {i.split(":", 1)[-1] for i in judged.ids}  # painted copies are named painted:<image id>
    assert set(fit.ids) <= set(train_rows.loc[train_rows["label"] == 0, "image_id"])
    assert judged_ids <= set(train_rows["image_id"]) and not (set(fit.ids) | judged_ids) & set(held["image_id"])
    normals_judged = {i for i, y in zip(judged.ids, labels) if y == 0}
    assert normals_judged and not normals_judged & set(fit.ids)
    assert ("painted" in positives) == (min_real_defects == 1000) and labels.sum() > 0


def test_a_kept_screen_made_under_another_config_is_made_again(tiny_cfg):
    cfg = _config(tiny_cfg, "stale", f"zoo.params={{{NAME}: {{screen_draws: 2}}}}")
    folds = read_folds(cfg, load_index(cfg))
    train_rows = folds[folds["fold"] != 0]
    first = draws.screened_draw(cfg, NAME, 0, train_rows, None, {"zoo": {"image_size": 32}})
    kept = draws.screen_path(cfg, NAME, 0)
    stamp = kept.stat().st_mtime_ns
    assert draws.screened_draw(cfg, NAME, 0, train_rows, None, {"zoo": {"image_size": 32}}) == first
    assert kept.stat().st_mtime_ns == stamp
    draws.screened_draw(cfg, NAME, 0, train_rows, None, {"zoo": {"image_size": 48}})
    assert read_json(kept)["config"] == {"zoo": {"image_size": 48}}


@pytest.mark.parametrize(("params", "message"), [
    (f"{NAME}@2: {{screen_draws: 2}}", "ranked 3, among 2"),
    (f"{NAME}: {{screen_draws: 3, backbone_weights: /nowhere.safetensors}}", "loads weights"),
    ("supersimplenet-supervised: {screen_draws: 3}", "trains on defects"),
    ("padim-resnet18-layer1-probe: {screen_draws: 3}", "trains on defects"),
])
def test_a_screen_that_cannot_be_made_says_why(tiny_cfg, params, message):
    cfg = _config(tiny_cfg, "bad", f"zoo.params={{{params}}}")
    name = params.split(":")[0]
    with pytest.raises(ValueError, match=message):
        draws.screen_size(cfg, name)
    assert draws.screen_size(_config(tiny_cfg, "unscreened"), NAME) == 0
