"""The one fold assignment every model reuses, so out-of-fold predictions line up.

`folds.csv` (`image_id,label,group,fold`) is stratified k-fold over the labeled training images,
grouped when groups exist (scikit-learn's StratifiedGroupKFold). `folds.json` beside it records a
fingerprint of the dataset; reading folds for a changed dataset stops instead of mixing silently.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from competition.artifacts import (
    UnreadableFileError,
    file_digest,
    pseudo_labels_path,
    read_json,
    read_table,
    write_csv,
    write_json,
)
from competition.config import Config

FOLD_COLUMNS = ["image_id", "label", "group", "fold"]

log = logging.getLogger(__name__)


class StaleFoldsError(RuntimeError):
    """folds.csv was written for another dataset, fold count or seed."""


def load_index(cfg: Config) -> pd.DataFrame:
    """The dataset index (one row per image) for `paths.data` in the configured layout."""
    from competition.data.layouts import read_dataset

    return read_dataset(cfg.paths.data, cfg.data.layout, cfg.data.category, cfg.data.skip_unreadable_train)


def check_stage_inputs(cfg: Config, index: pd.DataFrame) -> None:
    """What check-data would stop on, checked before a stage trains anything: every test image decodes
    (a truncated one would otherwise fail only after a whole fold has trained), and every defect mask has
    its image's size (else it would be stretched silently; `data.resize_mismatched_masks` allows it with a
    warning). Defects without a mask train on their image-level label; a note says how many."""
    from competition.data.images import ImageReadError, find_unreadable, image_size
    from competition.messages import first_few

    test_paths = index.loc[index["split"] == "test", "path"].astype(str).tolist()
    failures = find_unreadable(test_paths)
    if failures:
        raise ImageReadError(failures[0][0], f"{failures[0][1]}; {len(failures)} test image(s) cannot be read: "
                             f"{first_few(f'{p} ({why})' for p, why in failures)}. Every test image needs a "
                             f"prediction: repair or replace them (python -m competition check-data lists "
                             "every problem)")
    defects = index[(index["split"] == "train") & (index["label"] == 1)]
    with_mask = defects[defects["mask_path"].astype(str) != ""]
    if len(with_mask) < len(defects):
        log.info("%d of %d training defect(s) have no mask: they train on their image-level label",
                 len(defects) - len(with_mask), len(defects))
    mismatched = []
    for row in with_mask.itertuples():
        image, mask = image_size(row.path), image_size(row.mask_path)
        if image != mask:
            mismatched.append(f"{row.mask_path} is {mask[1]}x{mask[0]}, its image {row.path} {image[1]}x{image[0]}")
    if mismatched and not cfg.data.resize_mismatched_masks:
        raise ValueError(f"{len(mismatched)} defect mask(s) differ in size from their image: "
                         f"{first_few(mismatched)}. Fix the masks, or set data.resize_mismatched_masks: true to "
                         "resize them (nearest neighbour) with a warning")
    for line in mismatched:
        log.warning("resizing a mask to its image (data.resize_mismatched_masks): %s", line)


def labeled_train(index: pd.DataFrame) -> pd.DataFrame:
    return index[(index["split"] == "train") & index["label"].notna()].reset_index(drop=True)


def make_folds(train: pd.DataFrame, n_splits: int, seed: int) -> pd.DataFrame:
    """Assign a fold to each labeled training image; groups never straddle folds."""
    labels = train["label"].astype(int).to_numpy()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    groups = train["group"].astype(str).to_numpy()
    grouped = len(set(groups)) < len(groups)
    if n_neg < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} normal training images; found {n_neg}. "
                         f"Add normal images{f' or set folds.n_splits={n_neg}' if n_neg >= 2 else ''}.")
    if 2 <= n_pos < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} defect images to put one in every fold; found "
                         f"{n_pos}. Set folds.n_splits={n_pos} (--set folds.n_splits={n_pos}), or add defect images.")
    if n_pos < 2:
        # Nothing to stratify: the unsupervised zoo still fits on each fold's normals and scores the test
        # images; the classifier and the stacker need labelled defects and will say so.
        log.warning("%d defect image(s) among the training images: folds are assigned without stratification; "
                    "the anomaly zoo (make zoo) can run on the normals, training the classifier and stacking "
                    "need defects", n_pos)
        splitter = GroupKFold(n_splits=n_splits) if grouped else KFold(n_splits=n_splits, shuffle=True,
                                                                       random_state=seed)
        splits = splitter.split(train, labels, groups) if grouped else splitter.split(train)
    elif grouped:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(train, labels, groups)
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(train, labels)
    fold = pd.Series(-1, index=train.index, dtype=int)
    for k, (_, val_idx) in enumerate(splits):
        fold.iloc[val_idx] = k
    out = train[["image_id", "label", "group"]].copy()
    out["label"] = out["label"].astype(int)
    out["fold"] = fold.to_numpy()
    return out[FOLD_COLUMNS]


def dataset_fingerprint(train: pd.DataFrame) -> str:
    """Hash of ids, labels, groups and file sizes: changes when the dataset does."""
    sizes = [Path(p).stat().st_size if Path(p).exists() else -1 for p in train["path"]]
    rows = sorted(zip(train["image_id"].astype(str), train["label"].astype(int), train["group"].astype(str), sizes))
    digest = hashlib.sha256()
    for row in rows:
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()


def images_fingerprint(rows: pd.DataFrame) -> str:
    """Hash of the rows' image ids and file sizes: changes when those images do."""
    sizes = [Path(p).stat().st_size if Path(p).exists() else -1 for p in rows["path"]]
    digest = hashlib.sha256()
    for row in sorted(zip(rows["image_id"].astype(str), sizes)):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()


