"""Task templates: parsing, validation errors that name the task and the problem, YAML loading.

Plus property tests (hypothesis): valid templates built at random parse back to what they were built
from; random text never raises anything but TemplateError; random records encode consistently.
"""
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import promptlab as pl
from promptlab.data.features import REAL, encode
from promptlab.errors import ConfigError, DataError, TemplateError
from promptlab.templates import TaskTemplate, load_tasks, parse_tasks

# the autouse seed fixture is function-scoped; it only seeds torch, so reusing it across examples is harmless
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def layout(t: TaskTemplate) -> list[tuple]:
    """The parsed segments in a comparable form."""
    return [(s.kind, s.value) if s.kind != "virtual" else ("virtual", s.marker, s.start, s.length) for s in t.segments]


# ------------------------------------------------------------------------------------------ parsing
def test_fields_markers_and_default_splits():
    t = TaskTemplate("sentiment", "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", 10, answer_field="label")
    assert t.virtual_token_splits == [10]
    assert t.fields == ["sentence", "label"]
    assert t.input_fields == ["sentence"]
    assert layout(t) == [("virtual", 0, 0, 10), ("text", " "), ("field", "sentence"), ("text", " sentiment: "),
                         ("field", "label")]
    assert [s.kind for s in t.prompt_segments] == ["virtual", "text", "field", "text"]
    assert t.render({"sentence": "up", "label": "positive"}).endswith("[V9] up sentiment: positive")
    assert t.render({"sentence": "up"}, with_answer=False).endswith(" up sentiment: ")


def test_split_markers_take_their_rows_in_marker_order():
    # marker 1 comes first in the text: it still takes rows 4..5 (splits are in marker order)
    t = TaskTemplate("t", "<|VIRTUAL_PROMPT_1|>a {x} b<|VIRTUAL_PROMPT_0|>{y}", 6, virtual_token_splits=[4, 2])
    virtual = [(s.marker, s.start, s.length) for s in t.segments if s.kind == "virtual"]
    assert virtual == [(1, 4, 2), (0, 0, 4)]
    assert t.fields == ["x", "y"]


def test_default_intent_template_is_split_7_3(tasks):
    t = tasks["intent_and_slot"]
    assert [(s.start, s.length) for s in t.segments if s.kind == "virtual"] == [(0, 7), (7, 3)]
    assert t.fields == ["utterance", "label"] and t.answer_field == "label"


def test_escaped_braces_are_literal_text():
    t = TaskTemplate("json", "<|VIRTUAL_PROMPT_0|>{{\"q\": {q}}} -> {{{a}}}", 2)
    assert t.fields == ["q", "a"]
    assert t.render({"q": "1", "a": "2"}) == "[V0][V1]{\"q\": 1} -> {2}"


def test_zero_virtual_tokens_without_markers_is_allowed():
    t = TaskTemplate("plain", "Q: {q}\nA: {a}", 0, answer_field="a")
    assert t.virtual_token_splits == [] and t.fields == ["q", "a"]


def test_to_dict_from_dict_round_trip(tasks):
    for t in tasks.values():
        again = TaskTemplate.from_dict(t.to_dict())
        assert again == t and layout(again) == layout(t)


# ------------------------------------------------------------------------------------------- errors
BAD = [
    # (kwargs, words the message must contain)
    (dict(prompt_template="<|VIRTUAL_PROMPT_1|> {x}", total_virtual_tokens=4), ["<|VIRTUAL_PROMPT_1|>", "[4]"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x} <|VIRTUAL_PROMPT_0|>", total_virtual_tokens=4,
          virtual_token_splits=[2, 2]), ["each once"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x}", total_virtual_tokens=5, virtual_token_splits=[2, 2]),
     ["sum to 4", "total_virtual_tokens=5"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|><|VIRTUAL_PROMPT_1|> {x}", total_virtual_tokens=4,
          virtual_token_splits=[4, 0]), ["positive integers"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x}", total_virtual_tokens=-1), ["total_virtual_tokens", "-1"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {a} then {x}", total_virtual_tokens=2, answer_field="a"),
     ["answer_field 'a'", "last slot", "'x'"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x} {a}.", total_virtual_tokens=2, answer_field="a"),
     ["must end the template", "'.'"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x}", total_virtual_tokens=2, answer_field="y"),
     ["answer_field 'y'", "not a slot"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x", total_virtual_tokens=2), ["unbalanced '{'", "character 21"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x {y}", total_virtual_tokens=2), ["unbalanced '{'"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> x} {y}", total_virtual_tokens=2), ["unbalanced '}'", "character 22"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {1x}", total_virtual_tokens=2), ["invalid field name", "{1x}"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {}", total_virtual_tokens=2), ["invalid field name"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {a-b}", total_virtual_tokens=2), ["invalid field name", "{a-b}"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x} and {x}", total_virtual_tokens=2), ["appears twice"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x}", total_virtual_tokens=2, truncate_field="ctx"),
     ["truncate_field 'ctx'", "not a slot"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_0|> {x} {a}", total_virtual_tokens=2, truncate_field="a",
          answer_field="a"), ["truncate_field may not be the answer"]),
    (dict(prompt_template="<|VIRTUAL_PROMPT_x|> {x}", total_virtual_tokens=2), ["malformed virtual-token marker"]),
    (dict(prompt_template="just text", total_virtual_tokens=0), ["neither fields nor virtual tokens"]),
]


