"""One reader per dataset layout, all producing the same index DataFrame (one row per image).

Index columns, in order: image_id (unique str), path (absolute str), label (Int64: 1 defect,
0 normal, <NA> unlabeled), mask_path ("" when none), split ("train" | "test"), group (images that
must share a fold; defaults to image_id), defect_type ("good", a type name, or "" if unknown).
Layouts: the competition's own, MVTec AD, BTAD, VisA (its split_csv/1cls.csv) and a plain folder
per class. Listings are sorted and ignore hidden files, so the index is deterministic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from competition.artifacts import read_table
from competition.data.images import ImageReadError, find_unreadable
from competition.messages import first_few

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("image_id", "path", "label", "mask_path", "split", "group", "defect_type")
LAYOUTS = ("competition", "mvtec", "btad", "visa", "folder")
CATEGORY_LAYOUTS = ("mvtec", "btad", "visa")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUBMISSION_COLUMNS = ("ImageId", "answer")

COMPETITION_LAYOUT = """\
  <root>/train/normal_images/   normal training images
  <root>/train/defect_images/   defect training images
  <root>/train/defect_masks/    optional: a mask per defect image, same file name (extension may differ)
  <root>/train/groups.csv       optional: image_id,group (e.g. normal_images/a.png,part_7)
  <root>/test/images/           test images
  <root>/test/sample_submission.csv   columns ImageId,answer"""

# How many offending names an error message lists before summarising the rest.
_NAMES_SHOWN = 10


def _absolute(path: str | os.PathLike) -> Path:
    # abspath normalises ".." without resolving symlinks, so a linked input/ keeps its name.
    return Path(os.path.abspath(path))


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files directly in ``folder`` (and in its subfolders when ``recursive``), sorted by path.

    Hidden files and folders are skipped: macOS archives carry "._name.png" resource forks that are
    not images, and tools keep their own copies in folders such as ".ipynb_checkpoints".
    """
    folder = Path(folder)
    if not recursive:
        return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))


def list_subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _require_folder(folder: Path, layout_help: str) -> None:
    if not folder.is_dir():
        raise ValueError(f"folder {folder} not found; expected layout:\n{layout_help}")


def _require_file(path: Path, layout_help: str) -> None:
    if not path.is_file():
        raise ValueError(f"file {path} not found; expected layout:\n{layout_help}")


class FileLookup:
    """Find a file in one folder by exact name, else by a unique stem (extension may differ)."""

    def __init__(self, files: Iterable[Path]):
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for path in files:
            self.by_name[path.name] = path
            self.by_stem.setdefault(path.stem, []).append(path)

    def candidates(self, name: str) -> list[Path]:
        """Every file ``name`` may refer to: [exact match], else the files whose stem is ``name``
        or, when ``name`` ends in an image extension, ``name`` without it. Several = ambiguous."""
        if name in self.by_name:
            return [self.by_name[name]]
        matches = list(self.by_stem.get(name, []))
        # "a.png" may be stored as a.jpg; but "img.002" must not fall back to img.png.
        if not matches and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            matches = list(self.by_stem.get(Path(name).stem, []))
        return matches

    def find(self, name: str, what: str) -> Path | None:
        """The unique match for ``name``, None when there is none; several raise ValueError."""
        matches = self.candidates(name)
        if len(matches) > 1:
            raise ValueError(f"{what} {name!r} is ambiguous: it matches {first_few(matches, _NAMES_SHOWN)}; "
                             "keep one file per name")
        return matches[0] if matches else None


def _mask_lookup(mask_folder: Path) -> FileLookup:
    return FileLookup(list_images(mask_folder) if mask_folder.is_dir() else [])


def _row(image_id: str, path: Path, label: int | None, split: str, defect_type: str,
         mask_path: Path | None = None, group: str | None = None) -> dict:
    return {
        "image_id": image_id,
        "path": str(path),
        "label": label,
        "mask_path": "" if mask_path is None else str(mask_path),
        "split": split,
        "group": image_id if group is None else group,
        "defect_type": defect_type,
    }