def test_fingerprint(index: pd.DataFrame) -> str:
    """`images_fingerprint` of the test images: changes when the test set does."""
    return images_fingerprint(index[index["split"] == "test"])


def fold_inputs(cfg: Config, pseudo: bool = True) -> dict[str, str]:
    """What a fold's results depend on besides the config: the dataset (training and test fingerprints that
    `read_folds` has checked against the files) and the fold assignment itself (a digest of folds.csv), and
    with `pseudo` (a stage that trains on them) the pseudo-labels. Kept in every fold's record, so a fold made
    before the data or folds changed is refused, not reused."""
    csv_path, meta_path = folds_paths(cfg)
    if not meta_path.exists() or not csv_path.exists():
        return {}
    meta = read_json(meta_path)
    inputs = {"train": meta.get("fingerprint", ""), "test": meta.get("test_fingerprint", ""),
              "folds_csv": file_digest(csv_path)}
    labels = pseudo_labels_path(cfg.paths.work, cfg.experiment)
    if pseudo and cfg.pseudo.enabled and labels.exists():
        inputs["pseudo_csv"] = file_digest(labels)
    return inputs


def folds_paths(cfg: Config) -> tuple[Path, Path]:
    work = Path(cfg.paths.work)
    return work / "folds.csv", work / "folds.json"


def write_folds(cfg: Config, index: pd.DataFrame | None = None) -> Path:
    index = load_index(cfg) if index is None else index
    train = labeled_train(index)
    folds = make_folds(train, cfg.folds.n_splits, cfg.seed)
    csv_path, meta_path = folds_paths(cfg)
    write_csv(folds, csv_path)
    write_json({
        "data": str(cfg.paths.data),
        "n_splits": cfg.folds.n_splits,
        "seed": cfg.seed,
        "n_images": len(folds),
        "n_defect": int(folds["label"].sum()),
        "fingerprint": dataset_fingerprint(train),
        "test_fingerprint": test_fingerprint(index),
    }, meta_path)
    return csv_path