@pytest.mark.parametrize("kwargs,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_template_errors_name_task_and_problem(kwargs, words):
    with pytest.raises(TemplateError) as info:
        TaskTemplate(taskname="my_task", **kwargs)
    message = str(info.value)
    assert "'my_task'" in message
    for word in words:
        assert word in message, (word, message)


def test_empty_taskname_is_an_error():
    with pytest.raises(TemplateError, match="taskname"):
        TaskTemplate("  ", "{x}", 0)


def test_unknown_and_missing_keys_in_from_dict():
    with pytest.raises(TemplateError, match=r"task 'q'.*unknown template key\(s\) \['answer_feild'\]"):
        TaskTemplate.from_dict({"prompt_template": "{x} {y}", "total_virtual_tokens": 0, "answer_feild": "y"},
                               taskname="q")
    with pytest.raises(TemplateError, match=r"missing template key\(s\) \['total_virtual_tokens'\]"):
        TaskTemplate.from_dict({"taskname": "q", "prompt_template": "{x}"})


# --------------------------------------------------------------------------------------------- YAML
def write(tmp_path, text):
    path = tmp_path / "tasks.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_tasks_list_form(tmp_path):
    path = write(tmp_path, """\
        tasks:
          - taskname: a
            prompt_template: "<|VIRTUAL_PROMPT_0|> {x} -> {y}"
            total_virtual_tokens: 3
            answer_field: y
          - taskname: b
            prompt_template: "<|VIRTUAL_PROMPT_0|>{x}<|VIRTUAL_PROMPT_1|>"
            total_virtual_tokens: 5
            virtual_token_splits: [2, 3]
        """)
    tasks = load_tasks(path)
    assert list(tasks) == ["a", "b"]
    assert tasks["a"].answer_field == "y" and tasks["b"].virtual_token_splits == [2, 3]


def test_load_tasks_mapping_form(tmp_path):
    path = write(tmp_path, """\
        tasks:
          qa:
            prompt_template: "<|VIRTUAL_PROMPT_0|> {q} {a}"
            total_virtual_tokens: 4
            answer_field: a
        """)
    assert load_tasks(path)["qa"].taskname == "qa"
    # a bare mapping (no `tasks:` key) works too
    bare = write(tmp_path, """\
        qa:
          prompt_template: "{q} {a}"
          total_virtual_tokens: 0
        """)
    assert load_tasks(bare)["qa"].fields == ["q", "a"]


def test_load_tasks_unknown_key_names_task_and_key(tmp_path):
    path = write(tmp_path, """\
        tasks:
          - taskname: a
            prompt_template: "{x}"
            total_virtual_tokens: 0
            splits: [1]
        """)
    with pytest.raises(TemplateError, match=r"task 'a'.*\['splits'\]"):
        load_tasks(path)


def test_load_tasks_uses_the_safe_loader(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"""\
        tasks: !!python/object/apply:os.system ["touch {marker}"]
        """)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tasks(path)
    assert not marker.exists()
    path = write(tmp_path, """\
        tasks:
          - !!python/object:promptlab.templates.TaskTemplate {taskname: a}
        """)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tasks(path)


def test_load_tasks_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_tasks(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tasks(write(tmp_path, "tasks: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a list or mapping"):
        load_tasks(write(tmp_path, "tasks: 3\n"))
    with pytest.raises(ConfigError, match="'a' is defined twice"):
        parse_tasks([{"taskname": "a", "prompt_template": "{x}", "total_virtual_tokens": 0}] * 2)


def test_default_tasks():
    tasks = pl.default_tasks()
    assert sorted(tasks) == ["intent_and_slot", "sentiment", "squad"]
    assert tasks["sentiment"].total_virtual_tokens == 10 and tasks["sentiment"].answer_field == "label"
    assert tasks["squad"].truncate_field == "context" and tasks["squad"].total_virtual_tokens == 15
    assert tasks["squad"].fields == ["context", "question", "answer"]
    assert tasks["intent_and_slot"].virtual_token_splits == [7, 3]
    assert all(t.answer_only_loss for t in tasks.values())


# --------------------------------------------------------------------------------- property tests
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
# literal text: anything, braces and marker-like characters included (they are escaped when written)
TEXT = st.lists(st.sampled_from(list("ab {}<|>_\n:.é漢") + ["VIRTUAL_PROMPT_", "<|"]), min_size=1,
                max_size=12).map("".join)


@st.composite
def valid_templates(draw):
    """(template string, splits, expected layout, fields) built from random parts."""
    kinds = draw(st.lists(st.sampled_from(["text", "field", "marker"]), min_size=1, max_size=8))
    fields = draw(st.lists(NAMES, min_size=len(kinds), max_size=len(kinds), unique=True))
    n_markers = kinds.count("marker")
    order = draw(st.permutations(list(range(n_markers))))  # markers may appear in any order
    splits = draw(st.lists(st.integers(1, 5), min_size=n_markers, max_size=n_markers))
    starts = [sum(splits[:i]) for i in range(n_markers)]
    parts, expected, markers_seen = [], [], 0
    for i, kind in enumerate(kinds):
        if kind == "text":
            text = draw(TEXT)
            if "<|VIRTUAL_PROMPT" in ("".join(parts[-1:]) + text):
                text = text.replace("<", "(")  # literal text may not spell a marker
            parts.append(text.replace("{", "{{").replace("}", "}}"))
            if expected and expected[-1][0] == "text":
                expected[-1] = ("text", expected[-1][1] + text)
            else:
                expected.append(("text", text))
        elif kind == "field":
            parts.append("{" + fields[i] + "}")
            expected.append(("field", fields[i]))
        else:
            m = order[markers_seen]
            markers_seen += 1
            parts.append(f"<|VIRTUAL_PROMPT_{m}|>")
            expected.append(("virtual", m, starts[m], splits[m]))
    return "".join(parts), splits, expected, [fields[i] for i, k in enumerate(kinds) if k == "field"]


@PROPERTY
@given(valid_templates())
def test_random_valid_templates_parse_back(case):
    template, splits, expected, fields = case
    if "<|VIRTUAL_PROMPT" in "".join(e[1] for e in expected if e[0] == "text"):
        return  # text touching a marker spelled one: not a valid template by construction
    if not fields and not splits:
        with pytest.raises(TemplateError):
            TaskTemplate("p", template, 0)
        return
    answer = fields[-1] if expected[-1][0] == "field" and fields else None
    t = TaskTemplate("p", template, sum(splits), virtual_token_splits=splits or None, answer_field=answer)
    assert layout(t) == expected
    assert t.fields == fields
    assert t.virtual_token_splits == splits
    assert TaskTemplate.from_dict(t.to_dict()) == t


@PROPERTY
@given(st.lists(st.sampled_from(list("{}<|>_x 0123") + ["<|VIRTUAL_PROMPT_", "|>", "{{", "}}"]),
                max_size=30).map("".join),
       st.integers(-1, 6), st.one_of(st.none(), st.lists(st.integers(-1, 4), max_size=3)),
       st.one_of(st.none(), st.sampled_from(["x", "x0", "y"])), st.one_of(st.none(), st.sampled_from(["x", "y"])))
def test_random_text_raises_only_template_errors(text, total, splits, answer, truncate):
    try:
        t = TaskTemplate("r", text, total, virtual_token_splits=splits, answer_field=answer,
                         truncate_field=truncate)
    except TemplateError as exc:
        assert "'r'" in str(exc)
        return
    # whatever parsed is self-consistent
    assert sum(s.length for s in t.segments if s.kind == "virtual") == t.total_virtual_tokens
    assert len(set(t.fields)) == len(t.fields)


VALUES = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec=None), max_size=8),
                   st.sampled_from(["\ud800", "a\udfffb", "", " ", "\n\n"]),
                   st.integers(), st.floats(allow_nan=True), st.none(), st.booleans())


