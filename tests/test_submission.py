"""Submission building, validation (columns, rows, ids, values) and atomic, checked writing."""
from __future__ import annotations

import pandas as pd
import pytest

from competition.ensemble.submission import (
    SubmissionError,
    build_submission,
    read_submission,
    submission_problems,
    validate_submission,
    write_submission,
)

IDS = ["0007", "0002", "img_10", "NA"]  # strings a careless reader would turn into 7, 2, ... and NaN


def valid() -> pd.DataFrame:
    return pd.DataFrame({"ImageId": IDS, "answer": [0, 1, 1, 0]})


def problems_of(frame: pd.DataFrame, ids=IDS, **kwargs) -> str:
    return "\n".join(submission_problems(frame, ids, **kwargs))


def test_a_valid_submission_has_no_problems_in_memory_or_read_back(tmp_path):
    assert submission_problems(valid(), IDS) == []
    path = tmp_path / "s.csv"
    valid().to_csv(path, index=False)
    read = read_submission(path)
    assert read["ImageId"].tolist() == IDS and submission_problems(read, IDS) == []


@pytest.mark.parametrize("columns, expected", [
    (["ImageId", "label"], "columns must be exactly ImageId,answer (in that order); found ImageId,label"),
    (["answer", "ImageId"], "found answer,ImageId"),
    (["image_id", "answer"], "found image_id,answer"),
])
def test_wrong_columns_are_named(columns, expected):
    frame = valid()
    frame.columns = columns
    assert expected in problems_of(frame)


def test_an_extra_column_is_rejected():
    assert "found ImageId,answer,score" in problems_of(valid().assign(score=0.3))


def test_a_missing_id_is_named_with_the_row_count():
    text = problems_of(valid().iloc[[0, 1, 3]])
    assert "3 rows; sample_submission.csv has 4" in text
    assert "1 ImageId(s) of sample_submission.csv missing: 'img_10'" in text


def test_an_extra_row_is_rejected_whether_new_or_repeated():
    extra = pd.concat([valid(), pd.DataFrame({"ImageId": ["0009"], "answer": [1]})], ignore_index=True)
    text = problems_of(extra)
    assert "5 rows; sample_submission.csv has 4" in text and "not in sample_submission.csv: '0009'" in text
    repeated = pd.concat([valid(), valid().iloc[[1]]], ignore_index=True)
    assert "ImageIds listed more than once: '0002'" in problems_of(repeated)


@pytest.mark.parametrize("sample_ids, written_ids, hint", [
    (["a.png", "b.png"], ["a", "b"], "'a.png' there, 'a' here"),
    (["a", "b"], ["a.png", "b.png"], "'a' there, 'a.png' here"),
    (["dir/a.JPG", "b.jpg"], ["dir/a", "b"], "'dir/a.JPG' there, 'dir/a' here"),
])
def test_ids_must_keep_or_drop_the_extension_exactly_as_the_sample_does(sample_ids, written_ids, hint):
    assert submission_problems(pd.DataFrame({"ImageId": sample_ids, "answer": [0, 1]}), sample_ids) == []
    text = problems_of(pd.DataFrame({"ImageId": written_ids, "answer": [0, 1]}), sample_ids)
    assert "ImageIds must be written exactly as in sample_submission.csv" in text and hint in text


def test_id_that_only_looks_like_an_extension_is_not_stripped():
    # "img.002" is a name, not a file extension: no hint that it differs only by extension
    text = problems_of(pd.DataFrame({"ImageId": ["img"], "answer": [0]}), ["img.002"])
    assert "missing: 'img.002'" in text and "extension" not in text


@pytest.mark.parametrize("bad", ["2", "0.5", "1.0", "", "yes", "True"])
def test_answers_must_be_0_or_1(bad):
    frame = valid().astype({"answer": str})
    frame.loc[2, "answer"] = bad
    assert f"answer must be 0 or 1; found {bad!r} in row 3" in problems_of(frame)


def test_our_files_keep_the_sample_order_but_a_grader_accepts_any():
    shuffled = valid().iloc[[1, 0, 2, 3]]
    assert "rows are not in sample_submission.csv order: row 1 is '0002', expected '0007'" in problems_of(shuffled)
    assert problems_of(shuffled, in_order=False) == ""


def test_validate_lists_every_problem_at_once():
    frame = pd.DataFrame({"ImageId": ["0007", "x"], "answer": [3, 0]})
    with pytest.raises(SubmissionError) as info:
        validate_submission(frame, IDS, source="mine.csv")
    message = str(info.value)
    assert message.startswith("mine.csv is not a valid submission")
    assert "2 rows" in message and "'x'" in message and "'3' in row 1" in message


def test_build_submission_follows_the_sample_order_and_needs_every_prediction():
    answers = pd.Series({"NA": 1, "img_10": 0, "0002": 1, "0007": 0, "unused": 1})
    built = build_submission(IDS, answers)
    assert built["ImageId"].tolist() == IDS and built["answer"].tolist() == [0, 1, 0, 1]
    with pytest.raises(SubmissionError, match="no prediction for 1 test image.*'NA'"):
        build_submission(IDS, answers.drop("NA"))


def test_write_submission_writes_both_files_and_the_record(tmp_path):
    paths = write_submission(valid(), IDS, tmp_path, "exp1", {"threshold": 0.5, "models": ["a"]})
    assert paths["experiment"] == tmp_path / "exp1.csv" and paths["submission"] == tmp_path / "submission.csv"
    text = (tmp_path / "submission.csv").read_text()
    assert text == "ImageId,answer\n0007,0\n0002,1\nimg_10,1\nNA,0\n"
    assert (tmp_path / "exp1.csv").read_text() == text
    assert '"threshold": 0.5' in (tmp_path / "exp1.json").read_text()


def test_a_rejected_submission_leaves_existing_files_untouched_and_no_temp_files(tmp_path):
    write_submission(valid(), IDS, tmp_path, "exp1", {"run": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = valid().iloc[:3]
    with pytest.raises(SubmissionError, match="missing: 'NA'"):
        write_submission(broken, IDS, tmp_path, "exp1", {"run": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_float_answers_are_rejected_before_anything_is_written(tmp_path):
    # a caller that forgot to cast would write "1.0", which a grader rejects
    frame = valid().astype({"answer": float})
    with pytest.raises(SubmissionError, match="'1.0' in row 2"):
        write_submission(frame, IDS, tmp_path, "exp1", {})
    assert list(tmp_path.iterdir()) == []
