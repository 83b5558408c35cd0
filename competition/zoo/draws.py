"""Screened draws: which random network `NAME@K` stands on when its `screen_draws` is on.

Without pretrained weights the random network decides a feature model's ranking: PaDiM on layer1 of eight random
resnet18s ranked bsdata_tiles' test images at AUROC 0.79-0.88 on one fold set (README, "Screened draws"). A fold's
training images tell the networks apart before the fit. With `zoo.params.NAME.screen_draws: N`, each fold splits the
training folds' normals in two halves (by the fold's seed); every candidate draw 0..N-1 of NAME is fitted on one half
and scores the other half against the training folds' real defects (against painted copies of that half as well when
the training folds hold fewer than `zoo.min_real_defects` real ones: `validation.split_validation`). The candidates are
ranked by that AUROC, and `NAME@K` (NAME itself is K = 0) is then fitted as usual on the K-th best draw. No image of
the held-out fold is read, so the out-of-fold scores stay honest; each fold may choose other networks, and the stack
normalises every fold model's scores on their own (`ensemble.stacking`).

The ranking of a fold is kept in `<paths.work>/<experiment>/_draw_screen/NAME/fold<k>.json` with the config it was
made under, so NAME, NAME@1 and NAME@2 screen once; the fitted fold's `draw_screen.json` repeats it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from competition.artifacts import read_json, write_json
from competition.config import Config
from competition.stage import config_differences
from competition.zoo.api import BackboneParams, ImageSet, ZooSettings
from competition.zoo.registry import build_from_config, build_model, config_params, resolved_params, split_draw
from competition.zoo.validation import defect_masks, held_out_indices, split_validation

log = logging.getLogger(__name__)

SCREEN_FOLDER = "_draw_screen"  # the stack and the leaderboard skip folders that start with "_"
JUDGED_SHARE = 0.5  # of the training normals: judged, not fitted


def screen_path(cfg: Config, name: str, fold: int) -> Path:
    return Path(cfg.paths.work) / cfg.experiment / SCREEN_FOLDER / split_draw(name)[0] / f"fold{fold}.json"


def screen_size(cfg: Config, name: str) -> int:
    """N of `screen_draws` for model `name` (0: off, or a model without a random backbone); checks its draw."""
    params = resolved_params(name, config_params(cfg, name))
    if not isinstance(params, BackboneParams) or not params.screen_draws:
        return 0
    if params.screen_draws < 0 or params.draw >= params.screen_draws:
        raise ValueError(f"zoo.params.{split_draw(name)[0]}.screen_draws: {name} asks for the draw ranked "
                         f"{params.draw + 1}, among {params.screen_draws} screened candidates; screen at least "
                         f"{params.draw + 1}")
    if build_model(name, ZooSettings(progress=False), config_params(cfg, name)).uses_defects:
        raise ValueError(f"zoo.params.{split_draw(name)[0]}: screen_draws ranks networks under models fitted on "
                         f"normals alone, and {name} trains on defects; set screen_draws: 0")
    if params.backbone_weights is not None:
        raise ValueError(f"zoo.params.{split_draw(name)[0]}: screen_draws ranks random networks, but {name} "
                         f"loads weights ({params.backbone_weights}); set screen_draws: 0")
    return params.screen_draws


def judging_split(cfg: Config, train_rows: pd.DataFrame, fold: int,
                  share: float = JUDGED_SHARE) -> tuple[ImageSet, ImageSet, np.ndarray, str]:
    """(normals to fit each candidate on, images to judge it on, their labels, what the positives are): `share`
    of the training normals and every real defect of the training folds are judged."""
    normals = ImageSet.from_frame(train_rows[train_rows["label"] == 0])
    defect_rows = train_rows[train_rows["label"] == 1]
    defects = ImageSet.from_frame(defect_rows)
    seed = cfg.seed + 1000 * fold + 17
    if len(defects) >= cfg.zoo.min_real_defects:
        held, kept = held_out_indices(len(normals), share, seed)
        judged = normals.subset(held)
        labels = np.r_[np.zeros(len(judged), int), np.ones(len(defects), int)]
        return normals.subset(kept), judged + defects, labels, f"{len(defects)} real defects"
    fit, validation = split_validation(normals, defects, share, seed, defect_masks=defect_masks(defect_rows),
                                       kinds=cfg.zoo.painted_kinds)
    painted = sum(kind == "painted" for kind in validation.kinds)
    return fit, validation.images, validation.labels, f"{len(defects)} real and {painted} painted defects"


def screen_fold(cfg: Config, name: str, fold: int, train_rows: pd.DataFrame,
                batchnorm_images: ImageSet | None) -> dict[str, Any]:
    """Fit every candidate draw of `name` on half the training normals; their AUROCs on the rest, best first."""
    n = screen_size(cfg, name)
    fit, judged, labels, positives = judging_split(cfg, train_rows, fold)
    started = time.perf_counter()
    candidates = []
    for draw in tqdm(range(n), desc=f"{split_draw(name)[0]} fold {fold}: screening draws", unit="draw"):
        model = build_from_config(name, cfg, draw=draw)
        model.fit(fit, batchnorm_images=batchnorm_images)
        scores = model.score_samples(judged)
        candidates.append({"draw": draw, "auroc": float(roc_auc_score(labels, scores))})
    ranked = sorted(candidates, key=lambda c: (-c["auroc"], c["draw"]))  # ties: the lower draw
    return {"fold": fold, "candidates": ranked, "n_fit": len(fit), "n_judged": len(judged),
            "positives": positives, "seconds": round(time.perf_counter() - started, 1)}


def screened_draw(cfg: Config, name: str, fold: int, train_rows: pd.DataFrame, batchnorm_images: ImageSet | None,
                  record: dict[str, Any]) -> dict[str, Any] | None:
    """The screened draw of `name` on fold `fold` as {"draw", "rank", "screen"}, or None with screening off.
    `record` is the results-relevant config of the model's folds (less its own draw): a kept screen made under
    another one is made again."""
    if not screen_size(cfg, name):
        return None
    path = screen_path(cfg, name, fold)
    kept = read_json(path) if path.exists() else None
    if kept is None or config_differences(kept.get("config", {}), record):
        kept = {**screen_fold(cfg, name, fold, train_rows, batchnorm_images), "config": record}
        write_json(kept, path)
    rank = resolved_params(name, config_params(cfg, name)).draw
    chosen = kept["candidates"][rank]
    log.info("%s fold %d: draw %d (AUROC %.3f on %s, ranked %d of %d)", name, fold, chosen["draw"],
             chosen["auroc"], kept["positives"], rank + 1, len(kept["candidates"]))
    return {"draw": int(chosen["draw"]), "rank": rank, "screen": {k: v for k, v in kept.items() if k != "config"}}
