"""`check-data`: validate a dataset before any training and print what is wrong with it.

Problems (exit 1) are what would break a run or corrupt a score: missing folders, masks without
defects, masks of another size than their image, files that do not decode fully, a
sample_submission.csv that is not exactly `ImageId,answer` or names missing/duplicate images.
Warnings are worth a look but do not stop anything (no train/defect_masks/ or defects without a
mask: masks are optional, and training uses the image label alone for those defects; test images
not in the submission, empty masks, test sizes or modes unseen in training). Every image is decoded
with the project's loader, so "readable here" means "readable by training and inference".
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from competition.data.images import ImageReadError, image_mode, read_image, read_mask
from competition.data.layouts import (
    CATEGORY_LAYOUTS,
    COMPETITION_LAYOUT,
    IMAGE_EXTENSIONS,
    LAYOUTS,
    SUBMISSION_COLUMNS,
    FileLookup,
    is_image_file,
    list_images,
    read_dataset,
    read_groups,
    resolve_image_ids,
    sample_submission,
)
from competition.messages import first_few

# Lines of one kind listed one by one before the rest is summarised in a count.
_LINES_PER_KIND = 20
# Names listed inside one line.
_NAMES_PER_LINE = 10


@dataclass
class CheckReport:
    """What check_dataset found. ``sizes``: split -> Counter of (height, width); ``modes``: PIL
    mode of every image file -> count."""

    root: str
    layout: str
    category: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, Counter] = field(default_factory=dict)
    modes: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _ImageToCheck:
    path: Path
    split: str
    mask: Path | None = None


def _add_capped(target: list[str], lines: list[str], what: str) -> None:
    target.extend(lines[:_LINES_PER_KIND])
    if len(lines) > _LINES_PER_KIND:
        target.append(f"... and {len(lines) - _LINES_PER_KIND} more {what}")


class _Shower:
    """Paths relative to the dataset root when inside it: shorter, and what the user typed."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def _note_ignored_files(folder: Path, show: _Shower, report: CheckReport) -> None:
    ignored = sorted(p.name for p in folder.iterdir()
                     if not p.name.startswith(".") and not (p.is_file() and is_image_file(p)))
    if ignored:
        report.warnings.append(
            f"{show(folder)}/: ignored {len(ignored)} entries that are not image files "
            f"({' '.join(IMAGE_EXTENSIONS)}): {first_few(ignored, _NAMES_PER_LINE)}")


def _check_competition_files(root: Path, report: CheckReport) -> list[_ImageToCheck]:
    """Structure, defect/mask pairing and sample_submission of the competition layout."""
    show = _Shower(root)
    folders = {
        "normal": root / "train" / "normal_images",
        "defect": root / "train" / "defect_images",
        "mask": root / "train" / "defect_masks",
        "test": root / "test" / "images",
    }
    submission_path = root / "test" / "sample_submission.csv"
    missing = [f"{show(folder)}/" for kind, folder in folders.items() if kind != "mask" and not folder.is_dir()]
    if not submission_path.is_file():
        missing.append(show(submission_path))
    for name in missing:
        report.problems.append(f"missing {name}")
    if missing:
        report.problems.append(f"expected the competition layout:\n{COMPETITION_LAYOUT}")

    listed = {}
    for kind, folder in folders.items():
        listed[kind] = list_images(folder) if folder.is_dir() else []
        if folder.is_dir():
            _note_ignored_files(folder, show, report)
    report.counts["train normal images"] = len(listed["normal"])
    report.counts["train defect images"] = len(listed["defect"])
    report.counts["defect masks"] = len(listed["mask"])
    report.counts["test images on disk"] = len(listed["test"])
    for kind in ("normal", "defect", "test"):
        if folders[kind].is_dir() and not listed[kind]:
            report.problems.append(f"{show(folders[kind])}/ holds no image files ({' '.join(IMAGE_EXTENSIONS)})")

    to_check = [_ImageToCheck(path, "train") for path in listed["normal"]]
    to_check += _pair_defects_with_masks(listed["defect"], listed["mask"], folders, show, report)

    groups_path = root / "train" / "groups.csv"
    if groups_path.is_file():
        train_ids = [f"normal_images/{p.name}" for p in listed["normal"]] + \
                    [f"defect_images/{p.name}" for p in listed["defect"]]
        try:
            read_groups(groups_path, train_ids)
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            report.problems.append(f"{show(groups_path)}: {error}")

    if submission_path.is_file() and folders["test"].is_dir():
        _check_sample_submission(root, listed["test"], show, report)
    to_check += [_ImageToCheck(path, "test") for path in listed["test"]]
    return to_check


