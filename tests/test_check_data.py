"""check-data on a clean tiny tree and on trees with one defect each: the problem names the culprit."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from competition.data.check import check_dataset, format_report, run_check_data


def _image(path: Path, size=(40, 36), mode="RGB", noise=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if noise:  # incompressible, so truncating the file cuts pixel data
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    else:
        Image.new(mode, size, 0).save(path)
    return path


def _mask(path: Path, size=(40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[2:5, 3:7] = 255
    Image.fromarray(pixels).save(path)
    return path


def _clean_competition(root: Path) -> Path:
    for name in ("normal_00001.png", "normal_00002.png"):
        _image(root / "train" / "normal_images" / name)
    for name in ("defect_00001.png", "defect_00002.png"):
        _image(root / "train" / "defect_images" / name)
        _mask(root / "train" / "defect_masks" / name)
    for name in ("a.png", "b.png"):
        _image(root / "test" / "images" / name)
    _write_submission(root, ["a", "b.png"])
    return root


def _write_submission(root: Path, image_ids, columns=("ImageId", "answer")) -> None:
    table = pd.DataFrame({columns[0]: image_ids, **{c: 0 for c in columns[1:]}})
    table.to_csv(root / "test" / "sample_submission.csv", index=False)


def _check(root: Path, **kwargs):
    return check_dataset(root, progress=False, **kwargs)


def test_clean_tree_passes(tmp_path, capsys):
    root = _clean_competition(tmp_path)
    report = _check(root)
    assert report.problems == [] and report.warnings == []
    assert report.counts["train normal images"] == 2
    assert report.counts["train defect images"] == 2
    assert report.counts["defect masks"] == 2
    assert report.counts["sample_submission rows"] == 2
    assert report.modes == {"RGB": 6}
    assert report.sizes["train"] == {(36, 40): 4} and report.sizes["test"] == {(36, 40): 2}
    assert run_check_data(root) == 0
    printed = capsys.readouterr().out
    assert "OK: no problems" in printed and "36x40 (4)" in printed


def test_missing_mask_is_a_warning_naming_the_defect(tmp_path):
    root = _clean_competition(tmp_path)
    (root / "train" / "defect_masks" / "defect_00002.png").unlink()
    report = _check(root)
    assert report.problems == [] and report.counts["defects with a mask"] == 1
    assert any("1 of 2 defect image(s) without a mask" in w and "defect_00002.png" in w for w in report.warnings)
    assert run_check_data(root) == 0


def test_mask_without_defect_is_a_problem(tmp_path):
    root = _clean_competition(tmp_path)
    _mask(root / "train" / "defect_masks" / "defect_00099.png")
    report = _check(root)
    assert any("without a defect image" in p and "defect_00099.png" in p for p in report.problems)


def test_mask_of_wrong_size_is_a_problem_naming_both_files(tmp_path):
    root = _clean_competition(tmp_path)
    _mask(root / "train" / "defect_masks" / "defect_00001.png", size=(8, 8))
    report = _check(root)
    [problem] = report.problems
    assert "train/defect_masks/defect_00001.png is 8x8" in problem
    assert "train/defect_images/defect_00001.png is 36x40" in problem
    assert run_check_data(root) == 1


@pytest.mark.parametrize("relative", ["train/normal_images/normal_00002.png", "test/images/b.png",
                                      "train/defect_masks/defect_00001.png"])
def test_truncated_file_is_a_problem_naming_it(tmp_path, relative):
    root = _clean_competition(tmp_path)
    path = _image(root / relative, size=(128, 96), noise=True)
    if "defect_masks" in relative:
        _image(root / "train" / "defect_images" / "defect_00001.png", size=(128, 96))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = _check(root)
    assert any(relative in p and "truncated" in p for p in report.problems), report.problems
    assert run_check_data(root) == 1


def test_non_image_file_with_image_extension_is_a_problem(tmp_path):
    root = _clean_competition(tmp_path)
    (root / "train" / "normal_images" / "normal_00003.png").write_text("not a png")
    report = _check(root)
    assert any("normal_00003.png" in p and "not a recognised image" in p for p in report.problems)


def test_bad_sample_submission_columns_are_a_problem_naming_them(tmp_path):
    root = _clean_competition(tmp_path)
    _write_submission(root, ["a", "b"], columns=("ImageId", "label"))
    report = _check(root)
    assert any("columns are ImageId,label" in p and "ImageId,answer" in p for p in report.problems)
    assert run_check_data(root) == 1
    _write_submission(root, ["a", "b"], columns=("image_id", "answer"))
    assert any("columns are image_id,answer" in p for p in _check(root).problems)


def test_duplicate_and_unknown_image_ids_are_problems(tmp_path):
    root = _clean_competition(tmp_path)
    _write_submission(root, ["a", "a", "b", "ghost"])
    problems = _check(root).problems
    assert any("duplicate ImageId" in p and "a" in p for p in problems)
    assert any("match no file" in p and "ghost" in p for p in problems)


def test_test_image_missing_from_submission_is_a_warning(tmp_path):
    root = _clean_competition(tmp_path)
    _image(root / "test" / "images" / "c.png")
    report = _check(root)
    assert report.problems == []
    assert any("not in test/sample_submission.csv" in w and "c.png" in w for w in report.warnings)
    assert run_check_data(root) == 0


def test_missing_folder_is_a_problem_showing_the_layout(tmp_path):
    root = _clean_competition(tmp_path)
    for image in (root / "train" / "normal_images").iterdir():
        image.unlink()
    (root / "train" / "normal_images").rmdir()
    report = _check(root)
    assert "missing train/normal_images/" in report.problems
    assert "FAILED" in format_report(report) and "train/defect_images/" in format_report(report)


def test_missing_root_and_unknown_layout(tmp_path):
    assert _check(tmp_path / "nowhere").problems == [f"data folder {tmp_path / 'nowhere'} does not exist"]
    assert "expected one of competition" in _check(tmp_path, layout="kaggle").problems[0]


def test_other_layouts_are_checked_through_their_reader(tmp_path):
    bottle = tmp_path / "bottle"
    _image(bottle / "train" / "good" / "000.png")
    _image(bottle / "test" / "good" / "000.png", mode="L")
    _image(bottle / "test" / "crack" / "000.png")
    _mask(bottle / "ground_truth" / "crack" / "000_mask.png")
    _image(bottle / "test" / "crack" / "001.png")  # no mask
    report = _check(tmp_path, layout="mvtec", category="bottle")
    assert report.counts["test defect images"] == 2
    assert report.counts["test defect type crack"] == 2
    assert any("without a mask" in p and "bottle/test/crack/001.png" in p for p in report.problems)
    assert any("modes not seen in training: L" in w for w in report.warnings)
    assert "needs a category" in _check(tmp_path, layout="mvtec").problems[0]


def test_test_sizes_outside_training_range_are_a_warning(tmp_path):
    root = _clean_competition(tmp_path)
    _image(root / "test" / "images" / "b.png", size=(64, 48))
    report = _check(root)
    assert report.problems == []
    assert any("outside the training range" in w and "48x64 (1)" in w for w in report.warnings)


def test_tiny_and_extreme_aspect_images_are_warned_with_their_count(tmp_path):
    root = _clean_competition(tmp_path)
    _image(root / "test" / "images" / "a.png", size=(20, 12))
    _image(root / "test" / "images" / "b.png", size=(200, 40))
    report = _check(root)
    assert report.problems == []
    assert any(w.startswith("1 test image(s) with a side under 32 px") for w in report.warnings)
    assert any(w.startswith("1 test image(s) with an aspect ratio of 4:1 or more") for w in report.warnings)
