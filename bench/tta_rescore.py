"""Test-time augmentation measured without retraining: a finished experiment's classifier folds re-scored
with `train.tta` flips or dihedral into a new experiment, beside the same zoo folds.

TTA changes only prediction: each fold's checkpoint is chosen on plain validation whatever `train.tta`
says, so re-scoring best.pt gives the oof.csv/test.csv a run with that `train.tta` would have written.
Then stack (`infer`) and score both experiments to compare.

    python bench/tta_rescore.py --config configs/real.yaml --set paths.data=DIR --set paths.work=W/runs \
        --set paths.submissions=W/submissions --tta dihedral
    # then: python -m competition infer ... --set experiment=<experiment>-tta-dihedral; score
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from scipy.special import expit

from competition.artifacts import model_dir, read_json, run_dir, write_json, write_predictions
from competition.classifier.data import ImageStore, classifier_geometry
from competition.classifier.train import eval_loader as make_eval_loader
from competition.classifier.train import image_scores, load_fold_classifier, predict_logits
from competition.config import load_config
from competition.folds import load_index, read_folds
from competition.metrics import auroc
from competition.runtime import configure_threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tta", choices=["none", "flips", "dihedral"], required=True,
                        help="none re-scores as trained: a check that it reproduces the source oof.csv")
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    source = cfg.experiment
    target = f"{source}-tta-{args.tta}"
    tta_cfg = load_config(args.config, args.overrides + [f"train.tta={args.tta}", f"experiment={target}"])
    configure_threads(cfg.train.threads)
    device = torch.device("cpu")
    index = load_index(cfg)
    folds = read_folds(cfg, index)
    test_rows = index[index["split"] == "test"].reset_index(drop=True)
    store = ImageStore(classifier_geometry(cfg, scoring=True))  # the grid of model.tiles.predict_overlap, if set
    root = Path(cfg.paths.work)
    for model in sorted(p.name for p in (root / source).iterdir() if p.is_dir() and not p.name.startswith("_")):
        if model != cfg.model.name:  # the zoo folds: unchanged, copied beside the re-scored classifier
            shutil.copytree(model_dir(root, source, model), model_dir(root, target, model), dirs_exist_ok=True)
    started = time.perf_counter()
    fold_ids = range(cfg.folds.n_splits) if args.folds is None else args.folds
    for k in fold_ids:
        src, out = run_dir(root, source, cfg.model.name, k), run_dir(root, target, cfg.model.name, k)
        model = load_fold_classifier(cfg, src, device)
        val = folds[folds["fold"] == k].reset_index(drop=True)
        paths = val["path"].astype(str).tolist()
        oof_logits = predict_logits(model, make_eval_loader(paths, tta_cfg, store, device), device, tta_cfg,
                                    args.tta, desc=f"fold {k} oof")
        test_scores = image_scores(model, test_rows["path"].astype(str).tolist(), tta_cfg, store, device,
                                   desc=f"fold {k} test")
        oof = pd.DataFrame({"image_id": val["image_id"].astype(str), "label": val["label"].astype(int),
                            "score": expit(oof_logits)})
        write_predictions(oof, pd.DataFrame({"image_id": test_rows["image_id"].astype(str), "score": test_scores}),
                          out)
        summary = read_json(src / "summary.json")
        before = pd.read_csv(src / "oof.csv", dtype={"image_id": str})
        write_json({**summary, "tta": args.tta, "rescored_from": str(src)}, out / "summary.json")
        same = oof.merge(before, on="image_id", suffixes=("", "_before"))
        print(f"fold {k}: OOF AUROC {auroc(before['label'], before['score']):.4f} -> "
              f"{auroc(oof['label'], oof['score']):.4f} with {args.tta} (largest score change "
              f"{(same['score'] - same['score_before']).abs().max():.2e})")
    print(f"re-scored {len(fold_ids)} fold(s) in {time.perf_counter() - started:.0f} s -> {root / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
