"""Fuzzing (hypothesis, derandomized): bad input raises promptlab's own errors, naming the place, or nothing.

Fuzzed: task definitions (mappings with wrong types, YAML text), records (any unicode, huge and empty
fields, non-objects) and JSON Lines bytes, and raw upstream lines for the three parsers (Financial
PhraseBank bytes with CRLF and latin-1, NLU-Evaluation-Data CSV rows with random brackets, SQuAD JSON
structures with wrong types). The only exceptions allowed out are `promptlab.errors.PromptlabError`
subclasses, and each message must name the file and line, the record's line, the JSON path or the task.
Where an input is accepted, its result is checked against the format's rules.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import promptlab as pl
from promptlab.data import assistant, financial_phrasebank, squad
from promptlab.data.features import encode_records
from promptlab.data.jsonl import read_jsonl
from promptlab.errors import ConfigError, DataError, PromptlabError, TemplateError
from promptlab.templates import TaskTemplate, load_tasks, parse_tasks


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


EXAMPLES: dict[str, int] = {}  # test name -> examples run (printed with -s)


def ran(name: str, expected: int) -> None:
    assert EXAMPLES.get(name, 0) >= expected // 2, f"{name}: only {EXAMPLES.get(name, 0)} examples ran"
    print(f"\n{name}: {EXAMPLES[name]} examples")


def count(name: str) -> None:
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="promptlab-fuzz-") as d:
        yield Path(d)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
TEMPLATE_TEXT = st.lists(st.sampled_from(["{", "}", "{{", "}}", "<|VIRTUAL_PROMPT_0|>", "<|VIRTUAL_PROMPT_1|>",
                                          "<|VIRTUAL_PROMPT_", "|>", "{label}", "{x}", "{ x }", "{0}", " ", "\n"])
                         | st.text(max_size=6), max_size=12).map("".join)
TEMPLATE_KEYS = ["taskname", "prompt_template", "total_virtual_tokens", "virtual_token_splits", "truncate_field",
                 "answer_field", "answer_only_loss"]


@st.composite
def task_mappings(draw):
    """Template settings: mostly plausible values, any of them possibly replaced by junk of any type."""
    plausible = {
        "taskname": st.sampled_from(["t", "sentiment", "ü", " ", ""]),
        "prompt_template": TEMPLATE_TEXT,
        "total_virtual_tokens": st.integers(-2, 12),
        "virtual_token_splits": st.none() | st.lists(st.integers(-1, 6), max_size=3) | st.integers(0, 5),
        "truncate_field": st.none() | st.sampled_from(["x", "label", "nope"]),
        "answer_field": st.none() | st.sampled_from(["x", "label", "nope"]),
        "answer_only_loss": st.booleans(),
    }
    out = {}
    for key in TEMPLATE_KEYS:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing key
        out[key] = draw(JSON if draw(st.integers(0, 5)) == 0 else plausible[key])
    if draw(st.integers(0, 7)) == 0:
        out[draw(st.text(min_size=1, max_size=8))] = draw(JSON)  # unknown key
    return out


def test_fuzz_task_definitions():
    """from_dict / parse_tasks on junk: a TaskTemplate, or TemplateError/ConfigError naming the task or source."""

    @fuzz(200)
    @given(st.lists(task_mappings(), max_size=3) | st.dictionaries(st.text(max_size=6), task_mappings(), max_size=3)
           | JSON)
    def run(data):
        count("task definitions")
        try:
            tasks = parse_tasks(data, source="fuzz.yaml")
        except (TemplateError, ConfigError) as exc:
            message = str(exc)
            assert "fuzz.yaml" in message or "task" in message, message
            return
        for name, t in tasks.items():  # accepted: self-consistent
            assert isinstance(t, TaskTemplate) and t.taskname == name
            assert sum(s.length for s in t.segments if s.kind == "virtual") == t.total_virtual_tokens
            assert TaskTemplate.from_dict(t.to_dict()) == t

    run()
    ran("task definitions", 200)


YAML_TEXT = st.lists(st.sampled_from(["tasks:", "\n", "  ", "- ", "taskname: a", "prompt_template: '{x}'",
                                      "total_virtual_tokens: 2", "virtual_token_splits: [1, 1]", "{", "}", "[", "]",
                                      ": ", "&a ", "*a", "!!set ", "!!binary ", "!!python/name:os.system", "'", '"',
                                      "\t", "#", "---", "...", "? ", "|", ">", "%YAML 1.1", "\x00", "\ufeff"])
                     | st.text(max_size=5), max_size=25).map("".join)


def test_fuzz_task_yaml_files(scratch):
    """load_tasks on random YAML text: templates, or an error that names the file."""

    @fuzz(150)
    @given(YAML_TEXT)
    def run(text):
        count("task YAML files")
        path = scratch / "tasks.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_tasks(path)
        except (TemplateError, ConfigError) as exc:
            assert str(path) in str(exc), str(exc)

    run()
    ran("task YAML files", 150)


def test_deeply_nested_inputs_are_clean_errors(scratch):
    """Nesting deep enough to exhaust Python's recursion limit is refused like any other bad file."""
    from promptlab.pipeline import load_run_config

    deep = "[" * 1_500  # past the recursion limit (1000)
    cases = [("tasks.yaml", deep, load_tasks, ConfigError), ("run.yaml", "model: " + deep, load_run_config, ConfigError),
             ("dev.json", deep, squad.parse_squad, DataError), ("records.jsonl", '{"a": 1}\n' + deep,
                                                                read_jsonl, DataError)]
    for name, text, load, error in cases:
        path = scratch / name
        path.write_text(text)
        with pytest.raises(error) as info:
            load(path)
        assert str(path) in str(info.value)
    with pytest.raises(DataError, match=r"records\.jsonl:2"):
        read_jsonl(scratch / "records.jsonl")


