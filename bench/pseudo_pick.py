"""How many of a second round's pseudo-labels the answer key confirms (development sets only).

    python bench/pseudo_pick.py RUNS/EXPERIMENT/pseudo.csv DATA/answers.csv
"""
from __future__ import annotations

import argparse

import pandas as pd

from competition.leaderboard import read_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pseudo", help="pseudo.csv written by `python -m competition pseudo`")
    parser.add_argument("answers", help="answers.csv (ImageId,answer,Usage)")
    args = parser.parse_args()
    picked = pd.read_csv(args.pseudo, dtype={"image_id": str})
    answers = read_answers(args.answers).rename(columns={"ImageId": "image_id"}).astype({"answer": int})
    both = picked.merge(answers, on="image_id", how="left", validate="one_to_one")
    for label, name in ((0, "normal"), (1, "defect")):
        rows = both[both["label"] == label]
        right = int((rows["answer"] == label).sum())
        print(f"  pseudo-{name}: {len(rows)} picked, {right} right ({right / max(len(rows), 1):.1%})")


if __name__ == "__main__":
    main()
