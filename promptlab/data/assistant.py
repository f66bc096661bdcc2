"""NLU-Evaluation-Data ("assistant"), cross-validation fold 1 -> intent-and-slot records.

One CSV file per intent (``alarm_set.csv``: the intent is the file name), ';'-separated, double-quoted,
with the header ``answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user``. Slots are
written inline in ``answer_annotation`` as ``[type : words]``.

The label follows NeMo's assistant recipe: every word inside a span takes the span's type, and each run
of consecutive words of one type becomes ``type(words)`` (so two adjacent spans of the same type merge),
joined with ", " in utterance order::

    Intent: alarm_set
    Slots: time(six am), date(tomorrow)

or ``Slots: None`` when the utterance has no slot.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError

TASKNAME = "intent_and_slot"
HEADER = ["answerid", "scenario", "intent", "answer_annotation", "answer_from_anno", "answer_from_user"]
TRAIN_DIR = "nlu_evaluation_data/KFold_1/trainset/"
TEST_DIR = "nlu_evaluation_data/KFold_1/testset/csv/"


@dataclass(frozen=True)
class Slot:
    """One slot of an utterance: its type and the words it covers."""

    type: str
    words: str


def intent_of(path: str | Path) -> str:
    """The intent a file holds: its name without ``.csv`` (``alarm_set.csv`` -> ``alarm_set``)."""
    return PurePosixPath(str(path).replace("\\", "/")).name.removesuffix(".csv")


def parse_annotation(annotation: str) -> list[Slot]:
    """The slots of an ``answer_annotation`` string, in order, with adjacent same-type runs merged.

    Raises ValueError for an unbalanced or nested bracket, a span without ' : ', or an empty type or span.
    """
    tagged: list[tuple[str, str | None]] = []  # (word, slot type or None)
    pos = 0
    while pos < len(annotation):
        start = annotation.find("[", pos)
        close = annotation.find("]", pos)
        if close != -1 and (start == -1 or close < start):
            raise ValueError(f"']' without a matching '[' at character {close + 1}")
        outside = annotation[pos:] if start == -1 else annotation[pos:start]
        tagged.extend((word, None) for word in outside.split())
        if start == -1:
            break
        end = annotation.find("]", start + 1)
        nested = annotation.find("[", start + 1)
        if end == -1:
            raise ValueError(f"'[' at character {start + 1} is never closed")
        if nested != -1 and nested < end:
            raise ValueError(f"'[' at character {nested + 1} opens inside another span")
        slot_type, colon, words = annotation[start + 1:end].partition(":")
        slot_type, words = slot_type.strip(), words.split()
        if not colon or not slot_type or not words:
            raise ValueError(f"span {annotation[start:end + 1]!r} is not of the form '[type : words]'")
        tagged.extend((word, slot_type) for word in words)
        pos = end + 1
    slots: list[Slot] = []
    previous: str | None = None
    for word, slot_type in tagged:
        if slot_type is not None and slot_type == previous:
            slots[-1] = Slot(slot_type, f"{slots[-1].words} {word}")
        elif slot_type is not None:
            slots.append(Slot(slot_type, word))
        previous = slot_type
    return slots


def format_label(intent: str, slots: list[Slot]) -> str:
    """``"Intent: <intent>\\nSlots: type(words), ..."`` or ``"...\\nSlots: None"``."""
    rendered = ", ".join(f"{slot.type}({slot.words})" for slot in slots) if slots else "None"
    return f"Intent: {intent}\nSlots: {rendered}"


def mark_slots(record: dict[str, Any], slots_first: bool = False) -> dict[str, Any]:
    """The record with its answer rewritten to mark the slots inside the utterance, the notation
    ``answer_annotation`` itself uses::

        Intent: alarm_set
        Slots: wake me up at [time : six am] [date : tomorrow]

    (the two lines swapped with ``slots_first``; an utterance without slots is copied unmarked). The model
    then copies each slot's words from the utterance beside it instead of recalling them; the metric reads
    either notation. Each slot of the answer is found, in order, among the utterance's words (a trailing
    ",.?!" stays outside the mark); an answer with a slot that cannot be placed, or no intent, is kept as
    it is.
    """
    from ..metrics import parse_intent_slot

    intent, slots = parse_intent_slot(record["label"])
    if intent is None:
        return record
    words, marked, start = record["utterance"].split(), [], 0
    for slot_type, value in slots:
        size = len(value.split())
        for j in range(start, len(words) - size + 1):
            span = " ".join(words[j:j + size])
            core = span if span.lower() == value else span.rstrip(",.?!")
            if core.lower() == value:
                marked += words[start:j] + [f"[{slot_type} : {core}]{span[len(core):]}"]
                start = j + size
                break
        else:
            return record
    lines = [f"Intent: {intent}", "Slots: " + " ".join(marked + words[start:])]
    return {**record, "label": "\n".join(lines[::-1] if slots_first else lines)}


def assign_slots(record: dict[str, Any], words_first: bool = False) -> dict[str, Any]:
    """The record with its slots listed as ``type = words`` (``words -> type`` with ``words_first``), joined
    with "; "::

        Intent: alarm_set
        Slots: time = six am; date = tomorrow        (or: six am -> time; tomorrow -> date)

    The words follow a space, as they do inside the utterance, so the tokenizer gives them the same tokens
    there and in the answer; in ``time(six am)`` the first word follows "(" and becomes a different token
    ("six" against " six"). The metric reads every notation. An answer without an intent, or without slots,
    is kept as it is.
    """
    from ..metrics import parse_intent_slot

    intent, slots = parse_intent_slot(record["label"])
    if intent is None or not slots:
        return record
    listed = "; ".join(f"{words} -> {slot_type}" if words_first else f"{slot_type} = {words}"
                       for slot_type, words in slots)
    return {**record, "label": f"Intent: {intent}\nSlots: {listed}"}


def parse_intent_file(path: str | Path, intent: str | None = None) -> list[dict[str, Any]]:
    """Parse one intent CSV into ``{"taskname", "utterance", "label"}`` records, in file order.

    ``intent`` defaults to the file name. Raises DataError naming the file and line for a wrong header,
    a row without six fields, an empty utterance, or a malformed slot annotation.
    """
    path = Path(path)
    intent = intent or intent_of(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from exc
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";", quotechar='"', strict=True)
    records = []
    try:
        header = next(reader, None)
        if header != HEADER:
            raise DataError(f"{path}:1: expected the header {';'.join(HEADER)!r}, found {header!r}")
        for row in reader:
            line = reader.line_num
            if len(row) != len(HEADER):
                raise DataError(f"{path}:{line}: expected {len(HEADER)} ';'-separated fields, found {len(row)}")
            annotation, utterance = row[3], row[4].strip()
            if not utterance:
                raise DataError(f"{path}:{line}: empty answer_from_anno (the utterance)")
            try:
                slots = parse_annotation(annotation)
            except ValueError as exc:
                raise DataError(f"{path}:{line}: bad slot annotation {annotation!r}: {exc}") from None
            records.append({"taskname": TASKNAME, "utterance": utterance, "label": format_label(intent, slots)})
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    return records
