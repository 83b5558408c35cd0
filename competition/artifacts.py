"""Where runs keep their files, the one way files are written (atomically) and the one way tables are read.

Every CSV, checkpoint, JSON and YAML goes to a temporary file in the same folder and is renamed
into place, so a killed run never leaves a half-written file that a later stage would trust.
JSON is strict (RFC 8259: no NaN or Infinity; they are written as null) and ids read back exactly as written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

OOF_COLUMNS = ["image_id", "label", "score"]
TEST_COLUMNS = ["image_id", "score"]


def run_dir(work: str | Path, experiment: str, model_name: str, fold: int) -> Path:
    """`<paths.work>/<experiment>/<model name>/fold<k>/`: every model (classifier or zoo) writes here."""
    return Path(work) / experiment / model_name / f"fold{fold}"


def model_dir(work: str | Path, experiment: str, model_name: str) -> Path:
    return Path(work) / experiment / model_name


def pretrain_dir(work: str | Path) -> Path:
    """`<paths.work>/pretrain`: a weights folder holding `<backbone>.safetensors`."""
    return Path(work) / "pretrain"


def pretrained_weights_path(work: str | Path, backbone: str) -> Path:
    """Where `competition pretrain` writes (and the zoo's ssl weights tag looks for) a backbone's weights."""
    return pretrain_dir(work) / f"{backbone}.safetensors"


def pseudo_labels_path(work: str | Path, experiment: str) -> Path:
    """`<work>/<experiment>/pseudo.csv`: the test images a second round trains on, with their pseudo-labels."""
    return Path(work) / experiment / "pseudo.csv"


TEMP_SUFFIX = ".tmp"  # atomic writes' temporary files: `.<name>.<random>.tmp` beside their target


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the permissions any other tool would give them (mkstemp's own are 0600).
FILE_MODE = 0o666 & ~_process_umask()


class UnreadableFileError(ValueError):
    """A file the pipeline wrote cannot be read back (truncated, corrupted, another format)."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A full disk or another OS error names `path`, not the temporary file."""
    path = Path(path)
    try:
        with _temporary_beside(path) as tmp:
            yield tmp
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise OSError(exc.errno, f"{reason} (writing it)", str(path)) from exc


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """`atomic_path` for files that must agree: every one is written to its temporary file first, and only
    when all are complete are they renamed into place, one right after the other."""
    with ExitStack() as stack:
        temporaries = [stack.enter_context(_temporary_beside(Path(path))) for path in paths]
        yield temporaries
        for tmp in temporaries:
            os.chmod(tmp, FILE_MODE)
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file in `path`'s folder (made if needed), deleted on the way out unless renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `folder` (not below it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def file_digest(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 - deliberate process memo
    """sha1 of a file's bytes, remembered per (path, size, mtime) so each file is hashed once per process."""
    stat = os.stat(path)
    memo_key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    digest = _memo.get(memo_key)
    if digest is None:
        hasher = hashlib.sha1()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        digest = _memo[memo_key] = hasher.hexdigest()
    return digest


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    """Strict JSON: NaN and +-inf become null (bare `NaN` is not JSON and other readers reject it)."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return write_text(path, text + "\n")


def write_yaml(data: Any, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_json(path: str | Path) -> Any:
    """The JSON at `path`; a file that is not JSON raises UnreadableFileError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnreadableFileError(f"cannot read {path}: not valid JSON ({exc})") from None


def read_table(path: str | Path, id_columns: Iterable[str] = ("image_id",), all_text: bool = False) -> pd.DataFrame:
    """A CSV with its ids exactly as written: `id_columns` (every column when `all_text`) are strings and
    never read as missing, so "0012" stays "0012" and an id "NA" stays "NA"; an empty id is "".
    Other columns parse as pandas does by default (numbers, empty cells -> NaN)."""
    if all_text:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    from pandas._libs.parsers import STR_NA_VALUES  # pandas' default missing-value spellings

    columns = pd.read_csv(path, nrows=0).columns
    ids = [c for c in id_columns if c in columns]
    missing_spellings = sorted(STR_NA_VALUES)
    return pd.read_csv(path, dtype={c: str for c in ids}, keep_default_na=False,
                       na_values={c: missing_spellings for c in columns if c not in ids})


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
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch's writer reports a failed write (a full disk) as a RuntimeError
            if "write" not in str(exc).lower():
                raise
            full = shutil.disk_usage(tmp.parent).free < (64 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO, "file write failed", str(tmp)) from exc
    return Path(path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Checkpoints hold tensors and plain Python values only, so `weights_only=True` always works.
    A truncated or corrupted file raises UnreadableFileError naming it."""
    import pickle
    import zipfile

    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        text = str(exc)
        if "zip archive" in text or "central directory" in text or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            reason = "truncated or corrupted (not a complete torch checkpoint)"
        elif "Weights only load failed" in text:
            reason = "not a checkpoint of this project (it holds objects that weights_only loading refuses)"
        else:
            reason = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UnreadableFileError(f"cannot read {path}: {reason}") from None


def write_predictions(oof: pd.DataFrame, test: pd.DataFrame, out_dir: str | Path) -> None:
    """The two files every model shares: `oof.csv` (image_id,label,score) and `test.csv` (image_id,score)."""
    missing = [c for c in OOF_COLUMNS if c not in oof.columns] + [c for c in TEST_COLUMNS if c not in test.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}; oof needs {OOF_COLUMNS}, test needs {TEST_COLUMNS}")
    out_dir = Path(out_dir)
    write_csv(oof[OOF_COLUMNS], out_dir / "oof.csv")
    write_csv(test[TEST_COLUMNS], out_dir / "test.csv")


def json_safe(value: Any) -> Any:
    """`value` as plain JSON values: NaN and infinities (Python, numpy scalars, array elements) become
    None, numpy numbers Python numbers, tuples and arrays lists. Other objects pass through unchanged."""
    import numpy as np

    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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
