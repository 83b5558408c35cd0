"""Every command of `python -m competition`: parses arguments, loads the config, dispatches. Nothing else.

`run` is parsed here but carried out by the handler `cli.main` passes in: it starts the other commands as
jobs (`competition.run`), so the commands a job runs never depend on the executor that starts them."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from competition.config import DEFAULT_CONFIG, Config, ConfigError, load_config

DESCRIPTION = "`python -m competition <command>`: one command per stage, each reading the files of the one before."

WORKFLOW = """workflow (make targets in brackets):
  synth --preset small --out DIR       a synthetic competition, or bring your own in the same layout [make data]
  check-data --data DIR                decode every image and mask, report problems before training
  folds                                stratified k-fold assignment: <paths.work>/folds.csv [make folds]
  train --fold all | zoo --fold all    the classifier and the anomaly zoo, per fold [make train, make zoo]
  infer                                stack the finished runs, write submissions/submission.csv [make infer]
  leaderboard                          every experiment by cross-validation (and the answer key if any)
  run                                  all of the above from folds, as jobs: serial or Ray [make all EXECUTOR=ray]
  score --submission F --answers K     macro-F1 of a submission
  predict --images ... --out F         the trained ensemble on new images [make predict IMAGES=...]
  export --format onnx|openvino        the fold models as graphs for predict --runtime [make export]
  report                               one HTML page of the experiment [make report]
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="competition", description=DESCRIPTION, epilog=WORKFLOW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic competition dataset")
    p.add_argument("--preset", choices=["tiny", "small", "medium", "full"], default="small",
                   help="dataset size: tiny (tests), small (the default experiment), full (the original counts)")
    p.add_argument("--out", required=True, help="folder to write the dataset into")
    p.add_argument("--seed", type=int, default=0, help="random seed of the textures and defects")
    p.add_argument("--test-defect-rate", type=float, default=None,
                   help="share of defective test images (default: the preset's)")
    p.add_argument("--real-like", action="store_true", help="harder variant: grayscale, varying sizes, JPEG, subtle")
    p.add_argument("--if-missing", action="store_true", help="do nothing if OUT already holds this preset and seed")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering images (default 0: one per core, up to 16; same bytes for any number)")

    p = sub.add_parser("check-data", help="validate a dataset and print a report")
    p.add_argument("--data", default=None, help="dataset folder (default: paths.data of --config)")
    p.add_argument("--layout", default=None,
                   help="competition | mvtec | btad | visa | folder (default: data.layout of --config)")
    p.add_argument("--category", default=None, help="object category of an mvtec/btad/visa layout")
    _add_config_args(p)

    p = sub.add_parser("folds", help="write <paths.work>/folds.csv")
    _add_config_args(p)

    p = sub.add_parser("train", help="train the classifier on one fold or all")
    _add_config_args(p)
    p.add_argument("--fold", default="all", help="fold index or 'all' (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain a finished fold")

    p = sub.add_parser("zoo", help="fit anomaly models and write their per-fold scores")
    _add_config_args(p)
    p.add_argument("--model", default=None, help="registry name; default: zoo.models from the config")
    p.add_argument("--fold", default="all", help="fold index or 'all'")
    p.add_argument("--force", action="store_true", help="refit a finished fold")
    p.add_argument("--list", action="store_true", help="list the registry and exit")

    p = sub.add_parser("pretrain", help="self-supervised pretraining of a backbone on the dataset's images")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="start again instead of resuming")

    p = sub.add_parser("pseudo", help="pick a second round's pseudo-labels from pseudo.source's stacked test scores")
    _add_config_args(p)

    p = sub.add_parser("infer", help="stack the finished runs and write submission.csv")
    _add_config_args(p)
    p.add_argument("--allow-partial", action="store_true",
                   help="stack the finished models even when others of the experiment are unfinished")

    p = sub.add_parser("leaderboard", help="compare every experiment by cross-validation")
    _add_config_args(p)

    p = sub.add_parser("run", help="every job of the experiment (folds, pretrain, train, zoo, infer, leaderboard) "
                                   "with executor.backend: serial or ray")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the jobs, their commands and order, run nothing")

    p = sub.add_parser("predict", help="score new images with the experiment's trained ensemble")
    _add_config_args(p)
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or globs")
    p.add_argument("--out", required=True, help="CSV to write: path,score,answer,error, each model's score, map")
    p.add_argument("--maps", default=None, metavar="DIR", help="write map overlays of the images predicted defective")
    p.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="run the fold models eagerly or through their exported graphs (make export)")
    p.add_argument("--chunk", type=int, default=128, help="images decoded and scored at a time (memory bound)")
    p.add_argument("--threshold", type=float, default=None,
                   help="defect if the ensemble score reaches this; default: the ensemble's own threshold")

    p = sub.add_parser("export", help="export the fold models to ONNX or OpenVINO")
    _add_config_args(p)
    p.add_argument("--format", dest="fmt", choices=["onnx", "openvino"], default="onnx",
                   help="onnx (model.onnx, for onnxruntime) or openvino (model.xml + model.bin)")

    p = sub.add_parser("report", help="write the experiment's HTML report under paths.submissions")
    _add_config_args(p)

    p = sub.add_parser("score", help="score a submission against an answer key by macro-F1")
    p.add_argument("--submission", required=True, help="the CSV to score (ImageId,answer)")
    p.add_argument("--answers", required=True, help="the answer key (ImageId,answer, optionally Usage)")
    return parser