def _pair_defects_with_masks(defects: list[Path], masks: list[Path], folders: dict[str, Path],
                             show: _Shower, report: CheckReport) -> list[_ImageToCheck]:
    report.counts["defects with a mask"] = 0
    if not folders["mask"].is_dir():
        if defects:
            report.warnings.append(f"no {show(folders['mask'])}/: the {len(defects)} defect image(s) have image labels "
                                   "only (no mask head targets, no transplanted defects, no pixel metrics)")
        return [_ImageToCheck(path, "train") for path in defects]
    lookup = FileLookup(masks)
    without_mask, ambiguous, used = [], [], set()
    to_check = []
    for defect in defects:
        candidates = lookup.candidates(defect.name)
        if len(candidates) == 1:
            used.add(candidates[0])
            to_check.append(_ImageToCheck(defect, "train", candidates[0]))
            continue
        (ambiguous if candidates else without_mask).append(defect.name)
        to_check.append(_ImageToCheck(defect, "train"))
    mask_dir = show(folders["mask"])
    report.counts["defects with a mask"] = len(used)
    if without_mask:
        # Masks are optional: those defects train with their image label alone.
        report.warnings.append(f"{len(without_mask)} of {len(defects)} defect image(s) without a mask in {mask_dir}/ "
                               f"(expected the same file name; they train with their image label alone): "
                               f"{first_few(without_mask, _NAMES_PER_LINE)}")
    if ambiguous:
        report.problems.append(f"{len(ambiguous)} defect image(s) with several masks of the same stem in "
                               f"{mask_dir}/ (keep one): {first_few(ambiguous, _NAMES_PER_LINE)}")
    orphans = [mask.name for mask in masks if mask not in used]
    if orphans:
        report.problems.append(f"{len(orphans)} mask(s) in {mask_dir}/ without a defect image in "
                               f"{show(folders['defect'])}/: {first_few(orphans, _NAMES_PER_LINE)}")
    return to_check


def _check_sample_submission(root: Path, test_files: list[Path], show: _Shower, report: CheckReport) -> None:
    csv_name = show(root / "test" / "sample_submission.csv")
    try:
        submission = sample_submission(root)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        report.problems.append(f"{csv_name}: cannot be read as CSV ({error})")
        return
    columns = [str(column) for column in submission.columns]
    if columns != list(SUBMISSION_COLUMNS):
        report.problems.append(f"{csv_name}: columns are {','.join(columns)}; expected exactly "
                               f"{','.join(SUBMISSION_COLUMNS)}")
    report.counts["sample_submission rows"] = len(submission)
    if "ImageId" not in submission.columns:
        return
    image_ids = submission["ImageId"].tolist()
    if not image_ids:
        report.problems.append(f"{csv_name}: no rows; expected one row per test image")
    blank = sum(1 for image_id in image_ids if not image_id.strip())
    if blank:
        report.problems.append(f"{csv_name}: {blank} row(s) with an empty ImageId")
    duplicated = sorted({image_id for image_id, n in Counter(image_ids).items() if n > 1})
    if duplicated:
        report.problems.append(f"{csv_name}: duplicate ImageId(s): {first_few(duplicated, _NAMES_PER_LINE)}")
    matched, not_found, ambiguous = resolve_image_ids(dict.fromkeys(i for i in image_ids if i.strip()),
                                                      FileLookup(test_files))
    if not_found:
        report.problems.append(f"{csv_name}: {len(not_found)} ImageId(s) match no file in "
                               f"{show(root / 'test' / 'images')}/: {first_few(not_found, _NAMES_PER_LINE)}")
    if ambiguous:
        report.problems.append(f"{csv_name}: {len(ambiguous)} ImageId(s) match several files of the same stem "
                               f"in {show(root / 'test' / 'images')}/: {first_few(ambiguous, _NAMES_PER_LINE)}")
    shared = Counter(matched.values())
    doubled = sorted(path.name for path, n in shared.items() if n > 1)
    if doubled:
        report.warnings.append(f"{csv_name}: several ImageIds name the same test file: "
                               f"{first_few(doubled, _NAMES_PER_LINE)}")
    unreferenced = sorted(path.name for path in test_files if path not in shared)
    if unreferenced:
        report.warnings.append(f"{len(unreferenced)} test image(s) not in {csv_name} (they will not be "
                               f"predicted): {first_few(unreferenced, _NAMES_PER_LINE)}")


