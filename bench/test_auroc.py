"""Test AUROC of finished zoo (or classifier) runs against a local answer key, for development sets only.

    python bench/test_auroc.py runs/default ../shared/datasets/deeppcb/answers.csv
    python bench/test_auroc.py runs/default/padim-resnet18 answers.csv     # one model folder

Per model folder: the fold models' test scores (`fold*/test.csv`) averaged per image after ranking
each fold's scores (folds fitted on different images need not share a scale), then AUROC against
`answers.csv` (`ImageId,answer[,Usage]`), overall and per Usage. Also the pooled out-of-fold AUROC of
the raw scores, so one line shows both. The pipeline itself never reads answers.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from competition.artifacts import read_table  # noqa: E402
from competition.metrics import auroc  # noqa: E402


def model_folders(run: Path) -> list[Path]:
    """`run` itself when it holds folds, else its subfolders that do."""
    if any(run.glob("fold*/test.csv")):
        return [run]
    return sorted(p for p in run.iterdir() if p.is_dir() and any(p.glob("fold*/test.csv")))


def test_scores(folder: Path) -> tuple[pd.Series, int]:
    """Mean over folds of each fold's test-score ranks (in [0, 1]), and the number of folds."""
    ranked = []
    for path in sorted(folder.glob("fold*/test.csv")):
        frame = read_table(path).set_index("image_id")
        ranked.append(frame["score"].astype(float).rank(pct=True))
    return pd.concat(ranked, axis=1).mean(axis=1), len(ranked)


def model_row(folder: Path, answers: pd.DataFrame) -> dict:
    scores, folds = test_scores(folder)
    joined = answers.join(scores.rename("score"), how="inner")
    row = {"model": folder.name, "folds": folds, "test_images": len(joined),
           "test_auroc": auroc(joined["answer"].astype(int), joined["score"])}
    if "Usage" in joined:
        for usage, part in joined.groupby("Usage"):
            row[f"{usage.lower()}_auroc"] = auroc(part["answer"].astype(int), part["score"])
    oof = [read_table(p) for p in sorted(folder.glob("fold*/oof.csv"))]
    if oof:
        pooled = pd.concat(oof)
        row["oof_auroc"] = auroc(pooled["label"].astype(int), pooled["score"].astype(float))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an experiment folder (runs/<name>) or one model folder")
    parser.add_argument("answers", type=Path, help="answers.csv: ImageId,answer[,Usage]")
    args = parser.parse_args(argv)
    answers = read_table(args.answers).rename(columns={"ImageId": "image_id"}).set_index("image_id")
    folders = model_folders(args.run)
    if not folders:
        print(f"{args.run}: no fold*/test.csv found", file=sys.stderr)
        return 1
    rows = [model_row(f, answers) for f in folders]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
