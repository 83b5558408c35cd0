"""The score command (macro-F1 by Usage, malformed submissions rejected) and the local leaderboard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, quick_config
from fake_runs import read_answers_labels, write_fake_model
from sklearn.metrics import f1_score

from competition.cli import main as cli_main
from competition.ensemble.infer import main as infer_main
from competition.folds import load_index, read_folds
from competition.leaderboard import main as leaderboard_main
from competition.leaderboard import read_answers, score_by_usage

KEY = pd.DataFrame({
    "ImageId": [f"t{i}" for i in range(10)],
    "answer": [1, 0, 0, 1, 0, 0, 1, 0, 0, 0],
    "Usage": ["Public"] * 4 + ["Private"] * 6,
})
PREDICTED = [1, 1, 0, 0, 0, 0, 1, 0, 1, 0]


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "answers.csv"
    KEY.to_csv(path, index=False)
    return path


def _score(tmp_path, key_file, frame, capsys):
    path = tmp_path / "sub.csv"
    frame.to_csv(path, index=False)
    code = cli_main(["score", "--submission", str(path), "--answers", str(key_file)])
    return code, capsys.readouterr()


def test_score_is_macro_f1_per_usage(tmp_path, key_file, capsys):
    code, out = _score(tmp_path, key_file, pd.DataFrame({"ImageId": KEY["ImageId"], "answer": PREDICTED}), capsys)
    assert code == 0
    truth, pred = KEY["answer"].to_numpy(), np.array(PREDICTED)
    public = f1_score(truth[:4], pred[:4], average="macro")  # 0.4667
    private = f1_score(truth[4:], pred[4:], average="macro")  # 0.7619
    overall = f1_score(truth, pred, average="macro")
    assert f"Public        4  {public:.4f}" in out.out
    assert f"Private       6  {private:.4f}" in out.out
    assert f"All          10  {overall:.4f}" in out.out
    assert public != pytest.approx(private)


def test_score_accepts_any_row_order(key_file):
    shuffled = pd.DataFrame({"ImageId": KEY["ImageId"], "answer": PREDICTED}).iloc[::-1].astype(str)
    in_order = pd.DataFrame({"ImageId": KEY["ImageId"], "answer": PREDICTED}).astype(str)
    key = read_answers(key_file)
    assert score_by_usage(shuffled, key) == score_by_usage(in_order, key)


@pytest.mark.parametrize("frame, reason", [
    (pd.DataFrame({"ImageId": KEY["ImageId"], "label": PREDICTED}), "columns must be exactly ImageId,answer"),
    (pd.DataFrame({"ImageId": KEY["ImageId"][:9], "answer": PREDICTED[:9]}), "missing: 't9'"),
    (pd.DataFrame({"ImageId": [f"{i}.png" for i in KEY["ImageId"]], "answer": PREDICTED}),
     "'t0' there, 't0.png' here"),
    (pd.DataFrame({"ImageId": KEY["ImageId"], "answer": [0.5] * 10}), "answer must be 0 or 1"),
])
def test_score_rejects_a_malformed_submission_saying_what_is_wrong(tmp_path, key_file, capsys, frame, reason):
    code, out = _score(tmp_path, key_file, frame, capsys)
    assert code == 1
    assert "is not a valid submission" in out.err and reason in out.err
    assert out.out == ""


def test_score_rejects_a_broken_answer_key(tmp_path, capsys):
    bad_key = tmp_path / "key.csv"
    KEY.drop(columns="Usage").to_csv(bad_key, index=False)
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"ImageId": KEY["ImageId"], "answer": PREDICTED}).to_csv(sub, index=False)
    assert cli_main(["score", "--submission", str(sub), "--answers", str(bad_key)]) == 2
    assert "missing column(s) Usage" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ leaderboard

def _write_runs(cfg, experiment: str, models: dict[str, tuple[float, int]], **kwargs) -> None:
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    test_ids = index.loc[index["split"] == "test", "image_id"].tolist()
    labels = read_answers_labels(Path(cfg.paths.data), test_ids)
    for name, (signal, seed) in models.items():
        write_fake_model(cfg.paths.work, experiment, name, folds, test_ids, labels, signal, seed, **kwargs)


def test_leaderboard_ranks_every_model_and_ensemble_and_scores_them_on_the_answer_key(tiny_cfg, capsys):
    cfg = tiny_cfg
    _write_runs(cfg, "quick", {"zoo-good": (3.0, 1), "zoo-noise": (0.0, 2), cfg.model.name: (1.0, 3)})
    _write_runs(cfg, "other", {"zoo-weak": (0.8, 4)})
    _write_runs(cfg, "quick", {"zoo-unfinished": (1.0, 5)}, only_folds=[0])
    infer_main(quick_config(Path(cfg.paths.data), Path(cfg.paths.work).parent,
                            "ensemble.models=[zoo-good, zoo-noise, efficientnet_b0]"))
    capsys.readouterr()
    leaderboard_main(cfg)
    out = capsys.readouterr().out

    subs = Path(cfg.paths.submissions)
    table = pd.read_csv(subs / "leaderboard.csv")
    assert (subs / "leaderboard.png").stat().st_size > 0
    assert set(zip(table["experiment"], table["kind"])) == {("quick", "model"), ("quick", "ensemble"),
                                                            ("other", "model")}
    assert len(table) == 5 and "zoo-unfinished" not in set(table["model"])
    assert "quick/zoo-unfinished: unfinished, fold(s) 1, 2 of 3 lack predictions" in out
    assert table["oof_macro_f1"].is_monotonic_decreasing and table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert table.iloc[0]["model"] == "zoo-good" or table.iloc[0]["model"].startswith("ensemble (auto -> ")
    assert table.iloc[-1]["model"] == "zoo-noise"

    folds = table[["fold0", "fold1", "fold2"]].to_numpy()
    np.testing.assert_allclose(table["cv_mean"], folds.mean(axis=1))
    np.testing.assert_allclose(table["cv_std"], folds.std(axis=1, ddof=1))
    models = table[table["kind"] == "model"]
    assert models["threshold"].between(0, 1).all()  # rank-normalised scores
    assert (models["train_seconds"] == 30.0).all()  # 3 folds x 10 s from summary.json

    record = json.loads((subs / "quick.json").read_text())
    ensemble = table[table["kind"] == "ensemble"].iloc[0]
    assert ensemble["oof_macro_f1"] == pytest.approx(record["cv"]["oof_macro_f1"])
    assert ensemble["threshold"] == pytest.approx(record["threshold"])
    submission = pd.read_csv(subs / "quick.csv", dtype=str, keep_default_na=False)
    scores = score_by_usage(submission, read_answers(Path(cfg.paths.data) / "answers.csv"))
    assert ensemble["public"] == pytest.approx(scores["Public"])
    assert ensemble["private"] == pytest.approx(scores["Private"])
    assert table["public"].notna().all() and table["private"].notna().all()

    markdown = (subs / "leaderboard.md").read_text()
    assert markdown.splitlines()[0].endswith("| Public | Private |")
    assert markdown in out and out.strip().endswith(str(subs / "leaderboard.csv"))


def test_leaderboard_without_an_answer_key_leaves_public_and_private_out(tiny_cfg, tmp_path, capsys):
    _write_runs(tiny_cfg, "quick", {"zoo-good": (3.0, 1)})
    no_key = quick_config(tmp_path / "elsewhere", Path(tiny_cfg.paths.work).parent)
    leaderboard_main(no_key)
    out = capsys.readouterr().out
    assert "Public" not in (Path(no_key.paths.submissions) / "leaderboard.md").read_text()
    assert "no answer key" in out
    assert pd.read_csv(Path(no_key.paths.submissions) / "leaderboard.csv")["public"].isna().all()


def test_leaderboard_with_nothing_to_rank_says_what_to_run(tmp_path, capsys):
    cfg_args = ["--config", str(ROOT / "configs" / "quick.yaml"), "--set", f"paths.data={tmp_path}",
                "--set", f"paths.work={tmp_path / 'runs'}", "--set", f"paths.submissions={tmp_path / 'subs'}"]
    assert cli_main(["leaderboard", *cfg_args]) == 2
    assert "nothing to rank" in capsys.readouterr().err


def test_an_auto_ensemble_row_names_the_blend_it_chose(tmp_path):
    from competition.leaderboard import ensemble_row

    record = {"method": "auto", "models": ["a", "b"], "stacker": {"auto": {"chosen": "logistic"}},
              "cv": {"threshold": 0.5, "oof_macro_f1": 0.8, "oof_auroc": 0.9, "fold_macro_f1": [0.8, 0.8],
                     "cv_mean": 0.8, "cv_std": 0.0}, "threshold": 0.4}
    row = ensemble_row("exp", record, tmp_path / "missing.csv", None, [])
    assert row["model"] == "ensemble (auto -> logistic: a+b)" and row["kind"] == "ensemble"


def test_a_truncated_oof_is_left_out_and_a_stale_ensemble_flagged(tiny_cfg, capsys):
    cfg = tiny_cfg
    _write_runs(cfg, "quick", {"zoo-good": (3.0, 1), "zoo-cut": (1.0, 2)})
    infer_main(cfg)
    cut = Path(cfg.paths.work) / "quick" / "zoo-cut" / "fold1" / "oof.csv"
    lines = cut.read_text().splitlines()
    cut.write_text("\n".join(lines[:-3]) + "\n")  # a killed copy, say: rows lost
    test_csv = Path(cfg.paths.work) / "quick" / "zoo-good" / "fold0" / "test.csv"
    test_csv.write_text(test_csv.read_text().replace("0.", "0.1", 1))  # refit after infer
    capsys.readouterr()
    leaderboard_main(cfg)
    out = capsys.readouterr().out
    table = pd.read_csv(Path(cfg.paths.submissions) / "leaderboard.csv")
    assert "zoo-cut" not in set(table["model"])
    assert "quick/zoo-cut: left out" in out and "of fold 1 missing" in out
    assert "quick: the ensemble is stale, zoo-good/fold0 changed since `make infer`" in out