@PROPERTY
@given(st.sampled_from(["sentiment", "intent_and_slot", "squad"]), st.data(), st.booleans(),
       st.integers(20, 120))
def test_random_records_encode_consistently(tiny_base, name, data, with_answer, max_length):
    template = pl.default_tasks()[name]
    record = {"taskname": name}
    for f in template.fields:
        if data.draw(st.booleans(), label="present"):
            record[f] = data.draw(VALUES, label=f)
    try:
        ex = encode(record, template, tiny_base.tokenizer, max_length, with_answer=with_answer)
    except DataError as exc:
        assert "'" + name + "'" in str(exc)
        return
    if ex is None:  # too long and nothing (or too little) to truncate
        return
    assert len(ex.input_ids) == len(ex.virtual_index) == len(ex.labels) <= max_length
    assert sum(v != REAL for v in ex.virtual_index) == template.total_virtual_tokens
    assert sorted(v for v in ex.virtual_index if v != REAL) == list(range(template.total_virtual_tokens))
    if not with_answer:
        assert set(ex.labels) == {-100}
    else:
        assert ex.input_ids[-1] == tiny_base.tokenizer.eos_token_id == ex.labels[-1]


def test_lone_surrogate_is_a_data_error(tiny_base, tasks):
    record = {"taskname": "sentiment", "sentence": "bad \ud800 text", "label": "neutral"}
    with pytest.raises(DataError, match=r"field 'sentence'.*not valid Unicode"):
        encode(record, tasks["sentiment"], tiny_base.tokenizer, 64)
