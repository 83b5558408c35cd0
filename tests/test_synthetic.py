"""The synthetic competition writer: layout, counts, CSV formats and byte-for-byte reproducibility."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from competition.data.synthetic import PRESETS, write_competition


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """tiny preset: seed 0 twice, seed 1 once."""
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("other", 1)]:
        out = tmp_path_factory.mktemp(f"synth_{name}")
        write_competition(out, preset="tiny", seed=seed, progress=False)
        runs[name] = out
    return runs


def test_presets_match_the_brief():
    assert (PRESETS["small"].n_normal, PRESETS["small"].n_defect, PRESETS["small"].n_test) == (400, 30, 300)
    assert PRESETS["small"].image_size == 128
    assert (PRESETS["full"].n_normal, PRESETS["full"].n_defect, PRESETS["full"].n_test) == (6790, 30, 9100)
    assert PRESETS["tiny"].n_defect >= 10
    medium = PRESETS["medium"]  # issue 17's scaling point: about 2,000 normals and 3,000 test images
    assert (medium.n_normal, medium.n_test, medium.image_size) == (2000, 3000, PRESETS["small"].image_size)


def test_same_seed_gives_same_bytes(tiny_runs):
    first, second = _hashes(tiny_runs["a"]), _hashes(tiny_runs["b"])
    assert len(first) > 100
    assert first == second


def test_worker_processes_write_the_same_bytes(tiny_runs, tmp_path, monkeypatch):
    from competition.data import synthetic

    monkeypatch.setattr(synthetic, "_PARALLEL_FROM", 0)  # the tiny preset is below the pool's threshold
    write_competition(tmp_path, preset="tiny", seed=0, progress=False, workers=2)
    assert _hashes(tmp_path) == _hashes(tiny_runs["a"])


def test_different_seed_gives_different_data(tiny_runs):
    first, other = _hashes(tiny_runs["a"]), _hashes(tiny_runs["other"])
    assert first.keys() == other.keys()
    images = [name for name in first if name.endswith(".png")]
    assert sum(first[name] != other[name] for name in images) > 0.9 * len(images)


def test_layout_and_counts(tiny_runs):
    root, preset = tiny_runs["a"], PRESETS["tiny"]
    normals = sorted((root / "train" / "normal_images").glob("*.png"))
    defects = sorted((root / "train" / "defect_images").glob("*.png"))
    masks = sorted((root / "train" / "defect_masks").glob("*.png"))
    tests = sorted((root / "test" / "images").glob("*.png"))
    assert len(normals) == preset.n_normal and len(defects) == preset.n_defect and len(tests) == preset.n_test
    assert normals[0].name == "normal_00000.png" and tests[-1].name == f"test_{preset.n_test - 1:05d}.png"
    assert [m.name for m in masks] == [d.name for d in defects]
    for image_path, mask_path in zip(defects, masks):
        image, mask = Image.open(image_path), Image.open(mask_path)
        assert image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 255}
    sizes = {Image.open(p).size for p in normals + tests}
    assert (preset.image_size, preset.image_size) in sizes
    assert len(sizes) > 1, "about 20% of images should have a different size"


def test_sample_submission_and_answers(tiny_runs):
    root = tiny_runs["a"]
    submission = pd.read_csv(root / "test" / "sample_submission.csv")
    assert list(submission.columns) == ["ImageId", "answer"]
    assert (submission["answer"] == 0).all()
    stems = sorted(p.stem for p in (root / "test" / "images").glob("*.png"))
    assert sorted(submission["ImageId"]) == stems
    assert list(submission["ImageId"]) != stems, "rows should be shuffled"

    answers = pd.read_csv(root / "answers.csv")
    assert list(answers.columns) == ["ImageId", "answer", "Usage"]
    assert list(answers["ImageId"]) == list(submission["ImageId"])
    assert set(answers["Usage"]) == {"Public", "Private"}
    assert set(answers["answer"]) == {0, 1}
    for usage, part in answers.groupby("Usage"):
        assert part["answer"].sum() >= 1, f"{usage} part has no defects"
    assert 0.2 <= (answers["Usage"] == "Public").mean() <= 0.4

    summary = json.loads((root / "synth.json").read_text())
    assert summary["preset"] == "tiny" and summary["seed"] == 0 and summary["real_like"] is False
    assert summary["counts"]["test_defect"] == answers["answer"].sum()
    assert "version" in summary


def test_rate_override_and_existing_output(tmp_path):
    write_competition(tmp_path, preset="tiny", seed=3, progress=False)
    with pytest.raises(FileExistsError):
        write_competition(tmp_path, preset="tiny", seed=3, progress=False)
    summary = write_competition(tmp_path, preset="tiny", seed=3, test_defect_rate=0.25,
                                progress=False, overwrite=True)
    answers = pd.read_csv(tmp_path / "answers.csv")
    assert answers["answer"].sum() == summary["counts"]["test_defect"] == 10
    with pytest.raises(ValueError, match="tiny"):
        write_competition(tmp_path / "x", preset="huge", progress=False)


def test_real_like_writes_grayscale_images_of_varying_sizes(tmp_path):
    write_competition(tmp_path, preset="tiny", seed=0, real_like=True, progress=False)
    images = sorted((tmp_path / "train" / "normal_images").glob("*.png"))
    images += sorted((tmp_path / "test" / "images").glob("*.png"))
    opened = [Image.open(p) for p in images]
    assert {im.mode for im in opened} == {"L"}
    assert len({im.size for im in opened}) > len(opened) // 2
    for defect in sorted((tmp_path / "train" / "defect_images").glob("*.png")):
        mask = Image.open(tmp_path / "train" / "defect_masks" / defect.name)
        assert Image.open(defect).size == mask.size
        assert np.asarray(mask).max() == 255
    assert json.loads((tmp_path / "synth.json").read_text())["real_like"] is True