# ------------------------------------------------------------------------------------------------ records
FIELD_TEXT = (st.text(max_size=30) | st.text(alphabet=st.characters(codec=None), max_size=10)
              | st.sampled_from(["", " ", "\n", "\r\n", "\x00", "\ud800", "{label}", "<|VIRTUAL_PROMPT_0|>", "@", "🙂" * 5])
              | st.tuples(st.text(min_size=1, max_size=5), st.integers(500, 4000)).map(lambda p: p[0] * p[1]))
VALUES = FIELD_TEXT | st.integers() | st.floats() | st.none() | st.booleans() | st.lists(st.integers(), max_size=3)


@st.composite
def records(draw):
    if draw(st.integers(0, 15)) == 0:
        return draw(JSON)  # not an object at all
    name = draw(st.sampled_from(["sentiment", "intent_and_slot", "squad", "unknown", ""]) | st.none())
    record = {} if name is None else {"taskname": name}
    for field in ["sentence", "label", "utterance", "context", "question", "answer"]:
        if draw(st.booleans()):
            record[field] = draw(VALUES)
    return record


def test_fuzz_records(tiny_base):
    """encode_records on random records: examples, or a DataError naming the first bad record's line."""
    tasks = pl.default_tasks()
    tokenizer = tiny_base.tokenizer

    def first_bad(batch, max_length, with_answer):
        for i, r in enumerate(batch):
            try:
                encode_records([r], tasks, tokenizer, max_length, with_answer=with_answer, source="x")
            except DataError:
                return i
        return None

    @fuzz(80)
    @given(st.lists(records(), min_size=1, max_size=5), st.integers(8, 200), st.booleans())
    def run(batch, max_length, with_answer):
        count("records")
        try:
            examples, stats = encode_records(batch, tasks, tokenizer, max_length, with_answer=with_answer,
                                             source="fuzz.jsonl")
        except DataError as exc:
            line = re.search(r"fuzz\.jsonl, line (\d+)", str(exc))
            assert line, str(exc)
            assert int(line.group(1)) == first_bad(batch, max_length, with_answer) + 1, str(exc)
            return
        assert first_bad(batch, max_length, with_answer) is None
        assert len(examples) + sum(stats.skipped.values()) == len(batch)
        for ex in examples:
            assert len(ex.input_ids) == len(ex.virtual_index) == len(ex.labels) <= max_length
            assert sum(v >= 0 for v in ex.virtual_index) == tasks[ex.taskname].total_virtual_tokens

    run()
    ran("records", 80)


