"""Shared fixtures: one tiny synthetic competition per test session, and a quick config pointing at it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from competition.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Tests are small; one thread keeps them deterministic and leaves the other core to pytest's neighbours.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The `tiny` preset (seed 0), written once per session. Treat it as read-only."""
    from competition.data.synthetic import write_competition

    out = tmp_path_factory.mktemp("tiny_data")
    write_competition(out, preset="tiny", seed=0, progress=False)
    return out


def quick_config(data: Path, work: Path, *overrides: str) -> Config:
    """configs/quick.yaml on `data`, writing under `work`; extra `key=value` overrides as on the CLI."""
    sets = [f"paths.data={data}", f"paths.work={work / 'runs'}", f"paths.submissions={work / 'submissions'}"]
    return load_config(ROOT / "configs" / "quick.yaml", sets + list(overrides))


def config_with_folds(data: Path, work: Path, *overrides: str) -> Config:
    """`quick_config` with folds.csv already written in `work`."""
    from competition.folds import write_folds

    cfg = quick_config(data, work, *overrides)
    write_folds(cfg)
    return cfg


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path) -> Config:
    """Quick config on the tiny set with folds already written in a fresh work folder."""
    from competition.folds import write_folds

    cfg = quick_config(tiny_data, tmp_path)
    write_folds(cfg)
    return cfg
