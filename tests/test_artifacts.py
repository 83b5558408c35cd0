"""Run I/O: strict JSON, tables whose ids read back exactly as written, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from competition.artifacts import (
    pretrain_dir,
    pretrained_weights_path,
    read_json,
    read_table,
    write_csv,
    write_json,
)


def test_write_json_writes_null_for_nan_and_inf(tmp_path):
    path = write_json({"auroc": float("nan"), "scores": [1.5, float("inf"), np.float32("nan")],
                       "per_fold": np.array([0.25, -np.inf]), "best": np.float64(0.75), "n": np.int64(3)},
                      tmp_path / "summary.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    # A strict parser (no NaN/Infinity constants) must accept it.
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} written"))
    assert strict == {"auroc": None, "scores": [1.5, None, None], "per_fold": [0.25, None], "best": 0.75, "n": 3}
    assert read_json(path) == strict


def test_write_json_still_refuses_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot write object as JSON"):
        write_json({"x": object()}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_read_table_keeps_ids_as_written(tmp_path):
    path = tmp_path / "oof.csv"
    path.write_text("image_id,label,score,mask_path\nNA,0,0.5,\n0012,1,,m.png\nnan,1,NA,\n")
    table = read_table(path)
    assert table["image_id"].tolist() == ["NA", "0012", "nan"]
    # Other columns parse as usual: numbers, and empty or "NA" cells are missing.
    assert table["label"].tolist() == [0, 1, 1]
    assert np.isnan(table["score"].iloc[1]) and np.isnan(table["score"].iloc[2])
    assert table["mask_path"].isna().tolist() == [True, False, True]


def test_read_table_round_trips_write_csv(tmp_path):
    frame = pd.DataFrame({"image_id": ["NA", "007", "null"], "group": ["N/A", "", "1"], "score": [0.1, 0.2, 0.3]})
    table = read_table(write_csv(frame, tmp_path / "t.csv"), id_columns=("image_id", "group"))
    assert table["image_id"].tolist() == ["NA", "007", "null"]
    assert table["group"].tolist() == ["N/A", "", "1"]
    assert table["score"].tolist() == [0.1, 0.2, 0.3]


def test_read_table_all_text(tmp_path):
    path = tmp_path / "answers.csv"
    path.write_text("ImageId,Answer\nNA,1\n0001,\n")
    table = read_table(path, all_text=True)
    assert table.to_dict("list") == {"ImageId": ["NA", "0001"], "Answer": ["1", ""]}


def test_pretrain_paths(tmp_path):
    assert pretrain_dir(tmp_path) == tmp_path / "pretrain"
    assert pretrained_weights_path(tmp_path, "resnet18") == tmp_path / "pretrain" / "resnet18.safetensors"


def test_first_few_names_the_first_and_counts_the_rest():
    from competition.messages import first_few

    assert first_few(["a", "b"]) == "a, b"
    assert first_few([f"id{i}" for i in range(8)], limit=3) == "id0, id1, id2 ... and 5 more"
    assert first_few(["0012", " x"], quote=True) == "'0012', ' x'"
    assert first_few([3, 4], quote=True) == "3, 4"
    assert first_few(["k: 1", "j: 2", "i: 3"], limit=2, separator="; ") == "k: 1; j: 2 ... and 1 more"
