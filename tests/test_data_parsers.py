"""The three raw-format parsers on the bundled samples and on malformed files (errors name file and line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptlab.data import assistant, financial_phrasebank, squad
from promptlab.data.download import SAMPLES_DIR
from promptlab.errors import ConfigError, DataError
from promptlab.metrics import parse_intent_slot

PHRASEBANK = SAMPLES_DIR / "financial_phrasebank"
NLU = SAMPLES_DIR / "nlu_evaluation_data" / "KFold_1"
HEADER = "answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user\n"


# -- sentiment -------------------------------------------------------------------------------------------


def test_sentiment_samples_parse():
    records = financial_phrasebank.parse_sentences(PHRASEBANK / "Sentences_AllAgree.txt")
    assert len(records) == 60
    assert {r["label"] for r in records} == {"positive", "neutral", "negative"}
    assert all(r["taskname"] == "sentiment" and set(r) == {"taskname", "sentence", "label"} for r in records)
    assert not any("\r" in r["sentence"] or r["sentence"].endswith("@") for r in records)
    # latin-1 text, and an '@' inside the sentence (the split is on the last '@')
    assert any("Björkman" in r["sentence"] for r in records)
    email = [r for r in records if "orders@norrvik.example" in r["sentence"]]
    assert len(email) == 1 and email[0]["label"] == "neutral"


@pytest.mark.parametrize("agreement, count", [("AllAgree", 60), ("75Agree", 66), ("66Agree", 70), ("50Agree", 74)])
def test_sentiment_agreement_levels(agreement, count):
    relpath = financial_phrasebank.relpath_for(agreement)
    assert len(financial_phrasebank.parse_sentences(SAMPLES_DIR / relpath)) == count


def test_sentiment_unknown_agreement():
    with pytest.raises(ConfigError, match="90Agree"):
        financial_phrasebank.relpath_for("90Agree")


def _write_latin1(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\r\n" for line in lines).encode("latin-1"))
    return path


@pytest.mark.parametrize("bad, problem", [
    ("A sentence without any label", "no '@'"),
    ("Profit rose .@happy", "unknown label 'happy'"),
    ("@positive", "empty sentence"),
])
def test_sentiment_malformed_line_names_file_and_line(tmp_path, bad, problem):
    path = _write_latin1(tmp_path / "Sentences_AllAgree.txt", ["Sales rose .@positive", "Costs fell .@positive", bad])
    with pytest.raises(DataError) as info:
        financial_phrasebank.parse_sentences(path)
    assert f"{path}:3:" in str(info.value) and problem in str(info.value)


def test_sentiment_line_ends_and_odd_bytes(tmp_path):
    # Byte 0x85 decodes to U+0085, which str.splitlines would take for a line break.
    path = tmp_path / "s.txt"
    path.write_bytes(b"Caf\xe9 sales \x85 rose .@positive\r\nNo change .@neutral")  # no final line end
    records = financial_phrasebank.parse_sentences(path)
    assert [r["label"] for r in records] == ["positive", "neutral"]
    assert records[0]["sentence"] == "Café sales \x85 rose ."


def test_sentiment_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="no sentences"):
        financial_phrasebank.parse_sentences(path)


# -- intent and slot -------------------------------------------------------------------------------------


def test_parse_annotation():
    slots = assistant.parse_annotation("wake me at [time : seven am] [date : tomorrow]")
    assert slots == [assistant.Slot("time", "seven am"), assistant.Slot("date", "tomorrow")]
    # adjacent spans of one type merge, as in NeMo's recipe
    assert assistant.parse_annotation("at [time : six] [time : thirty am]") == [assistant.Slot("time", "six thirty am")]
    # punctuation glued to a span is not part of it; separated same-type spans stay apart
    assert assistant.parse_annotation("send [person : erik], [person : ann] a note") == [
        assistant.Slot("person", "erik"), assistant.Slot("person", "ann")]
    assert assistant.parse_annotation("no slots here") == []


@pytest.mark.parametrize("annotation, problem", [
    ("set [time : six", "never closed"),
    ("set time : six]", "without a matching"),
    ("set [time : [date : six]]", "inside another span"),
    ("set [six am]", "not of the form"),
    ("set [time : ]", "not of the form"),
])
def test_parse_annotation_errors(annotation, problem):
    with pytest.raises(ValueError, match=problem):
        assistant.parse_annotation(annotation)


def test_format_label():
    slots = [assistant.Slot("time", "six am"), assistant.Slot("date", "tomorrow")]
    assert assistant.format_label("alarm_set", slots) == "Intent: alarm_set\nSlots: time(six am), date(tomorrow)"
    assert assistant.format_label("general_joke", []) == "Intent: general_joke\nSlots: None"


@pytest.mark.parametrize("utterance, label, marked", [
    ("wake me up at six am tomorrow", "Intent: alarm_set\nSlots: time(six am), date(tomorrow)",
     "Intent: alarm_set\nSlots: wake me up at [time : six am] [date : tomorrow]"),
    ("tell me a joke", "Intent: general_joke\nSlots: None", "Intent: general_joke\nSlots: tell me a joke"),
    # punctuation after a slot stays outside its mark; a slot that ends in a dot keeps it
    ("email robert, now", "Intent: email_sendemail\nSlots: person(robert)",
     "Intent: email_sendemail\nSlots: email [person : robert], now"),
    ("euro to u. s. d.", "Intent: qa_currency\nSlots: currency_name(euro), currency_name(u. s. d.)",
     "Intent: qa_currency\nSlots: [currency_name : euro] to [currency_name : u. s. d.]"),
    # the same words twice: slots are placed in order
    ("play it it", "Intent: play_music\nSlots: song_name(it), artist_name(it)",
     "Intent: play_music\nSlots: play [song_name : it] [artist_name : it]"),
])
def test_mark_slots(utterance, label, marked):
    record = {"taskname": "intent_and_slot", "utterance": utterance, "label": label}
    assert assistant.mark_slots(record)["label"] == marked
    first = assistant.mark_slots(record, slots_first=True)["label"]
    assert first == "\n".join(marked.split("\n")[::-1])
    # the metric reads the same intent and slots from every notation and order
    assert parse_intent_slot(marked) == parse_intent_slot(first) == parse_intent_slot(label)
    assert assistant.mark_slots(assistant.mark_slots(record)) == assistant.mark_slots(record)


def test_assign_slots():
    record = {"utterance": "is it raining in philadelphia, pa today", "label":
              "Intent: weather_query\nSlots: place_name(philadelphia, pa), date(today)"}
    listed = assistant.assign_slots(record)
    assert listed["label"] == "Intent: weather_query\nSlots: place_name = philadelphia, pa; date = today"
    assert listed["utterance"] == record["utterance"] and record["label"].endswith("date(today)")  # old one kept
    assert parse_intent_slot(listed["label"]) == parse_intent_slot(record["label"])
    named = assistant.assign_slots(record, words_first=True)
    assert named["label"] == "Intent: weather_query\nSlots: philadelphia, pa -> place_name; today -> date"
    assert parse_intent_slot(named["label"]) == parse_intent_slot(record["label"])
    for kept in ({"utterance": "stop", "label": "Intent: general_commandstop\nSlots: None"},
                 {"utterance": "x", "label": "Slots: date(today)"}):  # no slot to list; no intent
        assert assistant.assign_slots(kept) is kept and assistant.assign_slots(kept, words_first=True) is kept


def test_mark_slots_keeps_what_it_cannot_place():
    record = {"taskname": "intent_and_slot", "utterance": "wake me up", "label": "Intent: alarm_set\nSlots: time(six)"}
    assert assistant.mark_slots(record) is record
    headless = {**record, "label": "Slots: None"}
    assert assistant.mark_slots(headless) is headless


def test_intent_samples_parse():
    records = assistant.parse_intent_file(NLU / "trainset" / "alarm_set.csv")
    assert len(records) == 6
    assert records[0] == {
        "taskname": "intent_and_slot",
        "utterance": "wake me up at seven am tomorrow",
        "label": "Intent: alarm_set\nSlots: time(seven am), date(tomorrow)",
    }
    assert records[2]["label"] == "Intent: alarm_set\nSlots: None"
    assert assistant.intent_of(NLU / "testset" / "csv" / "iot_hue_lightoff.csv") == "iot_hue_lightoff"
    total = sum(len(assistant.parse_intent_file(p)) for p in (NLU / "trainset").glob("*.csv"))
    assert total == 40


def _write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


GOOD_ROW = '1;alarm;set;"wake me at [time : six]";"wake me at six";"Wake me at 6"'


@pytest.mark.parametrize("bad, problem", [
    ('3;alarm;set;"wake me at [time : six";"wake me at six";"x"', "never closed"),
    ('3;alarm;set;"wake me";"wake me"', "expected 6 ';'-separated fields, found 5"),
    ('3;alarm;set;"wake me";"  ";"x"', "empty answer_from_anno"),
])
def test_intent_malformed_row_names_file_and_line(tmp_path, bad, problem):
    path = _write_csv(tmp_path / "alarm_set.csv", [GOOD_ROW, bad, GOOD_ROW])
    with pytest.raises(DataError) as info:
        assistant.parse_intent_file(path)
    assert f"{path}:3:" in str(info.value) and problem in str(info.value)


def test_intent_bad_header_and_encoding(tmp_path):
    path = _write_csv(tmp_path / "a.csv", [GOOD_ROW], header="id,text\n")
    with pytest.raises(DataError, match=r"a\.csv:1: expected the header"):
        assistant.parse_intent_file(path)
    path = tmp_path / "b.csv"
    path.write_bytes(HEADER.encode() + GOOD_ROW.encode() + b"\n" + b'2;a;b;"\xff";"x";"y"\n')
    with pytest.raises(DataError, match=r"b\.csv:3: not UTF-8"):
        assistant.parse_intent_file(path)


# -- squad -----------------------------------------------------------------------------------------------


def test_squad_samples_parse():
    articles = squad.parse_squad(SAMPLES_DIR / "squad" / "dev-v1.1.json")
    assert len(articles) == 4
    records = [r for a in articles for r in a.records]
    assert len(records) == 22
    first = records[0]
    assert set(first) == {"taskname", "context", "question", "answer", "answers", "id", "title"}
    assert first["taskname"] == "squad" and first["title"] == articles[0].title
    assert all(r["answer"] == r["answers"][0] and r["answer"] in r["context"] for r in records)
    assert all(len(r["answers"]) == 3 for r in records)  # dev keeps every reference answer
    assert len({r["id"] for r in records}) == 22
    train = squad.parse_squad(SAMPLES_DIR / "squad" / "train-v1.1.json")
    assert sum(len(a.records) for a in train) == 24
    assert {a.title for a in train}.isdisjoint(a.title for a in articles)


def test_squad_bad_json_names_line(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    path.write_text('{"data": [\n{"title": "x",, }]}')
    with pytest.raises(DataError, match=r"dev-v1\.1\.json:2: not valid JSON"):
        squad.parse_squad(path)


def test_squad_missing_field_names_json_path(tmp_path):
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "q1", "question": "ok?", "answers": [{"text": "c", "answer_start": 0}]},
        {"id": "q2", "question": "where?"},
    ]}]}], "version": "1.1"}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"dev\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]\.answers"):
        squad.parse_squad(path)
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"qas\[1\] \(id q2\): no reference answer"):
        squad.parse_squad(path)