def read_folds(cfg: Config, index: pd.DataFrame | None = None) -> pd.DataFrame:
    """The labeled training index with its `fold` column; stops if folds.csv is missing or stale."""
    index = load_index(cfg) if index is None else index
    train = labeled_train(index)
    csv_path, meta_path = folds_paths(cfg)
    if not csv_path.exists() or not meta_path.exists():
        raise StaleFoldsError(f"{csv_path} not found: run `make folds` (python -m competition folds) first")
    try:
        meta = read_json(meta_path)
    except UnreadableFileError as exc:
        raise StaleFoldsError(f"{exc}; delete it and re-run `make folds` (python -m competition folds)") from None
    problems = []
    if meta.get("n_splits") != cfg.folds.n_splits:
        problems.append(f"it has {meta.get('n_splits')} folds, the config asks for {cfg.folds.n_splits}")
    if meta.get("seed") != cfg.seed:
        problems.append(f"it was split with seed {meta.get('seed')}, the config has seed {cfg.seed}")
    if meta.get("fingerprint") != dataset_fingerprint(train):
        problems.append(f"the dataset at {cfg.paths.data} changed since it was written")
    elif "test_fingerprint" in meta and meta["test_fingerprint"] != test_fingerprint(index):  # older files lack it
        problems.append(f"the test images at {cfg.paths.data} changed since it was written")
    folds = read_table(csv_path, id_columns=("image_id", "group"))
    if set(folds["image_id"]) != set(train["image_id"]):
        problems.append("its image ids differ from the dataset's labeled training images")
    if problems:
        raise StaleFoldsError(f"{csv_path} is stale: {'; '.join(problems)}. Re-run `make folds` "
                              "(every model must then be re-run on the new folds).")
    merged = train.merge(folds[["image_id", "fold"]], on="image_id", how="left", validate="one_to_one")
    merged["fold"] = merged["fold"].astype(int)
    return merged


PSEUDO_FOLD = -1  # the fold of pseudo-labelled test rows: never a validation fold, so in every fold's training set


def training_folds(cfg: Config, index: pd.DataFrame, pseudo: bool = True) -> pd.DataFrame:
    """What the classifier and the zoo train on: `read_folds`' table, plus with `pseudo.enabled` (and
    `pseudo`: the zoo passes `pseudo.zoo`) the pseudo-labelled test images of pseudo.csv as rows of fold -1
    (a pseudo defect has no mask unless `pseudo.masks` drew one: a weak label). Fold k's validation rows are
    those of fold k, so a pseudo-labelled image is never validated on and never gets an out-of-fold score;
    stacking and the leaderboard read `read_folds`, without them."""
    folds = read_folds(cfg, index)
    if not (cfg.pseudo.enabled and pseudo):
        return folds
    path = pseudo_labels_path(cfg.paths.work, cfg.experiment)
    if not path.exists():
        raise StaleFoldsError(f"{path} not found: pseudo.enabled needs `python -m competition pseudo` "
                              f"(make pseudo) first, which picks them from experiment {cfg.pseudo.source!r}")
    labels = read_table(path)
    test = index[index["split"] == "test"]
    unknown = sorted(set(labels["image_id"]) - set(test["image_id"]))
    if unknown:
        raise StaleFoldsError(f"{path} names {len(unknown)} image(s) that are not test images of {cfg.paths.data} "
                              f"(first: {unknown[0]}): re-run `python -m competition pseudo`")
    shared = sorted(set(labels["image_id"]) & set(folds["image_id"]))
    if shared:
        raise ValueError(f"test image id {shared[0]} is also a training image id: pseudo-labels need distinct ids")
    masks = labels["mask_path"].astype(object).fillna("").astype(str) if "mask_path" in labels else ""
    rows = test.drop(columns=["label", "mask_path"]).merge(labels[["image_id", "label"]].assign(mask_path=masks),
                                                           on="image_id", how="inner")
    rows["label"] = rows["label"].astype(int)
    rows["group"] = rows["image_id"].astype(str)
    rows["fold"] = PSEUDO_FOLD
    return pd.concat([folds, rows[folds.columns]], ignore_index=True)


def parse_fold_arg(fold: str | int, n_splits: int) -> list[int]:
    """`all` -> every fold; `k` -> [k], checked against the fold count."""
    if str(fold) == "all":
        return list(range(n_splits))
    try:
        k = int(fold)
    except ValueError:
        raise ValueError(f"--fold must be an integer 0..{n_splits - 1} or 'all', got {fold!r}") from None
    if not 0 <= k < n_splits:
        raise ValueError(f"--fold {k} is out of range: folds.n_splits is {n_splits} (0..{n_splits - 1})")
    return [k]


def run(cfg: Config) -> Path:
    csv_path = write_folds(cfg)
    folds = read_table(csv_path, id_columns=("image_id", "group"))
    counts = folds.groupby("fold")["label"].agg(["count", "sum"]).rename(columns={"count": "images", "sum": "defects"})
    print(counts.to_string())
    print(csv_path)
    return csv_path