def index_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the index DataFrame with the documented columns and dtypes; ids must be unique."""
    frame = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    frame["label"] = pd.array(list(frame["label"]), dtype="Int64")
    for column in INDEX_COLUMNS:
        if column != "label":
            frame[column] = frame[column].astype(str)
    duplicated = frame.loc[frame["image_id"].duplicated(), "image_id"].tolist()
    if duplicated:
        raise ValueError(f"duplicate image_id values in the index: {first_few(duplicated, _NAMES_SHOWN)}; "
                         "every image needs a unique id")
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Competition layout


def sample_submission(root: str | os.PathLike) -> pd.DataFrame:
    """test/sample_submission.csv as strings, ImageIds exactly as written (no NaN, no int casts)."""
    path = _absolute(root) / "test" / "sample_submission.csv"
    _require_file(path, COMPETITION_LAYOUT)
    return read_table(path, all_text=True)


def resolve_image_ids(image_ids: Iterable[str], lookup: FileLookup) -> tuple[dict[str, Path], list[str], list[str]]:
    """Map each ImageId to its test file: (matched, ids matching no file, ids matching several)."""
    matched: dict[str, Path] = {}
    not_found: list[str] = []
    ambiguous: list[str] = []
    for image_id in image_ids:
        candidates = lookup.candidates(image_id)
        if len(candidates) == 1:
            matched[image_id] = candidates[0]
        elif candidates:
            ambiguous.append(image_id)
        else:
            not_found.append(image_id)
    return matched, not_found, ambiguous


def read_groups(path: Path, train_ids: Iterable[str]) -> dict[str, str]:
    """train/groups.csv (image_id,group) -> {image_id: group}; ids must be training image ids."""
    groups = read_table(path, all_text=True)
    missing = [column for column in ("image_id", "group") if column not in groups.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected columns image_id,group, "
                         f"found {','.join(map(str, groups.columns))}")
    duplicated = groups.loc[groups["image_id"].duplicated(), "image_id"].tolist()
    if duplicated:
        raise ValueError(f"{path}: image_id listed more than once: {first_few(duplicated, _NAMES_SHOWN)}")
    known = set(train_ids)
    unknown = [image_id for image_id in groups["image_id"] if image_id not in known]
    if unknown:
        example = next(iter(sorted(known)), "normal_images/normal_00001.png")
        raise ValueError(f"{path}: image_id(s) not among the training images: "
                         f"{first_few(unknown, _NAMES_SHOWN)}; ids are paths relative to train/, e.g. {example}")
    # An empty group cell means "no group": the image stays on its own.
    return {image_id: group for image_id, group in zip(groups["image_id"], groups["group"]) if group != ""}


def competition_train_rows(root: Path) -> list[dict]:
    """Training rows of the competition layout, sorted by image_id, masks matched by name/stem."""
    train_dir = root / "train"
    normal_dir, defect_dir = train_dir / "normal_images", train_dir / "defect_images"
    _require_folder(normal_dir, COMPETITION_LAYOUT)
    _require_folder(defect_dir, COMPETITION_LAYOUT)
    masks = _mask_lookup(train_dir / "defect_masks")
    rows = [_row(f"normal_images/{path.name}", path, 0, "train", "good") for path in list_images(normal_dir)]
    for path in list_images(defect_dir):
        mask = masks.find(path.name, "defect mask for")
        rows.append(_row(f"defect_images/{path.name}", path, 1, "train", "", mask_path=mask))
    rows.sort(key=lambda row: row["image_id"])
    groups_path = train_dir / "groups.csv"
    if groups_path.is_file():
        groups = read_groups(groups_path, [row["image_id"] for row in rows])
        for row in rows:
            row["group"] = groups.get(row["image_id"], row["image_id"])
    return rows


def competition_test_rows(root: Path) -> list[dict]:
    """Test rows in sample_submission order; image_id is the ImageId exactly as written."""
    test_images = root / "test" / "images"
    _require_folder(test_images, COMPETITION_LAYOUT)
    submission = sample_submission(root)
    if "ImageId" not in submission.columns:
        raise ValueError(f"{root / 'test' / 'sample_submission.csv'}: no ImageId column; expected columns "
                         f"ImageId,answer, found {','.join(map(str, submission.columns))}")
    image_ids = submission["ImageId"].tolist()
    matched, not_found, ambiguous = resolve_image_ids(image_ids, FileLookup(list_images(test_images)))
    if not_found or ambiguous:
        details = []
        if not_found:
            details.append(f"matching no file: {first_few(not_found, _NAMES_SHOWN)}")
        if ambiguous:
            details.append("matching several files (same stem, different extensions): "
                           f"{first_few(ambiguous, _NAMES_SHOWN)}")
        raise ValueError(f"sample_submission.csv ImageIds not resolvable in {test_images} - "
                         f"{'; '.join(details)}. An ImageId is a file name, with or without its extension.")
    return [_row(image_id, matched[image_id], None, "test", "") for image_id in image_ids]


def read_competition(root: str | os.PathLike) -> pd.DataFrame:
    """The competition layout (see COMPETITION_LAYOUT): train rows by image_id, then the test rows."""
    root = _absolute(root)
    _require_folder(root, COMPETITION_LAYOUT)
    return index_frame(competition_train_rows(root) + competition_test_rows(root))


# --------------------------------------------------------------------------------------------
# Benchmark layouts (labelled test splits)

MVTEC_LAYOUT = """\
  <root>/<category>/train/good/                 normal training images
  <root>/<category>/test/<type>/                test images; type "good" is normal
  <root>/<category>/ground_truth/<type>/<stem>_mask.png"""

BTAD_LAYOUT = """\
  <root>/<category>/train/ok/          normal training images
  <root>/<category>/test/ok/           normal test images
  <root>/<category>/test/ko/           defect test images
  <root>/<category>/ground_truth/ko/   masks, same stem as the image"""

VISA_LAYOUT = """\
  <root>/split_csv/1cls.csv   columns object,split,label,image,mask (paths relative to <root>)"""

FOLDER_LAYOUT = """\
  <root>/good/                  normal images
  <root>/<defect type>/         one folder per defect type
  <root>/masks/<defect type>/   optional masks, same file name or stem as the image"""


def read_mvtec(root: str | os.PathLike, category: str) -> pd.DataFrame:
    """MVTec AD: train/good is the training split; test/<type> keeps its labels (good = normal)."""
    category_dir = _absolute(root) / category
    for folder in (category_dir, category_dir / "train" / "good", category_dir / "test"):
        _require_folder(folder, MVTEC_LAYOUT)
    rows = [_row(f"train/good/{path.name}", path, 0, "train", "good")
            for path in list_images(category_dir / "train" / "good")]
    for type_dir in list_subfolders(category_dir / "test"):
        defect_type = type_dir.name
        masks = _mask_lookup(category_dir / "ground_truth" / defect_type)
        for path in list_images(type_dir):
            is_normal = defect_type == "good"
            mask = None if is_normal else (masks.find(f"{path.stem}_mask", "mask for")
                                           or masks.find(path.name, "mask for"))
            rows.append(_row(f"test/{defect_type}/{path.name}", path, 0 if is_normal else 1, "test",
                             defect_type, mask_path=mask))
    return index_frame(rows)


def read_btad(root: str | os.PathLike, category: str) -> pd.DataFrame:
    """BTAD: train/ok for training; test/ok and test/ko labelled; ko masks matched by stem."""
    category_dir = _absolute(root) / category
    for folder in (category_dir / "train" / "ok", category_dir / "test" / "ok", category_dir / "test" / "ko"):
        _require_folder(folder, BTAD_LAYOUT)
    rows = [_row(f"train/ok/{path.name}", path, 0, "train", "good")
            for path in list_images(category_dir / "train" / "ok")]
    rows += [_row(f"test/ok/{path.name}", path, 0, "test", "good")
             for path in list_images(category_dir / "test" / "ok")]
    masks = _mask_lookup(category_dir / "ground_truth" / "ko")
    rows += [_row(f"test/ko/{path.name}", path, 1, "test", "ko", mask_path=masks.find(path.name, "mask for"))
             for path in list_images(category_dir / "test" / "ko")]
    return index_frame(rows)


def read_visa(root: str | os.PathLike, category: str) -> pd.DataFrame:
    """VisA through split_csv/1cls.csv (object,split,label,image,mask), rows of one object."""
    root = _absolute(root)
    csv_path = root / "split_csv" / "1cls.csv"
    _require_file(csv_path, VISA_LAYOUT)
    table = read_table(csv_path, all_text=True)
    missing = [c for c in ("object", "split", "label", "image", "mask") if c not in table.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected "
                         f"object,split,label,image,mask, found {','.join(map(str, table.columns))}")
    objects = sorted(set(table["object"]))
    table = table[table["object"] == category]
    if table.empty:
        raise ValueError(f"{csv_path}: no rows for object {category!r}; objects present: {', '.join(objects)}")
    labels = {"normal": 0, "anomaly": 1}
    rows = []
    for record in table.itertuples(index=False):
        if record.label not in labels:
            raise ValueError(f"{csv_path}: label {record.label!r} for {record.image}; expected normal or anomaly")
        if record.split not in ("train", "test"):
            raise ValueError(f"{csv_path}: split {record.split!r} for {record.image}; expected train or test")
        label = labels[record.label]
        image_id = record.image.replace("\\", "/")
        mask = _absolute(root / record.mask) if record.mask.strip() else None
        rows.append(_row(image_id, _absolute(root / image_id), label, record.split,
                         "good" if label == 0 else "", mask_path=mask))
    return index_frame(rows)


def read_folder(root: str | os.PathLike) -> pd.DataFrame:
    """good/ plus one folder per defect type, all training; masks optional under masks/<type>/."""
    root = _absolute(root)
    _require_folder(root / "good", FOLDER_LAYOUT)
    rows = [_row(f"good/{path.name}", path, 0, "train", "good") for path in list_images(root / "good")]
    for type_dir in list_subfolders(root):
        if type_dir.name in ("good", "masks"):
            continue
        masks = _mask_lookup(root / "masks" / type_dir.name)
        rows += [_row(f"{type_dir.name}/{path.name}", path, 1, "train", type_dir.name,
                      mask_path=masks.find(path.name, "mask for"))
                 for path in list_images(type_dir)]
    return index_frame(rows)


# --------------------------------------------------------------------------------------------
# Dispatch


def _drop_unreadable_train(index: pd.DataFrame) -> pd.DataFrame:
    is_test = index["split"] == "test"
    # Test images first: the submission must cover every ImageId, so a bad one stops everything.
    test_failures = find_unreadable(index.loc[is_test, "path"])
    if test_failures:
        (path, reason), others = test_failures[0], test_failures[1:]
        if others:
            shown = first_few([p for p, _ in others], _NAMES_SHOWN)
            reason += f"; {len(others)} more unreadable test image(s): {shown}"
        raise ImageReadError(path, reason + " (test images are never skipped: replace the file)")
    train_failures = find_unreadable(index.loc[~is_test, "path"])
    for path, reason in train_failures:
        log.warning("skipping unreadable training image %s: %s", path, reason)
    if not train_failures:
        return index
    bad_paths = {path for path, _ in train_failures}
    return index[~index["path"].isin(bad_paths)].reset_index(drop=True)


def read_dataset(root: str | os.PathLike, layout: str = "competition", category: str | None = None,
                 skip_unreadable_train: bool = False) -> pd.DataFrame:
    """The index of the dataset at ``root`` in ``layout`` (one of LAYOUTS).

    With ``skip_unreadable_train`` every image is decoded once: unreadable training images are
    dropped with a warning, an unreadable test image raises ImageReadError.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout in CATEGORY_LAYOUTS and not category:
        raise ValueError(f"layout {layout!r} needs a category (the object folder, e.g. 'bottle'); "
                         f"layouts needing one: {', '.join(CATEGORY_LAYOUTS)}")
    if layout not in CATEGORY_LAYOUTS and category:
        log.warning("category %r ignored: layout %r has no categories", category, layout)
    if layout == "competition":
        index = read_competition(root)
    elif layout == "mvtec":
        index = read_mvtec(root, category)
    elif layout == "btad":
        index = read_btad(root, category)
    elif layout == "visa":
        index = read_visa(root, category)
    else:
        index = read_folder(root)
    return _drop_unreadable_train(index) if skip_unreadable_train else index


__all__ = [
    "INDEX_COLUMNS",
    "LAYOUTS",
    "IMAGE_EXTENSIONS",
    "read_dataset",
    "read_competition",
    "read_mvtec",
    "read_btad",
    "read_visa",
    "read_folder",
    "sample_submission",
]
