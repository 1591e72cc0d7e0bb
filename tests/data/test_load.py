"""kaggle_utils.data.load: every trap of the real files parsed, repaired and counted, or dropped."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaggle_utils.core.config import LABEL_COLUMNS, DataConfig
from kaggle_utils.core.errors import DataError
from kaggle_utils.data.cells import parse_turn_list
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.repairs import (
    BARE_STRING,
    BOTH_RESPONSES_EMPTY,
    EMPTY_LIST,
    EMPTY_PROMPT,
    FALLBACK_PARSED,
    IDENTICAL_NON_TIE,
    INVALID_UTF8,
    LONE_SURROGATE,
    NON_STRING_TURN,
    NUL_CHARACTER,
    NULL_CELL,
    NULL_TURN,
    TURN_COUNT_MISMATCH,
    UNPARSEABLE_KEPT,
    DataReport,
)

TRAIN_HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b", *LABEL_COLUMNS]
ONE_HOT = {0: (1, 0, 0), 1: (0, 1, 0), 2: (0, 0, 1)}


def write_train(path: Path, rows: list[tuple]) -> Path:
    """rows: (id, prompt_cell, response_a_cell, response_b_cell, label) with cells as raw text (or None)."""
    frame = pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "model_a": ["m1"] * len(rows),
            "model_b": ["m2"] * len(rows),
            "prompt": [r[1] for r in rows],
            "response_a": [r[2] for r in rows],
            "response_b": [r[3] for r in rows],
            **{c: [ONE_HOT[r[4]][k] for r in rows] for k, c in enumerate(LABEL_COLUMNS)},
        },
        schema={
            "id": pl.Int64,
            "model_a": pl.String,
            "model_b": pl.String,
            "prompt": pl.String,
            "response_a": pl.String,
            "response_b": pl.String,
            **dict.fromkeys(LABEL_COLUMNS, pl.Int64),
        },
    )
    frame.write_csv(path)
    return path


def write_test(path: Path, rows: list[tuple]) -> Path:
    pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "response_a": [r[2] for r in rows],
            "response_b": [r[3] for r in rows],
        },
        schema={"id": pl.Int64, "prompt": pl.String, "response_a": pl.String, "response_b": pl.String},
    ).write_csv(path)
    return path


def all_strings(frame: pl.DataFrame) -> list[str]:
    return [
        turn for c in ("prompt", "response_a", "response_b") for turns in frame[c].to_list() for turn in turns
    ]


def assert_contract(frame: pl.DataFrame) -> None:
    """The representation every later stage relies on (docs/ARCHITECTURE.md)."""
    for column in ("prompt", "response_a", "response_b"):
        assert frame.schema[column] == pl.List(pl.String)
        assert frame[column].null_count() == 0
    lengths = frame.select(pl.col("prompt", "response_a", "response_b").list.len())
    assert (lengths["prompt"] >= 1).all()
    assert (lengths["prompt"] == lengths["response_a"]).all()
    assert (lengths["prompt"] == lengths["response_b"]).all()
    assert frame.schema["label"] == pl.Int8
    for text in all_strings(frame):
        assert text is not None
        text.encode("utf-8")  # raises on a lone surrogate
        assert "\x00" not in text


# ------------------------------------------------------------------------------------------ parse_turn_list
@pytest.mark.parametrize(
    ("raw", "turns", "repairs"),
    [
        ('["hello", "world"]', ["hello", "world"], []),
        ('["He said \\"hi\\", then\\nleft, ok"]', ['He said "hi", then\nleft, ok'], []),
        ('["\\ud83d\\ude0a smile"]', ["\U0001f60a smile"], []),
        ("[null]", [""], [NULL_TURN]),
        ('["first", null]', ["first", ""], [NULL_TURN]),
        ("[]", [""], [EMPTY_LIST]),
        ("null", [""], [NULL_CELL]),
        ("", [""], [NULL_CELL]),
        (None, [""], [NULL_CELL]),
        ('[""]', [""], []),
        ('["a \\ud83d b"]', ["a \ufffd b"], [LONE_SURROGATE]),
        ('["\\ude0a first"]', ["\ufffd first"], [LONE_SURROGATE]),
        ('["x\\u0000y"]', ["xy"], [NUL_CHARACTER]),
        ('[1, {"k": 2}]', ["1", '{"k": 2}'], [NON_STRING_TURN]),
        ('"just a string"', ["just a string"], [BARE_STRING]),
        ("['Hello', \"it's\", None]", ["Hello", "it's", ""], [FALLBACK_PARSED, NULL_TURN]),
        ("['it\\'s \\ud83d fine']", ["it's \ufffd fine"], [FALLBACK_PARSED, LONE_SURROGATE]),
        ('["Once upon a time, the', ["Once upon a time, the"], [FALLBACK_PARSED]),
        ('["one", "two", ', ["one", "two"], [FALLBACK_PARSED]),
        (
            '["He said "yes", then left.", "second"]',
            ['He said "yes", then left.', "second"],
            [FALLBACK_PARSED],
        ),
        ('["quote at end "x""]', ['quote at end "x"'], [FALLBACK_PARSED]),
        ("plain unquoted text", ["plain unquoted text"], [FALLBACK_PARSED, BARE_STRING]),
        ('["pair \\ud83d\\ude0a split', ["pair \U0001f60a split"], [FALLBACK_PARSED]),
    ],
)
def test_parse_turn_list_repairs(raw, turns, repairs):
    parsed = parse_turn_list(raw)
    assert parsed.error is None
    assert parsed.turns == turns
    assert sorted(parsed.repairs) == sorted(repairs)
    for turn in parsed.turns:
        turn.encode("utf-8")


@pytest.mark.parametrize("raw", ["[Hello there, how are you?]", '{"role": "user"}', "[[nested], 1]"])
def test_parse_turn_list_unrecoverable_gives_error(raw):
    parsed = parse_turn_list(raw)
    assert parsed.turns is None
    assert parsed.error


# ----------------------------------------------------------------------------------------- CSV round trip
_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),  # no surrogates, no NUL
    max_size=40,
) | st.sampled_from(['"', '""', ",", "\n", "\r\n", "\\", '\\"', "[", "]", '", "', "null", "\t", "😊", ""])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(
        st.lists(_TEXT, min_size=1, max_size=4).map(lambda parts: "".join(parts)), min_size=1, max_size=3
    )
)
def test_csv_round_trip_of_any_text(tmp_path, turns):
    """Quotes, newlines, commas, backslashes, brackets, non-ASCII: written as Kaggle did, read back equal."""
    long_turn = ('x, "y"\n' * 5000)[:30_000]
    cells = [json.dumps(turns, ensure_ascii=False), json.dumps(turns), json.dumps([long_turn] * len(turns))]
    path = write_train(tmp_path / "train.csv", [(7, *cells, 1), (3, *cells, 0)])
    loaded = load_competition(path)
    assert loaded.frame["prompt"].to_list() == [turns, turns]
    assert loaded.frame["response_a"].to_list() == [turns, turns]
    assert loaded.frame["response_b"].to_list()[0] == [long_turn] * len(turns)
    assert loaded.frame["id"].to_list() == [7, 3]  # file order, ids as in the file
    assert loaded.report.repairs == {}
    assert loaded.report.rows_kept == 2


# ------------------------------------------------------------------------------------------ trap handling
TRAP_ROWS = [
    (1, '["hi"]', '["A answer"]', '["B answer"]', 0),
    (2, '["hi"]', "[null]", '["B"]', 1),
    (3, '["hi"]', "[null]", "[null]", 2),
    (4, '["hi"]', "[]", '["B"]', 0),
    (5, '[""]', '["A"]', '["B"]', 1),
    (6, '["hi"]', '[""]', '[""]', 2),
    (7, '["hi"]', '["bad \\ud83d emoji"]', '["B"]', 0),
    (8, '["hi"]', '["nul\\u0000char"]', '["B"]', 1),
    (9, '["q1", "q2"]', '["a1"]', '["b1", "b2", "b3"]', 2),
    (10, "['python', \"it's\"]", '["a1", "a2"]', '["b1", "b2"]', 0),
    (11, '["hi"]', '["truncated resp', '["B"]', 1),
    (12, '["hi"]', '["same"]', '["same"]', 0),
    (13, '["hi"]', '["A"]', "[not, parseable]", 1),
    (14, '["hi"]', None, '["B"]', 2),
    (15, '["hi"]', '"bare"', '["B"]', 0),
    (16, '["hi"]', '["A"]', "{broken json", 1),
]


def test_every_trap_repaired_counted_or_dropped(tmp_path):
    path = write_train(tmp_path / "train.csv", TRAP_ROWS)
    loaded = load_competition(path, split="train")
    frame, report = loaded.frame, loaded.report
    assert_contract(frame)
    by_id = {row["id"]: row for row in frame.iter_rows(named=True)}

    expected = {
        NULL_TURN: [2, 3],
        EMPTY_LIST: [4],
        LONE_SURROGATE: [7],
        NUL_CHARACTER: [8],
        TURN_COUNT_MISMATCH: [9],
        FALLBACK_PARSED: [10, 11],
        NULL_CELL: [14],
        BARE_STRING: [15],
    }
    for kind, ids in expected.items():
        assert report.repair_examples[kind] == ids, kind
    assert report.repairs[NULL_TURN] == 3  # per field: row 3 has two
    assert report.observation_examples[EMPTY_PROMPT] == [5]
    assert report.observation_examples[BOTH_RESPONSES_EMPTY] == [3, 6]
    assert report.observation_examples[IDENTICAL_NON_TIE] == [12]  # rows 3 and 6 are ties
    assert report.dropped == {"unparseable response_b": [13, 16]}
    assert report.rows_read == 16 and report.rows_kept == 14 and report.rows_dropped == 2
    assert all("13" in w or "16" in w for w in report.warnings)

    assert by_id[2]["response_a"] == [""]
    assert by_id[4]["response_a"] == [""]
    assert by_id[7]["response_a"] == ["bad \ufffd emoji"]
    assert by_id[8]["response_a"] == ["nulchar"]
    assert by_id[9]["prompt"] == ["q1", "q2", ""]
    assert by_id[9]["response_a"] == ["a1", "", ""]
    assert by_id[9]["response_b"] == ["b1", "b2", "b3"]
    assert by_id[10]["prompt"] == ["python", "it's"]
    assert by_id[11]["response_a"] == ["truncated resp"]
    assert by_id[14]["response_a"] == [""]
    assert by_id[15]["response_a"] == ["bare"]
    assert [by_id[i]["label"] for i in (1, 2, 3)] == [0, 1, 2]
    assert 13 not in by_id and 16 not in by_id


def test_strict_raises_naming_file_column_and_ids(tmp_path):
    path = write_train(tmp_path / "train.csv", TRAP_ROWS)
    with pytest.raises(DataError) as info:
        load_competition(path, DataConfig(strict=True), split="train")
    message = str(info.value)
    assert "train.csv" in message and "response_b" in message and "13" in message and "16" in message


def test_test_split_never_drops(tmp_path):
    path = write_test(tmp_path / "test.csv", [r[:4] for r in TRAP_ROWS])
    loaded = load_competition(path)  # auto: no label columns -> test
    assert loaded.report.split == "test"
    assert loaded.frame["id"].to_list() == [r[0] for r in TRAP_ROWS]
    assert loaded.frame["label"].is_null().all()
    assert "model_a" not in loaded.frame.columns
    assert_contract(loaded.frame)
    assert loaded.report.dropped == {}
    assert loaded.report.repair_examples[UNPARSEABLE_KEPT] == [13, 16]
    row = loaded.frame.filter(pl.col("id") == 13).row(0, named=True)
    assert row["response_b"] == [""] and row["response_a"] == ["A"]
    # strict changes nothing on test: every id still needs a prediction
    strict = load_competition(path, DataConfig(strict=True), split="test")
    assert strict.frame.height == len(TRAP_ROWS)


def test_generated_files_parse_to_contract(sample_files, train_data):
    assert_contract(train_data.frame)
    test = load_competition(sample_files.test_csv, split="test")
    assert_contract(test.frame)
    raw_test_ids = pl.read_csv(sample_files.test_csv, columns=["id"])["id"].to_list()
    assert test.frame["id"].to_list() == raw_test_ids
    dropped = train_data.report.dropped_ids
    raw_train_ids = pl.read_csv(sample_files.train_csv, columns=["id"])["id"].to_list()
    assert train_data.frame["id"].to_list() == [i for i in raw_train_ids if i not in set(dropped)]
    assert train_data.report.rows_read == len(raw_train_ids)
    assert train_data.report.rows_kept + len(dropped) == len(raw_train_ids)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_columns_error_names_file_and_columns(tmp_path):
    path = tmp_path / "train.csv"
    pl.DataFrame({"id": [1], "prompt": ['["p"]'], "response_a": ['["a"]'], "winner_model_a": [1]}).write_csv(
        path
    )
    with pytest.raises(DataError) as info:
        load_competition(path)
    message = str(info.value)
    assert "train.csv" in message and "response_b" in message and "winner_tie" in message
    with pytest.raises(DataError, match="response_b"):
        load_competition(path, split="test")


def test_duplicate_ids_error_names_ids(tmp_path):
    rows = [
        (5, '["p"]', '["a"]', '["b"]', 0),
        (9, '["p"]', '["a"]', '["b"]', 1),
        (5, '["q"]', '["a"]', '["b"]', 2),
    ]
    path = write_train(tmp_path / "dup.csv", rows)
    with pytest.raises(DataError) as info:
        load_competition(path)
    message = str(info.value)
    assert "dup.csv" in message and "'id'" in message and "[5]" in message


@pytest.mark.parametrize(
    "labels",
    [
        ["1", "1", "0"],  # sum 2
        ["0", "0", "0"],  # sum 0
        ["2", "0", "0"],  # not 0/1
        ["", "1", "0"],  # missing value
        ["yes", "0", "0"],  # not a number
        ["0.5", "0.5", "0"],  # soft label
    ],
)
def test_non_one_hot_labels_error_names_columns_and_ids(tmp_path, labels):
    path = tmp_path / "train.csv"
    good = ["0", "1", "0"]
    pl.DataFrame(
        {
            "id": ["10", "11", "12"],
            "prompt": ['["p"]'] * 3,
            "response_a": ['["a"]'] * 3,
            "response_b": ['["b"]'] * 3,
            **{c: [good[k], labels[k], good[k]] for k, c in enumerate(LABEL_COLUMNS)},
        }
    ).write_csv(path)
    with pytest.raises(DataError) as info:
        load_competition(path)
    message = str(info.value)
    assert "train.csv" in message and "winner_model_a" in message and "id 11" in message
    assert "id 10" not in message and "id 12" not in message


def test_float_one_hot_labels_are_accepted(tmp_path):
    path = tmp_path / "train.csv"
    pl.DataFrame(
        {
            "id": [1, 2],
            "prompt": ['["p"]'] * 2,
            "response_a": ['["a"]'] * 2,
            "response_b": ['["b"]'] * 2,
            "winner_model_a": ["1.0", "0.0"],
            "winner_model_b": ["0.0", "0.0"],
            "winner_tie": ["0.0", "1.0"],
        }
    ).write_csv(path)
    assert load_competition(path).frame["label"].to_list() == [0, 2]


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b'id,prompt,response_a,response_b\n1,"["broken\n2,x', "cannot read")],
)
def test_unreadable_file_raises_data_error(tmp_path, content, reason):
    path = tmp_path / "test.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_competition(path)
    assert "test.csv" in str(info.value) and reason in str(info.value)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_competition(tmp_path / "nope.csv")
    path = write_test(tmp_path / "test.csv", [(1, '["p"]', '["a"]', '["b"]')])
    with pytest.raises(DataError, match="split"):
        load_competition(path, split="valid")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="format"):
        load_competition(path, DataConfig(format="csv"))  # type: ignore[arg-type]


def test_empty_id_is_an_error(tmp_path):
    path = write_test(tmp_path / "test.csv", [(1, '["p"]', '["a"]', '["b"]')])
    path.write_text(path.read_text() + ',["p"],["a"],["b"]\n')
    with pytest.raises(DataError, match="'id' is empty"):
        load_competition(path)


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "test.csv"
    path.write_bytes(b'id,prompt,response_a,response_b\n1,"[""ok""]","[""caf\xe9""]","[""b""]"\n')
    loaded = load_competition(path)
    assert loaded.frame["response_a"].to_list() == [["caf\ufffd"]]
    assert loaded.report.repair_examples[INVALID_UTF8] == [1]
    assert any("UTF-8" in w for w in loaded.report.warnings)


def test_string_ids_are_kept_as_strings(tmp_path):
    path = tmp_path / "test.csv"
    pl.DataFrame({"id": ["a1", "b2"], "prompt": ['["p"]'] * 2, "response_a": ['["a"]'] * 2,
                  "response_b": ['["b"]'] * 2}).write_csv(path)  # fmt: skip
    loaded = load_competition(path)
    assert loaded.frame["id"].to_list() == ["a1", "b2"]
    assert any("ids kept as strings" in w for w in loaded.report.warnings)
    path.write_text('id,prompt,response_a,response_b\n007,["p"],["a"],["b"]\n12,["p"],["a"],["b"]\n')
    assert load_competition(path).frame["id"].to_list() == ["007", "12"]  # leading zeros survive


@pytest.mark.parametrize("split", ["train", "test", "auto"])
def test_header_only_file_is_an_error(tmp_path, split):
    path = tmp_path / "train.csv"
    path.write_text(",".join(TRAIN_HEADER) + "\n")
    with pytest.raises(DataError, match=r"train\.csv: no data rows \(only a header\)"):
        load_competition(path, split=split)


def test_train_file_with_every_row_dropped_is_an_error(tmp_path):
    path = write_train(tmp_path / "train.csv", [(1, '["p"]', "[unquoted, items]", '["b"]', 0)])
    with pytest.raises(
        DataError, match=r"train\.csv: all 1 data rows were dropped \(unparseable response_a: 1\)"
    ):
        load_competition(path, split="train")
    # the same row on test is kept (with empty text), so the file is usable there
    assert load_competition(path, split="test").frame.height == 1


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("blank", ['""', "   ", '"  "'])
def test_empty_string_id_is_an_error_naming_file_row_and_field(tmp_path, split, blank):
    path = tmp_path / "data.csv"
    header = ",".join(TRAIN_HEADER)
    row = 'm1,m2,["p"],["a"],["b"],1,0,0'
    path.write_text(f"{header}\n7,{row}\n{blank},{row}\n")
    with pytest.raises(
        DataError, match=r"data\.csv: column 'id' is an empty string in 1 row\(s\) \(data rows \[2\]\)"
    ):
        load_competition(path, split=split)


def test_empty_string_id_in_parquet_is_an_error(tmp_path):
    path = tmp_path / "test.parquet"
    pl.DataFrame(
        {"id": ["a", ""], "prompt": ["p"] * 2, "response_a": ["a"] * 2, "response_b": ["b"] * 2}
    ).write_parquet(path)
    with pytest.raises(DataError, match=r"test\.parquet: column 'id' is an empty string .*data rows \[2\]"):
        load_competition(path, DataConfig(format="wsdm"))


def test_directory_is_reported_as_a_directory(tmp_path):
    folder = tmp_path / "train.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=r"train\.csv: is a directory") as info:
        load_competition(folder)
    assert "not found" not in str(info.value)


# ------------------------------------------------------------------------------------------------- WSDM
def test_wsdm_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pl.DataFrame(
        {
            "id": ["c0a1", "c0a2", "c0a3"],
            "prompt": ["Bonjour ?", None, "¿Qué tal?"],
            "response_a": ["Salut, ça va.", "x\x00y", "Bien, ¿y tú?"],
            "response_b": ["Hello", "ok", ""],
            "winner": ["model_a", "model_b", "model_a"],
            "model_a": ["m1", "m2", "m3"],
            "model_b": ["m4", "m5", "m6"],
            "language": ["French", "English", "Spanish"],
        }
    ).write_parquet(path)
    loaded = load_competition(path, DataConfig(format="wsdm"))
    frame = loaded.frame
    assert loaded.report.split == "train" and loaded.report.format == "wsdm"
    assert_contract(frame)
    assert frame["id"].dtype == pl.String and frame["id"].to_list() == ["c0a1", "c0a2", "c0a3"]
    assert frame["prompt"].to_list() == [["Bonjour ?"], [""], ["¿Qué tal?"]]
    assert frame["response_a"].to_list() == [["Salut, ça va."], ["xy"], ["Bien, ¿y tú?"]]
    assert frame["label"].to_list() == [0, 1, 0]
    assert frame["language"].to_list() == ["French", "English", "Spanish"]
    assert loaded.report.repair_examples == {NULL_CELL: ["c0a2"], NUL_CHARACTER: ["c0a2"]}

    test_path = tmp_path / "test.parquet"
    pl.DataFrame({"id": ["t1"], "prompt": ["p"], "response_a": ["a"], "response_b": ["b"]}).write_parquet(
        test_path
    )
    test = load_competition(test_path, DataConfig(format="wsdm"))
    assert test.report.split == "test" and test.frame["label"].is_null().all()


def test_wsdm_bad_winner_names_ids(tmp_path):
    path = tmp_path / "train.parquet"
    pl.DataFrame(
        {"id": ["a", "b"], "prompt": ["p", "p"], "response_a": ["x", "y"], "response_b": ["x", "y"],
         "winner": ["model_a", "tie"]}
    ).write_parquet(path)  # fmt: skip
    with pytest.raises(DataError) as info:
        load_competition(path, DataConfig(format="wsdm"))
    assert "train.parquet" in str(info.value) and "winner" in str(info.value) and "'b'" in str(info.value)


# ----------------------------------------------------------------------------------------------- report
def test_report_text_and_dict(tmp_path):
    path = write_train(tmp_path / "train.csv", TRAP_ROWS)
    report = load_competition(path).report
    text = report.to_text()
    assert "train.csv" in text and "16 rows read, 14 kept, 2 dropped" in text
    for kind in (NULL_TURN, LONE_SURROGATE, FALLBACK_PARSED, TURN_COUNT_MISMATCH, IDENTICAL_NON_TIE):
        assert kind in text
    assert "unparseable response_b" in text
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["repairs"][NULL_TURN] == {"count": 3, "example_ids": [2, 3]}
    assert as_dict["dropped"] == {"unparseable response_b": [13, 16]}
    assert as_dict["rows_dropped"] == 2


def test_report_keeps_at_most_ten_examples():
    report = DataReport(file="f", split="train", format="lmsys")
    for row_id in range(25):
        report.add_repair(NULL_TURN, row_id)
    assert report.repairs[NULL_TURN] == 25
    assert report.repair_examples[NULL_TURN] == list(range(10))
    assert "..." in report.to_text()
