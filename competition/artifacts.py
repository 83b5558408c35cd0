"""Where runs keep their files, and the one way files are written: atomically.

Every CSV, checkpoint, JSON and YAML goes to a temporary file in the same folder and is renamed
into place, so a killed run never leaves a half-written file that a later stage would trust.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

OOF_COLUMNS = ["image_id", "label", "score"]
TEST_COLUMNS = ["image_id", "score"]


def run_dir(work: str | Path, experiment: str, model_name: str, fold: int) -> Path:
    """`<paths.work>/<experiment>/<model name>/fold<k>/`: every model (classifier or zoo) writes here."""
    return Path(work) / experiment / model_name / f"fold{fold}"


def model_dir(work: str | Path, experiment: str, model_name: str) -> Path:
    return Path(work) / experiment / model_name


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(data: Any, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Checkpoints hold tensors and plain Python values only, so `weights_only=True` always works."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def write_predictions(oof: pd.DataFrame, test: pd.DataFrame, out_dir: str | Path) -> None:
    """The two files every model shares: `oof.csv` (image_id,label,score) and `test.csv` (image_id,score)."""
    missing = [c for c in OOF_COLUMNS if c not in oof.columns] + [c for c in TEST_COLUMNS if c not in test.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}; oof needs {OOF_COLUMNS}, test needs {TEST_COLUMNS}")
    out_dir = Path(out_dir)
    write_csv(oof[OOF_COLUMNS], out_dir / "oof.csv")
    write_csv(test[TEST_COLUMNS], out_dir / "test.csv")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
