"""`python -m competition <command>`: the stages' commands (`commands`), and `run`, which starts them as
jobs (`run`). This module sits above both, so the executor imports the commands and never the reverse."""
from __future__ import annotations

import argparse

from competition.commands import build_parser  # noqa: F401 - the parser of `python -m competition`
from competition.commands import main as run_command
from competition.config import Config


def _run(cfg: Config, args: argparse.Namespace) -> int:
    from competition.run import main as run_main

    return run_main(cfg, args.config, args.overrides, args.dry_run)


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, handlers={"run": _run})
