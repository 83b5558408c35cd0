"""The stage runner's rules: which config keys a run records, how a change is named, when a run
folder is reused, refused or cleared."""
from __future__ import annotations

from pathlib import Path

import pytest

from competition.artifacts import write_json
from competition.config import load_config
from competition.stage import ConfigChangedError, RunFolder, config_differences, results_config

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides: str):
    return load_config(ROOT / "configs" / "quick.yaml", ["paths.data=relative/data", *overrides])


def test_results_config_keeps_the_named_keys_without_the_neutral_ones():
    record = results_config(_config(), ("seed", "paths.data", "train", "oversample"))
    assert set(record) == {"seed", "paths", "train", "oversample"}
    assert record["paths"] == {"data": str(Path("relative/data").resolve())}
    assert "lr" in record["train"] and "threads" not in record["train"] and "num_workers" not in record["train"]
    assert "mode" not in record["oversample"] and "angle_step" in record["oversample"]


def test_differences_name_dotted_keys_and_skip_neutral_ones():
    old = {"train": {"lr": 0.1, "threads": 1, "betas": (0.9, 0.99)}, "seed": 1}
    new = {"train": {"lr": 0.2, "threads": 4, "betas": [0.9, 0.99]}, "seed": 1, "zoo": {"image_size": 96}}
    assert config_differences(old, new) == ["train.lr: 0.1 -> 0.2", "zoo: None -> {'image_size': 96}"]
    assert config_differences({"zoo": {"image_size": 128, "cache": True}},
                              {"zoo": {"image_size": 96, "cache": False}}) == ["zoo.image_size: 128 -> 96"]


def _folder(tmp_path: Path) -> RunFolder:
    return RunFolder(marker=tmp_path / "summary.json", outputs=(tmp_path / "best.pt", tmp_path / "oof.csv"),
                     required=(tmp_path / "oof.csv",), redo="retrain this fold")


def test_a_finished_run_is_reused_refused_or_cleared(tmp_path):
    folder = _folder(tmp_path)
    record = {"train": {"lr": 0.1}}
    assert folder.prepare(record, force=False) is None  # nothing there yet
    write_json({"config": record, "auroc": 0.7}, tmp_path / "summary.json")
    assert folder.prepare(record, force=False) is None  # oof.csv, required, is missing: not finished
    for name in ("oof.csv", "best.pt"):
        (tmp_path / name).write_text("x")
    assert folder.prepare({"train": {"lr": 0.1, "threads": 8}}, force=False)["auroc"] == 0.7
    with pytest.raises(ConfigChangedError, match=r"summary.json was written with another config "
                                                 r"\(train.lr: 0.1 -> 0.2\)\. Pass --force to retrain this fold, "
                                                 r"or use another `experiment` name"):
        folder.prepare({"train": {"lr": 0.2}}, force=False)
    assert folder.prepare({"train": {"lr": 0.2}}, force=True) is None
    assert not any((tmp_path / name).exists() for name in ("summary.json", "oof.csv", "best.pt"))


def test_a_progress_marker_is_not_a_finished_run(tmp_path):
    folder = _folder(tmp_path)
    (tmp_path / "oof.csv").write_text("x")
    write_json({"config": {"seed": 1}, "finished": False}, tmp_path / "summary.json")
    assert folder.prepare({"seed": 2}, force=False) is None  # not finished: no refusal, the engine decides


def test_many_changes_are_shown_first_few_then_counted(tmp_path):
    old, new = {f"k{i}": i for i in range(11)}, {f"k{i}": -i for i in range(11)}
    write_json({"config": old}, tmp_path / "summary.json")
    (tmp_path / "oof.csv").write_text("x")
    with pytest.raises(ConfigChangedError, match=r"\.\.\. and 2 more\)"):
        _folder(tmp_path).prepare(new, force=False)
