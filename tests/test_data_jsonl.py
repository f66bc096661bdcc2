"""JSON Lines reading (errors name file and line) and atomic writing."""
from __future__ import annotations

import pytest

from promptlab.data import read_jsonl, write_jsonl
from promptlab.errors import DataError


def test_round_trip_keeps_unicode_and_newlines(tmp_path):
    records = [{"taskname": "sentiment", "sentence": "Café ☕", "label": "positive"},
               {"taskname": "intent_and_slot", "utterance": "x", "label": "Intent: a\nSlots: None"}]
    path = tmp_path / "out" / "train.jsonl"
    assert write_jsonl(path, records) == 2
    assert read_jsonl(path) == records
    assert path.read_text(encoding="utf-8").count("\n") == 2  # one line per record


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("bad, problem", [
    ('{"a": 1', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
    ('"text"', "expected a JSON object, found str"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n' + bad + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"{path}:3:" in str(info.value) and problem in str(info.value)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8"):
        read_jsonl(path)
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_write_is_atomic(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(DataError, match="record 1 cannot be written as JSON"):  # the old file survives
        write_jsonl(path, [{"a": 2}, {"b": object()}])
    assert read_jsonl(path) == [{"a": 1}]
    with pytest.raises(DataError, match="record 1 is a list"):
        write_jsonl(path, [{"a": 2}, [1]])
    assert read_jsonl(path) == [{"a": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]  # no temporary file left
