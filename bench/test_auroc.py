"""Test AUROC of finished zoo (or classifier) runs against a local answer key, for development sets only.

    python bench/test_auroc.py runs/default ../shared/datasets/deeppcb/answers.csv
    python bench/test_auroc.py runs/default/padim-resnet18 answers.csv     # one model folder
    python bench/test_auroc.py runs/default answers.csv --fold 0           # fold 0's models alone

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


def model_folders(run: Path, folds: str = "fold*") -> list[Path]:
    """`run` itself when it holds folds, else its subfolders that do."""
    if any(run.glob(f"{folds}/test.csv")):
        return [run]
    return sorted(p for p in run.iterdir() if p.is_dir() and any(p.glob(f"{folds}/test.csv")))


def test_scores(folder: Path, folds: str = "fold*") -> tuple[pd.Series, int]:
    """Mean over folds of each fold's test-score ranks (in [0, 1]), and the number of folds."""
    ranked = []
    for path in sorted(folder.glob(f"{folds}/test.csv")):
        frame = read_table(path).set_index("image_id")
        ranked.append(frame["score"].astype(float).rank(pct=True))
    return pd.concat(ranked, axis=1).mean(axis=1), len(ranked)


def model_row(folder: Path, answers: pd.DataFrame, pattern: str = "fold*") -> dict:
    scores, folds = test_scores(folder, pattern)
    joined = answers.join(scores.rename("score"), how="inner")
    row = {"model": folder.name, "folds": folds, "test_images": len(joined),
           "test_auroc": auroc(joined["answer"].astype(int), joined["score"])}
    if "Usage" in joined:
        for usage, part in joined.groupby("Usage"):
            row[f"{usage.lower()}_auroc"] = auroc(part["answer"].astype(int), part["score"])
    oof = [read_table(p) for p in sorted(folder.glob(f"{pattern}/oof.csv"))]
    if oof:
        pooled = pd.concat(oof)
        row["oof_auroc"] = auroc(pooled["label"].astype(int), pooled["score"].astype(float))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an experiment folder (runs/<name>) or one model folder")
    parser.add_argument("answers", type=Path, help="answers.csv: ImageId,answer[,Usage]")
    parser.add_argument("--fold", type=int, default=None, help="one fold's models alone (default: every fold)")
    args = parser.parse_args(argv)
    pattern = "fold*" if args.fold is None else f"fold{args.fold}"
    answers = read_table(args.answers).rename(columns={"ImageId": "image_id"}).set_index("image_id")
    folders = model_folders(args.run, pattern)
    if not folders:
        print(f"{args.run}: no {pattern}/test.csv found", file=sys.stderr)
        return 1
    rows = [model_row(f, answers, pattern) for f in folders]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
