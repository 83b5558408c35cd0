"""Every layout reader on a tiny generated tree: columns, dtypes, labels, masks, splits, ids, errors."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from competition.data.images import ImageReadError
from competition.data.layouts import (
    INDEX_COLUMNS,
    LAYOUTS,
    read_btad,
    read_competition,
    read_dataset,
    read_folder,
    read_mvtec,
    read_visa,
    sample_submission,
)


def _image(path: Path, size=(8, 6), noise=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if noise:  # incompressible, so truncating the file cuts pixel data
        pixels = np.random.default_rng(len(str(path))).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    else:
        Image.new("RGB", size, (40, 80, 120)).save(path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _competition(root: Path, test_ids=("t_b", "t_a.png", "t_c")) -> Path:
    train = root / "train"
    for name in ("normal_00001.png", "normal_00002.png"):
        _image(train / "normal_images" / name)
    _image(train / "defect_images" / "defect_00001.png")
    _image(train / "defect_masks" / "defect_00001.png")
    _image(train / "defect_images" / "defect_00002.jpg")
    _image(train / "defect_masks" / "defect_00002.png")  # differs in extension only
    for name in ("t_a.png", "t_b.png", "t_c.jpg"):
        _image(root / "test" / "images" / name)
    pd.DataFrame({"ImageId": list(test_ids), "answer": 0}).to_csv(root / "test" / "sample_submission.csv", index=False)
    return root


def _assert_index_schema(index: pd.DataFrame) -> None:
    assert tuple(index.columns[: len(INDEX_COLUMNS)]) == INDEX_COLUMNS
    assert str(index["label"].dtype) == "Int64"
    assert index["image_id"].is_unique
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in index["path"])
    assert set(index["split"]) <= {"train", "test"}
    for column in ("image_id", "path", "mask_path", "group", "defect_type"):
        assert all(isinstance(value, str) for value in index[column]), column


def test_competition_index(tmp_path):
    index = read_competition(_competition(tmp_path))
    _assert_index_schema(index)
    train = index[index["split"] == "train"]
    assert train["image_id"].tolist() == [
        "defect_images/defect_00001.png", "defect_images/defect_00002.jpg",
        "normal_images/normal_00001.png", "normal_images/normal_00002.png"]
    assert train["label"].tolist() == [1, 1, 0, 0]
    assert train["defect_type"].tolist() == ["", "", "good", "good"]
    assert train["group"].tolist() == train["image_id"].tolist()
    masks = train["mask_path"].tolist()
    assert masks[0] == str(tmp_path / "train" / "defect_masks" / "defect_00001.png")
    assert masks[1] == str(tmp_path / "train" / "defect_masks" / "defect_00002.png")
    assert masks[2:] == ["", ""]


def test_competition_test_rows_keep_submission_order_and_ids(tmp_path):
    index = read_competition(_competition(tmp_path))
    test = index[index["split"] == "test"]
    assert test["image_id"].tolist() == ["t_b", "t_a.png", "t_c"]
    assert [Path(p).name for p in test["path"]] == ["t_b.png", "t_a.png", "t_c.jpg"]
    assert test["label"].isna().all()
    assert (test["mask_path"] == "").all()
    assert test["group"].tolist() == test["image_id"].tolist()


def test_image_ids_kept_exactly_as_strings(tmp_path):
    # Leading zeros and "NA" would be mangled by a default read_csv.
    root = _competition(tmp_path, test_ids=("007", "NA"))
    _image(root / "test" / "images" / "007.png")
    _image(root / "test" / "images" / "NA.png")
    assert sample_submission(root)["ImageId"].tolist() == ["007", "NA"]
    test = read_competition(root).query("split == 'test'")
    assert test["image_id"].tolist() == ["007", "NA"]


def test_same_file_name_in_normal_and_defect_folders_gets_distinct_ids(tmp_path):
    root = _competition(tmp_path)
    _image(root / "train" / "normal_images" / "defect_00001.png")
    index = read_competition(root)
    assert {"normal_images/defect_00001.png", "defect_images/defect_00001.png"} <= set(index["image_id"])


def test_unknown_and_ambiguous_image_ids_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="t_missing"):
        read_competition(_competition(tmp_path / "a", test_ids=("t_a", "t_missing")))
    root = _competition(tmp_path / "b", test_ids=("t_a",))
    _image(root / "test" / "images" / "t_a.jpg")  # now t_a.png and t_a.jpg share the stem
    with pytest.raises(ValueError, match="t_a"):
        read_competition(root)


def test_image_id_with_other_extension_matches_by_stem_only_when_unique(tmp_path):
    root = _competition(tmp_path, test_ids=("t_c.png", "t_a"))  # file is t_c.jpg
    test = read_competition(root).query("split == 'test'")
    assert Path(test["path"].iloc[0]).name == "t_c.jpg"


def test_groups_csv_is_honoured(tmp_path):
    root = _competition(tmp_path)
    pd.DataFrame({"image_id": ["normal_images/normal_00001.png", "defect_images/defect_00001.png"],
                  "group": ["part_7", "part_7"]}).to_csv(root / "train" / "groups.csv", index=False)
    groups = read_competition(root).set_index("image_id")["group"]
    assert groups["normal_images/normal_00001.png"] == "part_7"
    assert groups["defect_images/defect_00001.png"] == "part_7"
    assert groups["normal_images/normal_00002.png"] == "normal_images/normal_00002.png"


def test_groups_csv_with_unknown_id_raises(tmp_path):
    root = _competition(tmp_path)
    pd.DataFrame({"image_id": ["normal_00001.png"], "group": ["g"]}).to_csv(root / "train" / "groups.csv", index=False)
    with pytest.raises(ValueError, match="normal_00001.png.*relative to train/"):
        read_competition(root)


@pytest.mark.parametrize("missing", ["train/normal_images", "train/defect_images", "test/images"])
def test_missing_folder_raises_naming_it_and_the_layout(tmp_path, missing):
    root = _competition(tmp_path)
    for path in (root / missing).iterdir():
        path.unlink()
    (root / missing).rmdir()
    with pytest.raises(ValueError, match=f"{missing}.*expected layout") as caught:
        read_competition(root)
    assert "sample_submission.csv" in str(caught.value)


def test_missing_sample_submission_raises(tmp_path):
    root = _competition(tmp_path)
    (root / "test" / "sample_submission.csv").unlink()
    with pytest.raises(ValueError, match="sample_submission.csv not found"):
        read_competition(root)


def test_listing_ignores_hidden_and_non_image_files_and_reads_upper_case(tmp_path):
    root = _competition(tmp_path)
    (root / "train" / "normal_images" / "._normal_00001.png").write_bytes(b"resource fork")
    (root / "train" / "normal_images" / "notes.txt").write_text("x")
    _image(root / "train" / "normal_images" / "normal_00003.PNG")
    ids = read_competition(root)["image_id"].tolist()
    assert "normal_images/normal_00003.PNG" in ids
    assert not any("._" in i or i.endswith(".txt") for i in ids)


def test_list_images_recursive_skips_hidden_files_and_folders(tmp_path):
    from competition.data.layouts import list_images

    for name in ("b.png", "a.JPG", "._a.png", "sub/c.png", "sub/._c.png", ".ipynb_checkpoints/d.png", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == \
        ["a.JPG", "b.png", "sub/c.png"]


def test_skip_unreadable_train_drops_bad_training_image(tmp_path, caplog):
    root = _competition(tmp_path)
    bad = _image(root / "train" / "normal_images" / "normal_00009.png", size=(128, 128), noise=True)
    _truncate(bad)
    assert "normal_images/normal_00009.png" in set(read_dataset(root)["image_id"])
    with caplog.at_level(logging.WARNING, logger="competition.data.layouts"):
        index = read_dataset(root, skip_unreadable_train=True)
    assert "normal_images/normal_00009.png" not in set(index["image_id"])
    assert len(index) == len(read_dataset(root)) - 1
    assert any(str(bad) in record.getMessage() for record in caplog.records)


def test_skip_unreadable_train_still_raises_on_bad_test_image(tmp_path):
    root = _competition(tmp_path)
    bad = _image(root / "test" / "images" / "t_a.png", size=(128, 128), noise=True)
    _truncate(bad)
    with pytest.raises(ImageReadError) as caught:
        read_dataset(root, skip_unreadable_train=True)
    assert caught.value.path == str(bad)


def test_read_dataset_validates_layout_and_category(tmp_path):
    with pytest.raises(ValueError, match="competition, mvtec, btad, visa, folder"):
        read_dataset(tmp_path, layout="kaggle")
    with pytest.raises(ValueError, match="needs a category"):
        read_dataset(tmp_path, layout="mvtec")
    assert LAYOUTS == ("competition", "mvtec", "btad", "visa", "folder")


def test_mvtec(tmp_path):
    bottle = tmp_path / "bottle"
    _image(bottle / "train" / "good" / "000.png")
    _image(bottle / "train" / "good" / "001.png")
    _image(bottle / "test" / "good" / "000.png")
    _image(bottle / "test" / "broken_large" / "000.png")
    _image(bottle / "ground_truth" / "broken_large" / "000_mask.png")
    index = read_dataset(tmp_path, "mvtec", "bottle")
    _assert_index_schema(index)
    rows = index.set_index("image_id")
    assert rows.loc["train/good/001.png", "split"] == "train"
    assert rows.loc["test/good/000.png", ["split", "label", "defect_type"]].tolist() == ["test", 0, "good"]
    defect = rows.loc["test/broken_large/000.png"]
    assert (defect["label"], defect["defect_type"]) == (1, "broken_large")
    assert defect["mask_path"] == str(bottle / "ground_truth" / "broken_large" / "000_mask.png")
    with pytest.raises(ValueError, match="cable"):
        read_mvtec(tmp_path, "cable")


def test_btad(tmp_path):
    product = tmp_path / "01"
    _image(product / "train" / "ok" / "0000.bmp")
    _image(product / "test" / "ok" / "0001.bmp")
    _image(product / "test" / "ko" / "0002.bmp")
    _image(product / "ground_truth" / "ko" / "0002.png")
    index = read_btad(tmp_path, "01")
    _assert_index_schema(index)
    assert index["image_id"].tolist() == ["train/ok/0000.bmp", "test/ok/0001.bmp", "test/ko/0002.bmp"]
    assert index["label"].tolist() == [0, 0, 1]
    assert index["split"].tolist() == ["train", "test", "test"]
    assert index["defect_type"].tolist() == ["good", "good", "ko"]
    assert index["mask_path"].tolist() == ["", "", str(product / "ground_truth" / "ko" / "0002.png")]


def test_visa(tmp_path):
    base = "candle/Data"
    for name in ("Images/Normal/0000.JPG", "Images/Normal/0001.JPG", "Images/Anomaly/0002.JPG"):
        _image(tmp_path / base / name)
    _image(tmp_path / base / "Masks/Anomaly/0002.png")
    _image(tmp_path / "pcb1/Data/Images/Normal/0000.JPG")
    (tmp_path / "split_csv").mkdir()
    pd.DataFrame({
        "object": ["candle", "candle", "candle", "pcb1"],
        "split": ["train", "test", "test", "train"],
        "label": ["normal", "normal", "anomaly", "normal"],
        "image": [f"{base}/Images/Normal/0000.JPG", f"{base}/Images/Normal/0001.JPG",
                  f"{base}/Images/Anomaly/0002.JPG", "pcb1/Data/Images/Normal/0000.JPG"],
        "mask": ["", "", f"{base}/Masks/Anomaly/0002.png", ""],
    }).to_csv(tmp_path / "split_csv" / "1cls.csv", index=False)
    index = read_visa(tmp_path, "candle")
    _assert_index_schema(index)
    assert len(index) == 3
    assert index["split"].tolist() == ["train", "test", "test"]
    assert index["label"].tolist() == [0, 0, 1]
    assert index["mask_path"].tolist() == ["", "", str(tmp_path / base / "Masks/Anomaly/0002.png")]
    with pytest.raises(ValueError, match="candle, pcb1"):
        read_visa(tmp_path, "fryum")


def test_folder(tmp_path):
    _image(tmp_path / "good" / "a.png")
    _image(tmp_path / "scratch" / "b.png")
    _image(tmp_path / "scratch" / "c.png")
    _image(tmp_path / "dent" / "d.jpg")
    _image(tmp_path / "masks" / "scratch" / "b.png")
    _image(tmp_path / "masks" / "dent" / "d.png")
    index = read_folder(tmp_path)
    _assert_index_schema(index)
    assert index["image_id"].tolist() == ["good/a.png", "dent/d.jpg", "scratch/b.png", "scratch/c.png"]
    assert index["label"].tolist() == [0, 1, 1, 1]
    assert index["defect_type"].tolist() == ["good", "dent", "scratch", "scratch"]
    assert (index["split"] == "train").all()
    assert index["mask_path"].tolist() == [
        "", str(tmp_path / "masks" / "dent" / "d.png"), str(tmp_path / "masks" / "scratch" / "b.png"), ""]
    with pytest.raises(ValueError, match="good"):
        read_folder(tmp_path / "scratch")
