"""`python -m competition pseudo`: pick a second round's pseudo-labels from a finished first round.

The first round (`pseudo.source`, an experiment under the same `paths.work`) has stacked every model's
test scores and thresholded them (`<paths.work>/<source>/_ensemble/test.csv`: score, answer). Its most
confident calls become training labels of this experiment: the lowest-scoring `normal_share` of the
images it predicted normal, the highest-scoring `defect_share` of those it predicted defective. Both
shares are ranks within the predicted side, so they mean the same under every stacker and threshold.

Writes `<paths.work>/<experiment>/pseudo.csv` (image_id, label, score, mask_path, mask_sha1) and
`pseudo.json` (the source, a digest of the test scores it read, the counts). `folds.training_folds` adds
them to every fold's training set; a fold's record keeps pseudo.csv's digest, so a changed pick (or mask)
makes its folds stale, not reused.

A pseudo defect has no mask of its own. In tiled training such an image is shown whole, letterboxed into
one tile, where a 640-pixel board shrinks four-fold and its few-pixel defects vanish. With `pseudo.masks`,
the source's classifier (SegDecNet, or the mask head) draws one: its defect-probability map of the image,
averaged over its fold models, where it reaches `pseudo.mask_threshold` times the map's maximum. Relative,
because the stack called the image defective with confidence while the map's own level varies (on deeppcb
an absolute 0.5 was reached on 29 of 94 pseudo-defects): the most suspicious region is where the defect
most likely is, as multiple-instance learning takes the top instance. The defect's tiles then show it at
native scale, and the segmentation loss sees where it is. These are the first round's own beliefs, as the
labels are (self-training); a map that is zero everywhere leaves the image weak, as before. A masked
pseudo-defect is a masked defect to training in every way, so `positives.kinds: transplant` may move it too.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from competition.artifacts import (
    atomic_path,
    file_digest,
    model_dir,
    pseudo_labels_path,
    read_table,
    write_csv,
    write_json,
)
from competition.config import Config
from competition.ensemble.infer import ENSEMBLE_DIR

PSEUDO_COLUMNS = ["image_id", "label", "score"]
MASK_COLUMNS = ["mask_path", "mask_sha1"]  # pseudo.csv's: "" where a pseudo label has no mask


def select_pseudo_labels(test: pd.DataFrame, normal_share: float, defect_share: float) -> pd.DataFrame:
    """Confident rows of a stacked test table (image_id, score, answer): image_id, label, score.

    Ties in score are broken by image id, so the pick is the same on every run."""
    ordered = test.assign(image_id=test["image_id"].astype(str)).sort_values(["score", "image_id"], kind="stable")
    normal = ordered[ordered["answer"].astype(int) == 0]
    defect = ordered[ordered["answer"].astype(int) == 1].iloc[::-1]
    picked = [normal.head(int(normal_share * len(normal))).assign(label=0),
              defect.head(int(defect_share * len(defect))).assign(label=1)]
    return pd.concat(picked, ignore_index=True)[PSEUDO_COLUMNS]


def source_scores_path(cfg: Config) -> Path:
    return Path(cfg.paths.work) / str(cfg.pseudo.source) / ENSEMBLE_DIR / "test.csv"


def main(cfg: Config) -> Path:
    if not cfg.pseudo.enabled:
        raise ValueError("pseudo.enabled is false: set it (and pseudo.source, the first-round experiment) in a "
                         "second-round experiment, e.g. --set pseudo.enabled=true --set pseudo.source=real "
                         "--set experiment=real-pseudo")
    source = source_scores_path(cfg)
    if not source.exists():
        raise ValueError(f"{source} not found: finish the first round (experiment {cfg.pseudo.source!r}: its "
                         "folds and `infer`) under the same paths.work first")
    test = read_table(source)
    missing = {"image_id", "score", "answer"} - set(test.columns)
    if missing:
        raise ValueError(f"{source} lacks column(s) {sorted(missing)}: re-run infer of {cfg.pseudo.source!r}")
    labels = select_pseudo_labels(test, cfg.pseudo.normal_share, cfg.pseudo.defect_share)
    labels[MASK_COLUMNS] = ""
    out = pseudo_labels_path(cfg.paths.work, cfg.experiment)
    defects = labels.index[labels["label"] == 1]
    if cfg.pseudo.masks and len(defects):
        from competition.folds import load_index

        paths = load_index(cfg).set_index("image_id")["path"].astype(str)
        ids = labels.loc[defects, "image_id"].tolist()
        masks = write_pseudo_masks(ids, paths.loc[ids].tolist(), source_map_maker(cfg), cfg.pseudo.mask_threshold,
                                   out.parent / "pseudo_masks")
        labels.loc[defects, "mask_path"] = [masks.get(i, "") for i in ids]
        labels.loc[defects, "mask_sha1"] = [file_digest(masks[i]) if i in masks else "" for i in ids]
    write_csv(labels, out)
    counts = {"n_test": len(test), "n_predicted_defect": int(test["answer"].astype(int).sum()),
              "n_normal": int((labels["label"] == 0).sum()), "n_defect": int((labels["label"] == 1).sum()),
              "n_defect_masks": int((labels["mask_path"] != "").sum())}
    write_json({"source": cfg.pseudo.source, "source_test_csv": str(source), "source_sha1": file_digest(source),
                "normal_share": cfg.pseudo.normal_share, "defect_share": cfg.pseudo.defect_share,
                "masks": cfg.pseudo.masks, "mask_threshold": cfg.pseudo.mask_threshold, **counts},
               out.with_suffix(".json"))
    print(f"pseudo-labels from {cfg.pseudo.source!r} ({counts['n_test']} test images, "
          f"{counts['n_predicted_defect']} predicted defective): {counts['n_normal']} normal and "
          f"{counts['n_defect']} defect ({counts['n_defect_masks']} with a mask drawn by the source's classifier) "
          f"-> {out}")
    return out


def source_map_maker(cfg: Config) -> Callable[[str, np.ndarray], np.ndarray]:
    """image path, decoded image -> the source classifier's defect-probability map on the image's pixels, the
    mean over its fold models (`predict.ClassifierFold`: each fold model as its test.csv scored)."""
    from competition.predict import ClassifierFold
    from competition.runtime import select_device

    root = model_dir(cfg.paths.work, str(cfg.pseudo.source), cfg.model.name)
    fold_dirs = [root / f"fold{k}" for k in range(cfg.folds.n_splits)]
    missing = [str(d) for d in fold_dirs if not (d / "best.pt").exists()]
    if missing:
        raise ValueError(f"pseudo.masks needs the source experiment's classifier ({cfg.model.name}) on every fold; "
                         f"missing {missing[0]}: finish {cfg.pseudo.source!r} first, or set pseudo.masks=false")
    device = select_device(cfg.device)
    folds = [ClassifierFold(d, device, "torch") for d in fold_dirs]

    def probability(path: str, image: np.ndarray) -> np.ndarray:
        maps = []
        for fold in folds:
            fold.begin_chunk([path], [image])
            drawn = fold.maps([path], [image])
            if drawn is None:
                raise ValueError(f"pseudo.masks: the source classifier {cfg.model.name} has no segmentation output "
                                 "(use SegDecNet or mask_head.enabled=true in the source), or set pseudo.masks=false")
            heat = drawn[0][1].astype(np.float32)
            if heat.shape != image.shape[:2]:  # the surface at another scale: back onto the image's pixels
                heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            maps.append(heat)
        return np.mean(maps, axis=0)

    return probability


def write_pseudo_masks(image_ids: list[str], paths: list[str], probability: Callable[[str, np.ndarray], np.ndarray],
                       threshold: float, out_dir: Path) -> dict[str, str]:
    """{image id: mask PNG}: 255 where the map reaches `threshold` times its maximum, else 0; an image whose map
    is zero everywhere gets none."""
    from competition.data.images import read_image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for image_id, path in tqdm(list(zip(image_ids, paths)), desc="pseudo masks", unit="img"):
        heat = probability(path, read_image(path))
        peak = float(heat.max()) if heat.size else 0.0
        if not peak > 0:
            continue
        mask = heat >= threshold * peak
        target = out_dir / f"{image_id}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        written[image_id] = str(target)
    return written