def _synth(args: argparse.Namespace) -> int:
    from competition.data.synthetic import write_competition

    out = Path(args.out)
    if args.if_missing and (out / "synth.json").exists():
        from competition.artifacts import read_json

        meta = read_json(out / "synth.json")
        if meta.get("preset") == args.preset and meta.get("seed") == args.seed and \
                bool(meta.get("real_like")) == args.real_like:
            print(f"{out} already holds preset {args.preset} seed {args.seed}; nothing to do")
            return 0
    summary = write_competition(out, preset=args.preset, seed=args.seed,
                                test_defect_rate=args.test_defect_rate, real_like=args.real_like,
                                overwrite=args.overwrite, workers=args.workers)
    print(summary)
    print(out)
    return 0


def plain_progress_when_redirected() -> None:
    """Progress bars in a log file: every bar on one line position (nested bars would write cursor-up codes)
    and a refresh at most every 10 s. tqdm takes these defaults from TQDM_* variables; a terminal keeps its
    live bars."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_POSITION", "0")
        os.environ.setdefault("TQDM_MININTERVAL", "10")


Handler = Callable[[Config, argparse.Namespace], int]  # (the loaded Config, the parsed arguments) -> exit status


def main(argv: list[str] | None = None, handlers: Mapping[str, Handler] | None = None) -> int:
    """One command; `handlers` carries out commands implemented above this module (`run`)."""
    plain_progress_when_redirected()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            return _synth(args)
        if args.command == "check-data":
            from competition.data.check import run_check_data

            if args.data is None or args.layout is None:  # from the config, as the stages would read it
                cfg = load_config(args.config, args.overrides)
                args.data = args.data or cfg.paths.data
                args.layout = args.layout or cfg.data.layout
                args.category = args.category or cfg.data.category
            return run_check_data(args.data, args.layout, args.category)
        if args.command == "score":
            from competition.leaderboard import score_main

            return score_main(args.submission, args.answers)
        if args.command == "zoo" and args.list:
            from competition.zoo.registry import list_models

            for name, description in list_models():
                print(f"{name}\t{description}")
            return 0

        cfg = load_config(args.config, args.overrides)
        if args.command == "folds":
            from competition.folds import run

            run(cfg)
        elif args.command == "train":
            from competition.classifier.train import main as train_main

            train_main(cfg, fold=args.fold, force=args.force)
        elif args.command == "zoo":
            from competition.zoo.runner import main as zoo_main

            zoo_main(cfg, model=args.model, fold=args.fold, force=args.force)
        elif args.command == "pretrain":
            from competition.pretrain import main as pretrain_main

            pretrain_main(cfg, force=args.force)
        elif args.command == "pseudo":
            from competition.pseudo import main as pseudo_main

            pseudo_main(cfg)
        elif args.command == "infer":
            from competition.ensemble.infer import main as infer_main

            infer_main(cfg, allow_partial=args.allow_partial)
        elif args.command == "leaderboard":
            from competition.leaderboard import main as leaderboard_main

            leaderboard_main(cfg)
        elif args.command in (handlers or {}):
            return handlers[args.command](cfg, args)
        elif args.command == "run":
            raise ValueError("`run` starts the other commands as jobs: call it through competition.cli")
        elif args.command == "predict":
            from competition.predict import main as predict_main

            return predict_main(cfg, args.images, args.out, args.maps, args.runtime, args.chunk, args.threshold)
        elif args.command == "export":
            from competition.export import main as export_main

            return export_main(cfg, args.fmt)
        elif args.command == "report":
            from competition.report import main as report_main

            report_main(cfg)
        return 0
    except KeyboardInterrupt:
        print("interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # full disk, permissions, a file where a folder should be: name the path
        if os.environ.get("COMPETITION_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, RuntimeError) as exc:
        # Expected user-facing failures: one clear line; COMPETITION_DEBUG=1 shows the traceback.
        if os.environ.get("COMPETITION_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
