"""Submission writer (renormalise, fall back, never NaN, atomic) and validator (rejects every bad kind)."""

from __future__ import annotations

import os
import stat

import numpy as np
import polars as pl
import pytest

import kaggle_utils.core.fileio as fileio
from kaggle_utils.core.errors import SubmissionError
from kaggle_utils.data.submission import (
    SUBMISSION_COLUMNS,
    read_test_ids,
    validate_submission,
    write_submission,
)

TEST_IDS = [136060, 211333, 1233961, 5001, 5002]


@pytest.fixture
def test_csv(tmp_path):
    """A test file in competition format, with a multi-line quoted field to make the id read non-trivial."""
    path = tmp_path / "test.csv"
    pl.DataFrame(
        {
            "id": TEST_IDS,
            "prompt": ['["hi"]', '["a, \\"quoted\\"\nline"]', '["x"]', "[null]", "[]"],
            "response_a": ['["a"]'] * 5,
            "response_b": ['["b"]'] * 5,
        }
    ).write_csv(path)
    return path


def good_probs(n: int = len(TEST_IDS), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet([1, 1, 1], size=n)


def write_raw(path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def valid_rows() -> list[str]:
    return [f"{i},0.5,0.3,0.2" for i in TEST_IDS]


HEADER = ",".join(SUBMISSION_COLUMNS)


def test_writer_output_validates_and_round_trips(tmp_path, test_csv):
    path = tmp_path / "out" / "submission.csv"
    probs = good_probs()
    report = write_submission(TEST_IDS, probs, path, expected_ids=TEST_IDS)
    assert report.rows == 5 and report.fallback_rows == 0 and report.renormalised_rows == 0
    table = pl.read_csv(path)
    assert table.columns == list(SUBMISSION_COLUMNS)
    assert table["id"].to_list() == TEST_IDS
    np.testing.assert_allclose(table.select(SUBMISSION_COLUMNS[1:]).to_numpy(), probs, rtol=1e-15)
    assert validate_submission(path, test_csv).rows == 5


def test_writer_renormalises_and_replaces_unusable_rows_counting_them(tmp_path, test_csv):
    probs = np.array(
        [
            [2.0, 1.0, 1.0],  # sums to 4: renormalised
            [np.nan, 0.5, 0.5],  # NaN: fallback
            [0.0, 0.0, 0.0],  # all zero: fallback
            [0.2, -0.1, 0.9],  # negative: fallback
            [np.inf, 0.1, 0.1],  # infinite: fallback
        ]
    )
    path = tmp_path / "submission.csv"
    prior = np.array([0.35, 0.34, 0.31])
    report = write_submission(TEST_IDS, probs, path, expected_ids=TEST_IDS, fallback_prior=prior)
    assert report.renormalised_rows == 1
    assert report.fallback_rows == 4
    assert report.fallback_ids == TEST_IDS[1:]
    assert "class prior" in report.fallback and "replaced" in report.summary()
    written = pl.read_csv(path).select(SUBMISSION_COLUMNS[1:]).to_numpy()
    assert np.all(np.isfinite(written))
    np.testing.assert_allclose(written.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(written[0], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(written[1:], np.tile(prior, (4, 1)))
    validate_submission(path, test_csv)

    uniform = write_submission(TEST_IDS, probs, path)
    assert uniform.fallback == "uniform distribution"
    np.testing.assert_allclose(pl.read_csv(path).row(2)[1:], [1 / 3] * 3)


def test_writer_refuses_wrong_or_duplicate_ids_and_bad_shapes(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=r"1 test ids missing \(5002\)"):
        write_submission(TEST_IDS[:4], good_probs(4), path, expected_ids=TEST_IDS)
    with pytest.raises(SubmissionError, match=r"ids not in the test file \(999 \(line 6\)\)"):
        write_submission([*TEST_IDS[:4], 999], good_probs(), path, expected_ids=TEST_IDS)
    with pytest.raises(SubmissionError, match="duplicate ids"):
        write_submission([*TEST_IDS[:4], TEST_IDS[0]], good_probs(), path)
    with pytest.raises(SubmissionError, match="shape"):
        write_submission(TEST_IDS, good_probs()[:, :2], path)
    assert not path.exists()


def test_string_ids_are_written_unchanged(tmp_path):
    path = tmp_path / "submission.csv"
    ids = ["a1", "b,2", "c 3"]
    write_submission(ids, good_probs(3), path, expected_ids=ids)
    assert pl.read_csv(path, infer_schema=False)["id"].to_list() == ids


def test_atomic_write_leaves_old_file_intact_when_the_write_crashes(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    write_submission(TEST_IDS, good_probs(seed=1), path)
    before = path.read_bytes()
    seen_during_write = {}

    def crash_after_data_is_written(fd):
        # the new content is in the temp file now; the real path must still hold the old file
        seen_during_write["target"] = path.read_bytes()
        seen_during_write["temps"] = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(fileio.os, "fsync", crash_after_data_is_written)
    with pytest.raises(OSError, match="simulated crash"):
        write_submission(TEST_IDS, good_probs(seed=2), path)
    assert seen_during_write["target"] == before
    assert len(seen_during_write["temps"]) == 1  # it did write to a temp file beside the target
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_atomic_write_cleans_up_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"

    def failing_replace(src, dst):
        raise KeyboardInterrupt  # e.g. the kernel interrupted at the last moment

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        write_submission(TEST_IDS, good_probs(), path)
    assert list(tmp_path.iterdir()) == []  # no submission.csv at all, and no stray temp file


def test_partial_bytes_never_reach_the_target(tmp_path, monkeypatch):
    """A crash after half of the bytes were written (mid-`write`) leaves no file at the target."""
    path = tmp_path / "submission.csv"
    real_named_temporary_file = fileio.tempfile.NamedTemporaryFile

    class HalfWriter:
        def __init__(self, handle):
            self._handle = handle
            self.name = handle.name

        def write(self, data):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            raise OSError("disk full")

        def __getattr__(self, attribute):
            return getattr(self._handle, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    monkeypatch.setattr(
        fileio.tempfile, "NamedTemporaryFile", lambda **kw: HalfWriter(real_named_temporary_file(**kw))
    )
    with pytest.raises(OSError, match="disk full"):
        write_submission(TEST_IDS, good_probs(), path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- validator
BAD_SUBMISSIONS = {
    "missing id": (HEADER, valid_rows()[:-1], r"1 test ids missing \(5002\)"),
    "extra id": (HEADER, [*valid_rows(), "77,0.5,0.3,0.2"], r"ids not in the test file \(77 \(line 7\)\)"),
    "wrong id": (
        HEADER,
        [*valid_rows()[:-1], "5003,0.5,0.3,0.2"],
        r"missing \(5002\).*not in the test file \(5003 \(line 6\)\)",
    ),
    "duplicate id": (HEADER, [*valid_rows(), valid_rows()[0]], r"duplicate ids: 136060 \(lines 2, 7\)"),
    "missing column": (
        "id,winner_model_a,winner_model_b",
        [f"{i},0.5,0.5" for i in TEST_IDS],
        r"missing columns \['winner_tie'\]",
    ),
    "extra column": (HEADER + ",extra", [r + ",1" for r in valid_rows()], r"extra columns \['extra'\]"),
    "wrong order": ("id,winner_model_b,winner_model_a,winner_tie", valid_rows(), "wrong order"),
    "renamed column": (
        "id,winner_a,winner_model_b,winner_tie",
        valid_rows(),
        r"missing columns \['winner_model_a'\]",
    ),
    "NaN": (HEADER, [*valid_rows()[:-1], "5002,NaN,0.5,0.5"], r"NaN or infinite probabilities \(ids 5002\)"),
    "inf": (HEADER, [*valid_rows()[:-1], "5002,inf,0.5,0.5"], r"NaN or infinite probabilities \(ids 5002\)"),
    "negative": (HEADER, [*valid_rows()[:-1], "5002,-0.1,0.6,0.5"], r"negative probabilities \(ids 5002\)"),
    "above one": (
        HEADER,
        [*valid_rows()[:-1], "5002,1.5,-0.25,-0.25"],
        r"probabilities above 1 \(ids 5002\)",
    ),
    "not summing to one": (
        HEADER,
        [*valid_rows()[:-1], "5002,0.5,0.5,0.5"],
        r"not summing to 1.*\(ids 5002\)",
    ),
    "unparsable number": (
        HEADER,
        [*valid_rows()[:-1], "5002,abc,0.5,0.5"],
        r"unparsable or empty values abc \(ids 5002\)",
    ),
    "empty value": (
        HEADER,
        [*valid_rows()[:-1], "5002,,0.5,0.5"],
        r"'winner_model_a' has unparsable or empty",
    ),
    "header only": (HEADER, [], "no rows"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SUBMISSIONS))
def test_validator_rejects_each_bad_kind_naming_file_and_ids(kind, tmp_path, test_csv):
    header, rows, message = BAD_SUBMISSIONS[kind]
    path = tmp_path / "submission.csv"
    write_raw(path, header, rows)
    with pytest.raises(SubmissionError, match=message) as caught:
        validate_submission(path, test_csv)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)  # one line for the CLI


def test_validator_accepts_a_valid_file_and_tolerates_tiny_rounding(tmp_path, test_csv):
    path = tmp_path / "submission.csv"
    write_raw(path, HEADER, [*valid_rows()[:-1], "5002,0.3333333,0.3333333,0.3333334"])
    assert validate_submission(path, test_csv).rows == 5
    write_raw(path, HEADER, [*valid_rows()[:-1], "5002,0.33333,0.33333,0.33333"])  # off by 1e-5
    with pytest.raises(SubmissionError, match=r"not summing to 1 \(tolerance 1e-06\)"):
        validate_submission(path, test_csv)


def test_validator_lists_several_problems_in_one_message(tmp_path, test_csv):
    path = tmp_path / "submission.csv"
    write_raw(path, HEADER, [*valid_rows()[:3], "5001,NaN,0.5,0.5", "5002,0.9,0.9,0.9"])
    with pytest.raises(SubmissionError) as caught:
        validate_submission(path, test_csv)
    message = str(caught.value)
    assert "NaN" in message and "not summing" in message


def test_validator_reports_missing_and_unreadable_files(tmp_path, test_csv):
    with pytest.raises(SubmissionError, match="not found"):
        validate_submission(tmp_path / "absent.csv", test_csv)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SubmissionError, match="empty.csv"):
        validate_submission(empty, test_csv)
    path = tmp_path / "submission.csv"
    write_raw(path, HEADER, valid_rows())
    with pytest.raises(SubmissionError, match="test file not found"):
        validate_submission(path, tmp_path / "no_test.csv")


def test_read_test_ids_handles_quoted_multiline_fields_and_parquet(tmp_path, test_csv):
    assert read_test_ids(test_csv).to_list() == [str(i) for i in TEST_IDS]
    parquet = tmp_path / "test.parquet"
    pl.read_csv(test_csv).write_parquet(parquet)
    assert read_test_ids(parquet).to_list() == [str(i) for i in TEST_IDS]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        written = fileio.atomic_write_bytes(tmp_path / "new.csv", b"x")
        with open(tmp_path / "plain.csv", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.csv").stat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    os.chmod(written, 0o640)  # an existing file keeps its mode, as with open(path, "wb")
    fileio.atomic_write_bytes(written, b"y")
    assert stat.S_IMODE(written.stat().st_mode) == 0o640


def test_non_regular_targets_are_refused_and_left_alone(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("keep")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    for path, kind in ((link, "symlink"), (fifo, "not a regular file"), (folder, "folder")):
        with pytest.raises(fileio.WriteError, match=kind):
            write_submission(TEST_IDS, good_probs(), path)
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()
    assert target.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.csv", "folder.csv", "link.csv", "real.csv"]


def test_unwritable_outputs_are_one_line_usage_errors(tmp_path):
    from kaggle_utils.core.errors import UsageError

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"cannot write .*file.txt/sub.csv"):
        write_submission(TEST_IDS, good_probs(), blocker / "sub.csv")
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="cannot write .*locked"):
            write_submission(TEST_IDS, good_probs(), locked / "sub.csv")


def test_disk_full_is_one_line_naming_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "submission.csv"
    write_submission(TEST_IDS, good_probs(seed=1), path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(
        fileio.WriteError,
        match=rf"^cannot write {path}: No space left on device \(the previous "
        r"file is intact\)$",
    ):
        write_submission(TEST_IDS, good_probs(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]
