"""The playground: `playground_answer` generates like `evaluate` does, and the widget shows its result."""
import pytest
import torch

import promptlab as pl
from promptlab.baselines import baseline_model
from promptlab import playground

SENTENCE = "Profit rose by 5 % in the quarter ."
UTTERANCE = "wake me up at seven am"


@pytest.fixture
def model(tiny_base, tasks):
    """Sentiment frozen in the table (prompt tuning), intent_and_slot training (p-tuning)."""
    m = pl.PromptLearningModel(tiny_base, tasks)
    m.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
    m.freeze()
    m.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=16)
    return m


def test_answer_matches_generate_and_describes_the_virtual_tokens(model):
    out = playground.playground_answer(model, "intent_and_slot", {"utterance": UTTERANCE})
    record = {"taskname": "intent_and_slot", "utterance": UTTERANCE}
    assert out["record"] == record
    assert out["answer"] == model.generate([record], max_new_tokens=40)[0].strip()
    assert out["method"] == "p_tuning"
    assert out["virtual_tokens"] == 10 and out["splits"] == [7, 3]
    assert out["max_new_tokens"] == 40
    assert out["rendered"] == ("[V0][V1][V2][V3][V4][V5][V6] Predict intent and slot [V7][V8][V9] :\n"
                               + UTTERANCE + "\n")


def test_answer_of_a_frozen_prompt_tuning_task(model):
    out = playground.playground_answer(model, "sentiment", {"sentence": SENTENCE}, max_new_tokens=3)
    assert out["method"] == "prompt_tuning" and out["splits"] == [10]
    # render() keeps the space before the answer slot (the encoder moves it onto the answer)
    assert out["rendered"] == "".join(f"[V{i}]" for i in range(10)) + f" {SENTENCE} sentiment: "
    assert out["answer"] == model.generate([out["record"]], max_new_tokens=3, stop=["\n\n"])[0].strip()


@pytest.mark.parametrize("task, fields, message", [
    ("squad", {"context": "c", "question": "q"}, "has no prompt"),
    ("sentiment", {"utterance": "hi"}, "unknown ['utterance'], missing ['sentence']"),
    ("sentiment", {"sentence": "x", "label": "positive"}, "unknown ['label']"),
])
def test_bad_requests_name_the_problem(model, task, fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        playground.playground_answer(model, task, fields)


def test_playground_tasks_lists_only_answerable_tasks(model, tiny_base, tasks):
    assert playground.playground_tasks(model) == ["sentiment", "intent_and_slot"]
    zero_shot = baseline_model(tiny_base, tasks, "zero-shot")
    assert playground.playground_tasks(zero_shot) == list(tasks)  # no virtual tokens: nothing to learn
    assert playground.playground_answer(zero_shot, "sentiment", {"sentence": SENTENCE})["method"] == "none"
    with pytest.raises(ValueError, match="no task with a prompt"):
        playground.playground(pl.PromptLearningModel(tiny_base, tasks))


def test_widget_generates_and_shows_reference_and_virtual_tokens(model):
    ipywidgets = pytest.importorskip("ipywidgets")
    records = {"sentiment": [{"taskname": "sentiment", "sentence": SENTENCE, "label": "positive"},
                             {"taskname": "sentiment", "sentence": "Sales fell .", "label": "negative"}]}
    app = playground.playground(model, records)
    assert isinstance(app, ipywidgets.VBox)
    (chooser, next_button), info, inputs_box, generate, result = app.children[0].children, *app.children[1:]
    assert list(chooser.options) == ["sentiment", "intent_and_slot"]
    assert [b.description for b in inputs_box.children] == ["sentence"]
    assert inputs_box.children[0].value == SENTENCE  # first example preloaded
    assert "prompt_tuning, 10 virtual tokens" in info.value

    generate.click()
    expected = playground.playground_answer(model, "sentiment", {"sentence": SENTENCE})["answer"]
    assert "<b>reference:</b> <code>positive</code>" in result.value
    assert "[V0][V1]" in result.value and "splits [10]" in result.value
    assert f"<code>{expected or '(empty)'}</code>" in result.value

    next_button.click()
    assert inputs_box.children[0].value == "Sales fell ."
    inputs_box.children[0].value = "Typed by hand ."
    generate.click()
    assert "reference" not in result.value  # the inputs no longer are the example's

    chooser.value = "intent_and_slot"  # no examples: empty Text box, Next disabled
    assert [b.description for b in inputs_box.children] == ["utterance"]
    assert next_button.disabled and result.value == ""
    inputs_box.children[0].value = UTTERANCE
    generate.click()
    assert "splits [7, 3]" in result.value and "p_tuning" in result.value


def test_widget_shows_errors_instead_of_raising(model, tiny_base, tasks):
    m = pl.PromptLearningModel(tiny_base, tasks, prompt_table=model.prompt_table, max_seq_length=20)
    app = playground.playground(m)
    inputs_box, generate, result = app.children[2:]
    inputs_box.children[0].value = "word " * 50  # longer than max_seq_length: generate raises DataError
    generate.click()
    assert "DataError" in result.value and "max_seq_length" in result.value


def test_playground_does_not_touch_the_prompts(model):
    before = model.prompt_table["sentiment"].clone()
    playground.playground_answer(model, "sentiment", {"sentence": SENTENCE})
    assert torch.equal(before, model.prompt_table["sentiment"])


def test_a_deep_prompt_is_named_with_its_prefix_length(tiny_base, tasks):
    model = pl.PromptLearningModel(tiny_base, tasks)
    model.add_deep_prompt_tuning("intent_and_slot", num_virtual_tokens=4, hidden_size=8)
    out = playground.playground_answer(model, "intent_and_slot", {"utterance": UTTERANCE}, max_new_tokens=2)
    assert out["method"] == "deep_prompt_tuning" and out["virtual_tokens"] == 4