def _check_index(root: Path, layout: str, category: str | None, report: CheckReport) -> list[_ImageToCheck]:
    """Benchmark and folder layouts: build the index with the reader, count, check mask presence."""
    try:
        index = read_dataset(root, layout, category)
    except ValueError as error:
        report.problems.append(str(error))
        return []
    show = _Shower(root)
    # Unlabeled rows compare as <NA>; count them as neither class.
    is_normal = index["label"].eq(0).fillna(False).astype(bool)
    is_defect = index["label"].eq(1).fillna(False).astype(bool)
    for split in ("train", "test"):
        in_split = index["split"] == split
        if not in_split.any():
            continue
        report.counts[f"{split} normal images"] = int((in_split & is_normal).sum())
        report.counts[f"{split} defect images"] = int((in_split & is_defect).sum())
        unlabeled = int((in_split & index["label"].isna()).sum())
        if unlabeled:
            report.counts[f"{split} unlabeled images"] = unlabeled
        types = index.loc[in_split & is_defect, "defect_type"].value_counts().sort_index()
        for defect_type, n in types.items():
            if defect_type:
                report.counts[f"{split} defect type {defect_type}"] = int(n)
    if not is_normal.any():
        report.problems.append("no normal images found")
    report.counts["defects with a mask"] = int((is_defect & (index["mask_path"] != "")).sum())
    defects_without_mask = index.loc[is_defect & (index["mask_path"] == ""), "path"].tolist()
    if defects_without_mask:
        # Benchmarks ship a mask per defect; the folder layout only has them when masks/ exists.
        line = f"{len(defects_without_mask)} defect image(s) without a mask: " \
               f"{first_few([show(p) for p in defects_without_mask], _NAMES_PER_LINE)}"
        if layout in CATEGORY_LAYOUTS:
            report.problems.append(line)
        elif (root / "masks").is_dir():
            report.warnings.append(line)
    return [_ImageToCheck(Path(row.path), row.split, Path(row.mask_path) if row.mask_path else None)
            for row in index.itertuples(index=False)]


def _decode_all(to_check: list[_ImageToCheck], root: Path, report: CheckReport, progress: bool) -> None:
    """Fully decode every image and mask; record modes, sizes, unreadable files, mask sizes."""
    show = _Shower(root)
    unreadable, wrong_size, empty_masks = [], [], []
    modes_by_split: dict[str, Counter] = {}
    for item in tqdm(to_check, desc="decoding images", unit="img", disable=not progress):
        try:
            mode = image_mode(item.path)
            height, width = read_image(item.path).shape[:2]
        except ImageReadError as error:
            unreadable.append(f"unreadable image {show(error.path)}: {error.reason}")
            continue
        report.modes[mode] += 1
        modes_by_split.setdefault(item.split, Counter())[mode] += 1
        report.sizes.setdefault(item.split, Counter())[(height, width)] += 1
        if item.mask is None:
            continue
        try:
            mask = read_mask(item.mask)
        except ImageReadError as error:
            unreadable.append(f"unreadable mask {show(error.path)}: {error.reason}")
            continue
        if mask.shape != (height, width):
            wrong_size.append(f"mask {show(item.mask)} is {mask.shape[0]}x{mask.shape[1]} (height x width) "
                              f"but its image {show(item.path)} is {height}x{width}")
        elif not mask.any():
            empty_masks.append(show(item.mask))
    _add_capped(report.problems, unreadable, "unreadable files")
    _add_capped(report.problems, wrong_size, "masks of the wrong size")
    _warn_odd_shapes(report)
    if empty_masks:
        report.warnings.append(f"{len(empty_masks)} mask(s) with no defect pixel: "
                               f"{first_few(empty_masks, _NAMES_PER_LINE)}")
    _compare_train_and_test(report, modes_by_split)


# Shapes worth a warning: a side this small leaves a backbone nothing to see; this aspect ratio loses most
# of the image's detail when squashed to a square (letterbox or tiles keep it).
TINY_SIDE = 32
EXTREME_ASPECT = 4.0


def _warn_odd_shapes(report: CheckReport) -> None:
    for split, sizes in sorted(report.sizes.items()):
        tiny = sum(n for (h, w), n in sizes.items() if min(h, w) < TINY_SIDE)
        extreme = sum(n for (h, w), n in sizes.items() if max(h, w) >= EXTREME_ASPECT * min(h, w))
        if tiny:
            report.warnings.append(f"{tiny} {split} image(s) with a side under {TINY_SIDE} px: too small for the "
                                   "backbones' downsampling; they are upscaled")
        if extreme:
            report.warnings.append(f"{extreme} {split} image(s) with an aspect ratio of {EXTREME_ASPECT:g}:1 or more: "
                                   "the square resize squashes them; consider model.resize: letterbox or tiles")


