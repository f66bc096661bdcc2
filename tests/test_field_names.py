"""Any legal field name works: encoding never confuses a field with literal text or a virtual run.

Property tests over generated templates: field names (including ``text``, ``virtual``, ``label``, names that
also occur as literal text), field orders, literal pieces and virtual runs. For each one the encoded
example must (a) decode to exactly the rendered record, (b) label exactly the answer's tokens plus EOS,
(c) put the virtual positions where the markers are, in order, and (d) when too long, shorten only the
truncate field.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import promptlab as pl
from promptlab.data.features import IGNORE_INDEX, encode

NAMES = st.sampled_from(["text", "virtual", "field", "label", "answer", "segment", "question", "context", "x",
                         "Text", "value_1", "kind", "sentence", "virtual_index"])
LITERALS = st.sampled_from([" ", "text", " text: ", "\n", "virtual ", " Q: ", " C: ", "\nA:", "{{text}} ", ": "])
VALUES = st.sampled_from(["hello world", "Paris", "positive", "a b c d e f g h", "text", "virtual", "42 %", "é"])


@st.composite
def templates(draw):
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    runs = draw(st.lists(st.integers(1, 3), max_size=3))
    slots = [("field", n) for n in names] + [("virtual", i) for i in range(len(runs))]
    body = list(draw(st.permutations(slots)))
    if draw(st.booleans()):  # an answer field, which ends the template; else the whole text is trained on
        body = [s for s in body if s != ("field", names[-1])] + [("field", names[-1])]
    parts = []
    for kind, value in body:
        parts.append(draw(LITERALS))
        parts.append(f"{{{value}}}" if kind == "field" else f"<|VIRTUAL_PROMPT_{value}|>")
    text = "".join(parts)
    answer = names[-1] if body[-1] == ("field", names[-1]) else None
    truncate = draw(st.sampled_from([None] + [n for n in names if n != answer]))
    template = pl.TaskTemplate("t", text, sum(runs), runs or None, truncate_field=truncate, answer_field=answer)
    record = {"taskname": "t", **{n: draw(VALUES) for n in names}}
    return template, record


def rendered(template, record) -> str:
    return "".join(record[s.value] if s.kind == "field" else s.value for s in template.segments if s.kind != "virtual")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return tiny_base.tokenizer


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(templates())
def test_any_field_names_encode_exactly(tokenizer, case):
    template, record = case
    example = encode(record, template, tokenizer, max_length=512)
    real = [t for t, v in zip(example.input_ids, example.virtual_index) if v < 0]
    assert tokenizer.decode(real[:-1]) == rendered(template, record)  # everything but the final EOS
    assert real[-1] == tokenizer.eos_token_id
    # the virtual positions, in marker order, where the markers stand
    expected = [i for s in template.segments if s.kind == "virtual" for i in range(s.start, s.start + s.length)]
    assert [v for v in example.virtual_index if v >= 0] == expected
    labelled = [t for t in example.labels if t != IGNORE_INDEX]
    if template.answer_field is None:
        assert labelled == [t for t, v in zip(example.input_ids, example.virtual_index) if v < 0]
    else:
        # exactly the answer's tokens (with the space it takes from the text before it) and EOS
        before = rendered(template, {**record, template.answer_field: ""})
        answer = record[template.answer_field]
        if before.endswith(" ") and not answer[:1].isspace():
            answer = " " + answer
        assert tokenizer.decode(labelled[:-1]) == answer and labelled[-1] == tokenizer.eos_token_id
        assert labelled[:-1] == tokenizer(answer, add_special_tokens=False)["input_ids"]


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(templates())
def test_only_the_truncate_field_is_shortened(tokenizer, case):
    template, record = case
    field = template.truncate_field
    if field is None:
        return
    record = {**record, field: " ".join(["long"] * 40)}
    full = encode(record, template, tokenizer, max_length=10_000)
    example = encode(record, template, tokenizer, max_length=len(full) - 5)
    assert example is not None and example.truncated == 5 and len(example) == len(full) - 5
    text = tokenizer.decode([t for t, v in zip(example.input_ids, example.virtual_index) if v < 0][:-1])
    whole = rendered(template, record)
    head, _, tail = whole.partition(record[field])
    value_start = len(head) - (1 if head.endswith(" ") else 0)  # the space may travel with the field
    assert text.startswith(whole[:value_start]) and text.endswith(tail)
    assert len(text) < len(whole)


def test_the_reported_templates(tokenizer):
    """The two cases from the bug report: a field named ``text``, and an answer field named ``text``."""
    t = pl.TaskTemplate("qa", "<|VIRTUAL_PROMPT_0|> Q: {question} C: {text}\nA: {label}", 2, answer_field="label",
                        truncate_field="text")
    ex = encode({"question": "Where?", "text": "In Paris", "label": "Paris"}, t, tokenizer, 512)
    assert tokenizer.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX][:-1]) == " Paris"
    t = pl.TaskTemplate("gen", "<|VIRTUAL_PROMPT_0|> {prompt} text: {text}", 2, answer_field="text")
    ex = encode({"prompt": "Say hi", "text": "hi there"}, t, tokenizer, 512)
    assert tokenizer.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX][:-1]) == " hi there"