JSONL_LINE = (st.binary(max_size=20)
              | JSON.map(lambda v: json.dumps(v).encode())
              | records().map(lambda r: json.dumps(r, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
              | st.sampled_from([b"", b" ", b"\r", b"{", b"[]", b'"x"', b"NaN", b'{"a": NaN}', b"\xff\xfe",
                                 b'{"a": "\\ud800"}', b"\xef\xbb\xbf{}"]))


def jsonl_oracle(lines: list[bytes]) -> int | None:
    """The first line read_jsonl must refuse (1-based), by the JSON Lines rules."""
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return lineno
        if not isinstance(value, dict):
            return lineno
    return None


def test_fuzz_jsonl_bytes(scratch):
    @fuzz(150)
    @given(st.lists(JSONL_LINE, max_size=6), st.sampled_from([b"\n", b"\r\n"]))
    def run(lines, end):
        count("JSONL files")
        path = scratch / "records.jsonl"
        path.write_bytes(end.join(lines))
        expected_bad = jsonl_oracle(path.read_bytes().split(b"\n"))
        try:
            out = read_jsonl(path)
        except DataError as exc:
            assert f"{path}:{expected_bad}:" in str(exc), (str(exc), expected_bad)
            return
        assert expected_bad is None and all(isinstance(r, dict) for r in out)

    run()
    ran("JSONL files", 150)


# ------------------------------------------------------------------------------------------ raw parsers
LATIN1_TEXT = st.binary(max_size=25).map(lambda b: b.replace(b"\n", b" "))
PB_LINE = st.tuples(
    st.one_of(LATIN1_TEXT, st.sampled_from([b"Profit rose", b"caf\xe9 sales \x85 up", b"a@b", b"", b"  ", b"\r"])),
    st.sampled_from([b"@", b"", b"@@", b" @ "]),
    st.one_of(st.sampled_from([b"positive", b"neutral", b"negative", b"Positive", b"positive ", b"", b"neutral\r"]),
              LATIN1_TEXT),
).map(b"".join)


def phrasebank_oracle(data: bytes):
    """(first bad line or None, records expected) by the file's rules: sentence@label, split on the last '@'."""
    lines = data.decode("latin-1").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    good = []
    for lineno, line in enumerate(lines, start=1):
        sentence, sep, label = line.removesuffix("\r").rpartition("@")
        if not sep or not sentence.strip() or label.strip() not in financial_phrasebank.LABELS:
            return lineno, None
        good.append((sentence.strip(), label.strip()))
    return (0 if not good else None), good


def test_fuzz_financial_phrasebank_lines(scratch):
    @fuzz(200)
    @given(st.lists(PB_LINE, max_size=6), st.sampled_from([b"\r\n", b"\n"]), st.booleans())
    def run(lines, end, final_newline):
        count("Financial PhraseBank files")
        path = scratch / "Sentences_AllAgree.txt"
        data = end.join(lines) + (end if final_newline and lines else b"")
        path.write_bytes(data)
        bad, good = phrasebank_oracle(data)
        try:
            records = financial_phrasebank.parse_sentences(path)
        except DataError as exc:
            where = f"{path}: no sentences" if bad == 0 else f"{path}:{bad}:"
            assert where in str(exc), (str(exc), bad)
            return
        assert bad is None
        assert [(r["sentence"], r["label"]) for r in records] == good
        assert all(r["taskname"] == "sentiment" for r in records)

    run()
    ran("Financial PhraseBank files", 200)


ANNOTATION = st.lists(st.sampled_from(["[", "]", " : ", ":", "time", "date", "wake me", " ", "six am", "[time : six]",
                                       "[date : tomorrow]", "[ : x]", "[place_name :]", "\"", ";", "\n", "é"])
                      | st.text(max_size=4), max_size=10).map("".join)


def csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@st.composite
def intent_files(draw):
    header = ";".join(assistant.HEADER) if draw(st.integers(0, 12)) else draw(st.sampled_from(
        ["answerid;scenario;intent", "", ";".join(reversed(assistant.HEADER))]))
    rows = []
    for i in range(draw(st.integers(0, 5))):
        utterance = draw(st.sampled_from(["wake me up at six am tomorrow", "", "  "]) | st.text(max_size=10))
        fields = [str(i), "alarm", "set", draw(ANNOTATION), utterance, utterance]
        if draw(st.integers(0, 8)) == 0:
            fields = fields[: draw(st.integers(0, 5))] + ([] if draw(st.booleans()) else ["extra", "x"])
        quoted = draw(st.booleans())
        rows.append(";".join(csv_field(f) if quoted or i else f for f in fields))
    if draw(st.integers(0, 8)) == 0 and rows:
        rows[draw(st.integers(0, len(rows) - 1))] += draw(st.sampled_from(['"', '"unterminated', 'x"y']))
    data = "\n".join([header] + rows).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 10)) == 0:
        data += draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))  # not UTF-8
    return data


