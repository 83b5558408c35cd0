"""The experiment report: one static page whose images are relative files beside it, and what it says
when pieces are missing."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import config_with_folds
from fake_runs import read_answers_labels, write_fake_model

from competition.artifacts import read_json, read_table, run_dir, write_csv
from competition.ensemble.infer import main as infer_main
from competition.folds import load_index, read_folds
from competition.report import IMAGES_SHOWN, ReportError
from competition.report import main as report_main
from competition.zoo.runner import main as zoo_main

ZOO_MODEL = "padim-resnet18"


def _fake_runs(cfg, models: dict[str, tuple[float, int]]) -> None:
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    test_ids = index.loc[index["split"] == "test", "image_id"].tolist()
    labels = read_answers_labels(Path(cfg.paths.data), test_ids)
    for name, (signal, seed) in models.items():
        write_fake_model(cfg.paths.work, cfg.experiment, name, folds, test_ids, labels, signal, seed)


def _sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _shown_ids(page: str, start: str, end: str) -> list[str]:
    section = page[page.index(start):page.index(end) if end else len(page)]
    return re.findall(r"<figcaption><b>([^<]+)</b>", section)


def test_the_report_shows_every_model_the_ensemble_and_its_mistakes_with_maps(tiny_data, tmp_path):
    cfg = config_with_folds(tiny_data, tmp_path, "zoo.gallery_size=4", "train.threads=1")
    _fake_runs(cfg, {"zoo-fake": (1.5, 1), cfg.model.name: (1.0, 2)})
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.9, 0.5], "val_loss": [0.8, 0.6],
                            "val_macro_f1": [0.5, 0.7]})
    for k in range(cfg.folds.n_splits):
        write_csv(history, run_dir(cfg.paths.work, cfg.experiment, cfg.model.name, k) / "history.csv")
    zoo_main(cfg, ZOO_MODEL, "all", force=False)  # real fold models, so the mistakes have maps
    infer_main(cfg)

    path = report_main(cfg)
    assert path == Path(cfg.paths.submissions) / f"{cfg.experiment}_report" / "index.html"
    page = path.read_text()
    for name in ("zoo-fake", cfg.model.name, ZOO_MODEL, "ensemble (auto -&gt; "):
        assert name in page
    assert "Public" in page and "Private" in page  # the tiny set has an answer key
    assert "http://" not in page and "https://" not in page and "<script" not in page

    sources = _sources(page)
    assert len(sources) > 10
    for source in sources:
        assert source.startswith("assets/") and (path.parent / source).is_file(), source
    assert f"assets/curves_{cfg.model.name}_fold2.png" in sources  # drawn from history.csv
    assert f"assets/gallery_{ZOO_MODEL}_fold0.png" in sources  # copied from the zoo fold
    assert {p.name for p in (path.parent / "assets").iterdir()} == {s.split("/", 1)[1] for s in sources}

    oof = read_table(Path(cfg.paths.work) / cfg.experiment / "_ensemble" / "oof.csv")
    threshold = read_json(Path(cfg.paths.submissions) / f"{cfg.experiment}.json")["cv"]["threshold"]
    misses = oof[(oof["label"] == 1) & (oof["score"] < threshold)].sort_values("score", kind="stable")
    false_alarms = oof[(oof["label"] == 0) & (oof["score"] >= threshold)].sort_values(
        "score", ascending=False, kind="stable")
    assert len(misses) + len(false_alarms) > 0
    assert _shown_ids(page, 'id="fn"', 'id="fp"') == misses["image_id"].head(IMAGES_SHOWN).tolist()
    assert _shown_ids(page, 'id="fp"', "") == false_alarms["image_id"].head(IMAGES_SHOWN).tolist()
    assert f"by {ZOO_MODEL}, from the fold model that held the image out" in page


def test_missing_pieces_are_said_with_the_command_that_makes_them(tiny_cfg):
    cfg = tiny_cfg
    _fake_runs(cfg, {"zoo-fake": (1.5, 1), cfg.model.name: (1.0, 2)})
    path = report_main(cfg)
    page = path.read_text()
    assert "No ensemble" in page and "make infer" in page
    assert "zoo-fake: no history.csv" in page and "python -m competition train --fold all --force" in page
    assert "zoo-fake" in page.split('id="s0"')[1]  # the leaderboard lists it

    infer_main(cfg)  # an ensemble, but no zoo model kept model.pt: mistakes without maps
    page = report_main(cfg).read_text()
    assert "No ensemble" not in page and "without anomaly maps" in page
    assert _shown_ids(page, 'id="fn"', 'id="fp"') + _shown_ids(page, 'id="fp"', "")
    sources = _sources(page)
    assert {p.name for p in (path.parent / "assets").iterdir()} == {s.split("/", 1)[1] for s in sources}


def test_a_missing_experiment_names_the_path_and_make_all(tiny_cfg):
    with pytest.raises(ReportError, match=r"make all") as error:
        report_main(tiny_cfg)
    assert str(Path(tiny_cfg.paths.work) / tiny_cfg.experiment) in str(error.value)
