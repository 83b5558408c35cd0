"""The competition file: exactly `ImageId,answer`, one row per sample_submission row, in its order.

A submission is checked before it lands: written to a temporary file, read back the way a grader
reads it (every cell a string), validated (columns, row count, ids, values) and only then renamed
into place, so a failed run never leaves a half-written or wrong file behind.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from competition.artifacts import atomic_path, atomic_paths, read_table, write_json
from competition.config import Config
from competition.data.layouts import IMAGE_EXTENSIONS, SUBMISSION_COLUMNS
from competition.messages import first_few

ANSWERS = ("0", "1")


class SubmissionError(ValueError):
    """A submission breaks the format; the message lists every problem found."""


def _without_extension(image_id: str) -> str:
    path = PurePosixPath(image_id)
    return str(path.with_suffix("")) if path.suffix.lower() in IMAGE_EXTENSIONS else image_id


def read_submission(path: str | Path) -> pd.DataFrame:
    """A submission CSV as strings, exactly as written (no NaN, no int casts)."""
    try:
        return read_table(path, all_text=True)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not a readable CSV with columns ImageId,answer ({exc})") from None


def submission_problems(submission: pd.DataFrame, expected_ids: list[str], in_order: bool = True,
                        reference: str = "sample_submission.csv") -> list[str]:
    """Everything wrong with `submission` against the ids of `reference`; [] when it is valid.

    `in_order` also requires the reference's row order (our own files); a grader accepts any order.
    """
    problems = []
    columns = [str(c) for c in submission.columns]
    if columns != list(SUBMISSION_COLUMNS):
        problems.append(f"columns must be exactly {','.join(SUBMISSION_COLUMNS)} (in that order); "
                        f"found {','.join(columns) or 'none'}")
        if not set(SUBMISSION_COLUMNS) <= set(columns):
            return problems
    if len(submission) != len(expected_ids):
        problems.append(f"{len(submission)} rows; {reference} has {len(expected_ids)} (one row per ImageId)")

    ids = submission["ImageId"].astype(str).tolist()
    blank = [row for row, image_id in enumerate(ids, start=1) if not image_id.strip()]
    if blank:
        problems.append(f"empty ImageId in row(s) {first_few(blank, quote=True)}")
    seen, duplicated = set(), []
    for image_id in ids:
        if image_id in seen and image_id not in duplicated:
            duplicated.append(image_id)
        seen.add(image_id)
    if duplicated:
        problems.append(f"ImageIds listed more than once: {first_few(duplicated, quote=True)}")
    expected_set = set(expected_ids)
    unknown = [i for i in dict.fromkeys(ids) if i.strip() and i not in expected_set]
    lacking = [i for i in expected_ids if i not in seen]
    if unknown:
        problems.append(f"{len(unknown)} ImageId(s) not in {reference}: {first_few(unknown, quote=True)}")
    if lacking:
        problems.append(f"{len(lacking)} ImageId(s) of {reference} missing: {first_few(lacking, quote=True)}")
    if unknown and lacking:
        by_stem = {_without_extension(i): i for i in expected_ids}
        renamed = [(i, by_stem[_without_extension(i)]) for i in unknown if _without_extension(i) in by_stem]
        if renamed:
            ours, theirs = renamed[0]
            problems.append(f"ImageIds must be written exactly as in {reference}: {theirs!r} there, "
                            f"{ours!r} here ({len(renamed)} id(s) differ only by the file extension)")
    if in_order and not (unknown or lacking or duplicated) and ids != list(expected_ids):
        row = next(r for r, (a, b) in enumerate(zip(ids, expected_ids), start=1) if a != b)
        problems.append(f"rows are not in {reference} order: row {row} is {ids[row - 1]!r}, "
                        f"expected {expected_ids[row - 1]!r}")

    answers = submission["answer"].astype(str).tolist()
    bad = [(row, value) for row, value in enumerate(answers, start=1) if value not in ANSWERS]
    if bad:
        problems.append(f"answer must be 0 or 1; found {first_few(f'{value!r} in row {row}' for row, value in bad)}")
    return problems


def validate_submission(submission: pd.DataFrame, expected_ids: list[str], in_order: bool = True,
                        source: str = "submission", reference: str = "sample_submission.csv") -> None:
    problems = submission_problems(submission, expected_ids, in_order, reference)
    if problems:
        raise SubmissionError(f"{source} is not a valid submission:\n  - " + "\n  - ".join(problems))


def expected_image_ids(cfg: Config, index: pd.DataFrame) -> list[str]:
    """The ids a submission must hold: sample_submission.csv's for the competition layout, else the
    index's test images (benchmark layouts have no sample file); both in that order."""
    test_ids = index.loc[index["split"] == "test", "image_id"].astype(str).tolist()
    if cfg.data.layout != "competition":
        return test_ids
    from competition.data.layouts import sample_submission

    sample_ids = sample_submission(cfg.paths.data)["ImageId"].tolist()
    if sample_ids != test_ids:
        raise SubmissionError(f"{cfg.paths.data}/test/sample_submission.csv changed since the index was read: "
                              "re-run with the current dataset")
    return sample_ids


def build_submission(expected_ids: list[str], answers: Mapping[str, int] | pd.Series) -> pd.DataFrame:
    """`ImageId,answer` in the order of `expected_ids`, from image_id -> 0/1."""
    answers = pd.Series(answers)
    lacking = [i for i in expected_ids if i not in answers.index]
    if lacking:
        raise SubmissionError(f"no prediction for {len(lacking)} test image(s): {first_few(lacking, quote=True)}")
    values = answers.loc[list(expected_ids)].astype(int).to_numpy()
    return pd.DataFrame({"ImageId": list(expected_ids), "answer": values})


def write_checked_submission(submission: pd.DataFrame, expected_ids: list[str], path: str | Path) -> Path:
    """Write through a temporary file, re-read and validate it, then rename it into place."""
    with atomic_path(path) as tmp:
        _write_checked(submission, expected_ids, tmp, path)
    return Path(path)


def _write_checked(submission: pd.DataFrame, expected_ids: list[str], tmp: Path, path: str | Path) -> None:
    submission.to_csv(tmp, index=False)
    validate_submission(read_submission(tmp), expected_ids, source=str(path))


def write_submission(submission: pd.DataFrame, expected_ids: list[str], submissions_dir: str | Path,
                     experiment: str, record: dict[str, Any]) -> dict[str, Path]:
    """`<experiment>.csv`, its `<experiment>.json` record and `submission.csv`, all validated and atomic."""
    validate_submission(submission, expected_ids)
    out = Path(submissions_dir)
    paths = {"experiment": out / f"{experiment}.csv", "record": out / f"{experiment}.json",
             "submission": out / "submission.csv"}
    # The three land together (all written and checked, then renamed), so a kill never leaves them disagreeing.
    with atomic_paths(paths["experiment"], paths["record"], paths["submission"]) as (experiment_tmp, record_tmp,
                                                                                     submission_tmp):
        _write_checked(submission, expected_ids, experiment_tmp, paths["experiment"])
        write_json(record, record_tmp)
        _write_checked(submission, expected_ids, submission_tmp, paths["submission"])
    return paths