def test_fuzz_nlu_csv_rows(scratch):
    @fuzz(200)
    @given(intent_files(), ANNOTATION)
    def run(data, annotation):
        count("NLU CSV files")
        # the slot annotation parser alone: slots or a ValueError (wrapped as DataError by the file parser)
        try:
            slots = assistant.parse_annotation(annotation)
        except ValueError as exc:
            assert not isinstance(exc, PromptlabError) and str(exc)
        else:
            words = annotation.split()
            assert all(w in " ".join(words) for s in slots for w in s.words.split())
            assert all(s.type.strip() == s.type and s.type for s in slots)
        path = scratch / "alarm_set.csv"
        path.write_bytes(data)
        try:
            records = assistant.parse_intent_file(path)
        except DataError as exc:
            assert re.search(re.escape(str(path)) + r":\d+: ", str(exc)), str(exc)
            return
        for r in records:
            assert r["taskname"] == "intent_and_slot" and r["utterance"].strip() == r["utterance"] != ""
            assert r["label"].startswith("Intent: alarm_set\nSlots: ")

    run()
    ran("NLU CSV files", 200)


def valid_squad() -> dict:
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}]}


@st.composite
def squad_documents(draw):
    """A valid SQuAD document with up to three nodes replaced by junk of any JSON type."""
    doc = valid_squad()
    for _ in range(draw(st.integers(0, 3))):
        node, key = doc, None
        path = []
        while True:  # walk down to a random node
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) \
                if isinstance(node, list) else []
            if not children or (path and draw(st.integers(0, 2)) == 0):
                break
            key, child = children[draw(st.integers(0, len(children) - 1))]
            path.append((node, key))
            node = child
        if not path:
            return draw(JSON)
        parent, key = path[-1]
        if isinstance(parent, dict) and draw(st.integers(0, 3)) == 0:
            del parent[key]  # a missing field
        else:
            parent[key] = draw(JSON)
    return doc


def test_fuzz_squad_structures(scratch):
    @fuzz(200)
    @given(squad_documents(), st.integers(0, 5))
    def run(doc, damage):
        count("SQuAD files")
        path = scratch / "dev-v1.1.json"
        text = json.dumps(doc)
        if damage == 0:  # sometimes the bytes themselves are broken
            text = text[: len(text) // 2]
        path.write_text(text, encoding="utf-8")
        try:
            articles = squad.parse_squad(path)
        except DataError as exc:
            message = str(exc)
            assert message.startswith(f"{path}"), message
            assert re.search(r"(:\d+: not valid JSON|top level|data(\[\d+\])?[.:\s(]|no reference answer|"
                             r"holds no article)", message), message
            return
        for article in articles:
            for r in article.records:
                assert all(isinstance(r[k], str) for k in ("context", "question", "answer", "id", "title"))
                assert r["answer"] == r["answers"][0] and all(isinstance(a, str) for a in r["answers"])

    run()
    ran("SQuAD files", 200)