def _compare_train_and_test(report: CheckReport, modes_by_split: dict[str, Counter]) -> None:
    # A test set from another camera or export pipeline shows up as sizes or modes training never saw.
    train_sizes, test_sizes = report.sizes.get("train", Counter()), report.sizes.get("test", Counter())
    if train_sizes and test_sizes:
        # Outside the training range, not merely unseen: datasets with varying sizes would warn always.
        heights, widths = [h for h, _ in train_sizes], [w for _, w in train_sizes]
        outside = [f"{h}x{w} ({n})" for (h, w), n in test_sizes.most_common()
                   if not (min(heights) <= h <= max(heights) and min(widths) <= w <= max(widths))]
        if outside:
            report.warnings.append(
                f"test image sizes (height x width) outside the training range "
                f"{min(heights)}..{max(heights)} x {min(widths)}..{max(widths)}: {first_few(outside, _NAMES_PER_LINE)}")
    train_modes, test_modes = modes_by_split.get("train", Counter()), modes_by_split.get("test", Counter())
    if train_modes and test_modes:
        unseen_modes = sorted(set(test_modes) - set(train_modes))
        if unseen_modes:
            report.warnings.append(f"test image modes not seen in training: {', '.join(unseen_modes)} "
                                   f"(training has {', '.join(sorted(train_modes))}); all are read as RGB")


def check_dataset(root: str | os.PathLike, layout: str = "competition", category: str | None = None,
                  progress: bool = True) -> CheckReport:
    """Validate the dataset at ``root`` in ``layout``; see the module docstring for what is checked."""
    root_path = Path(os.path.abspath(root))
    report = CheckReport(root=str(root_path), layout=layout, category=category)
    if layout not in LAYOUTS:
        report.problems.append(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        return report
    if not root_path.is_dir():
        report.problems.append(f"data folder {root_path} does not exist")
        return report
    if layout == "competition":
        to_check = _check_competition_files(root_path, report)
    else:
        to_check = _check_index(root_path, layout, category, report)
    _decode_all(to_check, root_path, report, progress)
    if layout == "competition" and report.ok:
        # The reader used by training must agree with the checks above.
        try:
            read_dataset(root_path, layout, category)
        except ValueError as error:
            report.problems.append(f"the dataset reader rejects this dataset: {error}")
    return report


def _size_line(split: str, sizes: Counter) -> str:
    total = sum(sizes.values())
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common(3))
    more = f" + {len(sizes) - 3} more" if len(sizes) > 3 else ""
    return (f"  {split:<6} {total} images, {len(sizes)} distinct size(s): {common}{more}; "
            f"height {min(heights)}..{max(heights)}, width {min(widths)}..{max(widths)}")


def format_report(report: CheckReport) -> str:
    """The report as readable lines: counts, modes, sizes, warnings, problems, verdict."""
    where = f"{report.root} (layout {report.layout}" + (f", category {report.category})" if report.category else ")")
    lines = [f"check-data: {where}"]
    if report.counts:
        lines.append("counts")
        width = max(len(name) for name in report.counts)
        lines += [f"  {name:<{width}}  {n}" for name, n in report.counts.items()]
    if report.modes:
        lines.append("image modes: " + ", ".join(f"{mode} {n}" for mode, n in report.modes.most_common()))
    if report.sizes:
        lines.append("image sizes (height x width)")
        lines += [_size_line(split, sizes) for split, sizes in report.sizes.items()]
    if report.warnings:
        lines.append(f"warnings ({len(report.warnings)})")
        lines += [f"  - {warning}" for warning in report.warnings]
    if report.problems:
        lines.append(f"problems ({len(report.problems)})")
        lines += [f"  - {problem}" for problem in report.problems]
        lines.append(f"FAILED: {len(report.problems)} problem(s); fix them before training")
    else:
        lines.append(f"OK: no problems ({len(report.warnings)} warning(s))")
    return "\n".join(lines)


def run_check_data(root: str | os.PathLike, layout: str = "competition", category: str | None = None) -> int:
    """`python -m competition check-data`: print the report; exit status 0 if no problems, else 1."""
    report = check_dataset(root, layout, category)
    print(format_report(report))
    return 0 if report.ok else 1


__all__ = ["CheckReport", "check_dataset", "format_report", "run_check_data"]
