"""Metrics against hand-computed cases (each expected number is worked out in a comment)."""

import pytest

import promptlab as pl

from promptlab.errors import DataError
from promptlab.metrics import (
    classification_metrics,
    compute_task_metrics,
    exact_match_metrics,
    format_metrics_table,
    higher_is_better,
    intent_slot_metrics,
    metric_scale,
    normalize_answer,
    parse_intent_slot,
    primary_metric,
    primary_score,
    squad_exact_match,
    squad_f1,
    squad_metrics,
)

# ------------------------------------------------------------------------------------------------
# classification


def test_classification_hand_computed():
    refs = ["pos", "pos", "neg", "neg", "neu"]
    preds = [" POS ", "neg", "neg", "neg", "pos"]  # normalised: pos neg neg neg pos
    m = classification_metrics(preds, refs)
    assert m["labels"] == ["neg", "neu", "pos"]  # sorted union of references
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    # neg: tp 2, predicted 3, support 2 -> p 2/3, r 1, f1 0.8
    expected_neg = {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["per_label"]["neg"] == pytest.approx(expected_neg)
    # neu: never predicted -> p 0, r 0, f1 0
    assert m["per_label"]["neu"]["f1"] == 0.0
    # pos: tp 1, predicted 2, support 2 -> p 0.5, r 0.5, f1 0.5
    assert m["per_label"]["pos"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0 + 0.5) / 3)
    # rows = reference (neg, neu, pos), columns = prediction
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 0, 1], [1, 0, 1]]
    assert m["n_invalid"] == 0


def test_classification_given_labels_and_invalid_predictions():
    refs = ["positive", "negative", "neutral"]
    preds = ["positive", "positive sentiment", "neutral"]  # no first-word matching: 2nd is invalid
    m = classification_metrics(preds, refs, labels=["negative", "neutral", "positive"])
    assert m["labels"] == ["negative", "neutral", "positive"]
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["n_invalid"] == 1
    assert m["confusion_matrix"] == [[0, 0, 0], [0, 1, 0], [0, 0, 1]]  # invalid has no column
    assert m["per_label"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_classification_reference_outside_label_set_raises():
    with pytest.raises(DataError, match="maybe"):
        classification_metrics(["a"], ["maybe"], labels=["yes", "no"])


def test_length_mismatch_raises():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(DataError):
        squad_metrics(["a"], [])
    with pytest.raises(DataError):
        intent_slot_metrics([], ["Intent: x"])


def test_empty_inputs_score_zero():
    assert classification_metrics([], [])["accuracy"] == 0.0
    assert squad_metrics([], []) == {"exact_match": 0.0, "f1": 0.0, "n": 0}


# ------------------------------------------------------------------------------------------------
# SQuAD


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat sat.", "cat sat"),
        ("  an   apple, a  pear!  ", "apple pear"),
        ("The-Cat", "thecat"),  # punctuation goes first, so "the" is glued and survives
        ("theatre", "theatre"),  # articles only as whole words
        ("A", ""),
        ("Élan (1999)", "élan 1999"),
    ],
)
def test_normalize_answer_matches_official(raw, expected):
    assert normalize_answer(raw) == expected


def test_squad_exact_and_f1_hand_computed():
    assert squad_exact_match("The Eiffel Tower", "eiffel tower.")
    assert not squad_exact_match("Eiffel", "eiffel tower")
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: overlap 2, p 2/3, r 1 -> f1 0.8
    assert squad_f1("the Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    # repeated words count only as often as they appear on both sides: overlap 1, p 1/2, r 1 -> 2/3
    assert squad_f1("paris paris", "paris") == pytest.approx(2 / 3)
    assert squad_f1("london", "paris") == 0.0
    assert squad_f1("the", "a") == 0.0  # both empty after normalisation: 0, as in v1.1


def test_squad_metrics_max_over_references_in_percent():
    preds = ["Denver Broncos", "Santa Clara", "nothing"]
    refs = [
        ["Denver Broncos", "Broncos"],  # EM 1, F1 1
        ["Levi's Stadium", "Santa Clara, California"],  # EM 0, F1 max: 2 of 2 pred, 2 of 3 gold -> 0.8
        ["Carolina"],  # 0, 0
    ]
    m = squad_metrics(preds, refs)
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_squad_metrics_without_answers_raises():
    with pytest.raises(DataError, match="example 0"):
        squad_metrics(["x"], [[]])


# ------------------------------------------------------------------------------------------------
# intent and slot


def test_parse_intent_slot_well_formed():
    text = "Intent: alarm_set\nSlots: date(tomorrow), time(six am)"
    assert parse_intent_slot(text) == ("alarm_set", [("date", "tomorrow"), ("time", "six am")])
    assert parse_intent_slot("Intent: alarm_query\nSlots: None") == ("alarm_query", [])


def test_parse_intent_slot_commas_inside_words():
    text = "Intent: weather_query\nSlots: place_name(Philadelphia, PA), date(today)"
    assert parse_intent_slot(text)[1] == [("place_name", "philadelphia, pa"), ("date", "today")]


def test_parse_intent_slot_marks_in_the_utterance():
    text = "Intent: alarm_set\nSlots: wake me up at [time : Six AM] [date:tomorrow] please"
    assert parse_intent_slot(text) == ("alarm_set", [("time", "six am"), ("date", "tomorrow")])
    # an utterance without marks has no slots, and a mark cut off by the token budget is not one
    assert parse_intent_slot("Intent: alarm_query\nSlots: what alarms do i have")[1] == []
    assert parse_intent_slot("Intent: alarm_set\nSlots: at [time : six am] [date : tomor")[1] == [("time", "six am")]


def test_parse_intent_slot_listed_as_type_equals_words():
    text = "Intent: weather_query\nSlots: place_name = Philadelphia,  PA; date=today;"
    assert parse_intent_slot(text) == ("weather_query", [("place_name", "philadelphia, pa"), ("date", "today")])
    # either notation reads the same slots; "=" inside a "type(words)" list is not read as a listed slot
    assert parse_intent_slot("Intent: x\nSlots: time = six am; date = tomorrow")[1] == \
        parse_intent_slot("Intent: x\nSlots: time(six am), date(tomorrow)")[1]
    assert parse_intent_slot("Intent: x\nSlots: math_term(2 + 2 = 4)")[1] == [("math_term", "2 + 2 = 4")]
    assert parse_intent_slot("Intent: x\nSlots: None")[1] == []


def test_parse_intent_slot_listed_as_words_then_type():
    text = "Intent: weather_query\nSlots: Philadelphia, PA -> place_name; today->date"
    assert parse_intent_slot(text) == ("weather_query", [("place_name", "philadelphia, pa"), ("date", "today")])
    assert parse_intent_slot("Intent: x\nSlots: six am -> time; tomorr")[1] == [("time", "six am")]  # cut off


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", (None, [])),
        ("garbage without markers", (None, [])),
        (None, (None, [])),
        ("Intent:\nSlots: date(today)", (None, [("date", "today")])),
        ("Intent: play_music Slots: song_name(hey jude)", ("play_music", [("song_name", "hey jude")])),
        ("Intent: alarm_set\nSlots: date(tomorr", ("alarm_set", [])),  # truncated generation
        ("Intent: alarm_set\nSlots: date(today), time(", ("alarm_set", [("date", "today")])),
        # a model that runs on into the next example: only the first label counts
        ("Intent: alarm_set\nSlots: None\nIntent: x\nSlots: date(today)", ("alarm_set", [])),
        ("intent :  Alarm_Set  \nslots: Date( six  AM )", ("alarm_set", [("date", "six am")])),
        # slots first, on one line or two
        ("Slots: at [time : six am]\nIntent: alarm_set", ("alarm_set", [("time", "six am")])),
        ("Slots: date(today) Intent: alarm_set", ("alarm_set", [("date", "today")])),
    ],
)
def test_parse_intent_slot_tolerates_garbage(text, expected):
    assert parse_intent_slot(text) == expected


def test_intent_slot_metrics_hand_computed():
    refs = [
        "Intent: alarm_set\nSlots: date(tomorrow), time(six am)",
        "Intent: play_music\nSlots: None",
        "Intent: weather_query\nSlots: date(today)",
    ]
    preds = [
        "Intent: alarm_set\nSlots: time(six am), date(tomorrow)",  # all right, order differs
        "Intent: play_radio\nSlots: None",  # wrong intent, no slots
        "Intent: weather_query\nSlots: date(tomorrow), place_name(paris)",  # 2 wrong slots
    ]
    m = intent_slot_metrics(preds, refs)
    assert m["n"] == 3
    assert m["intent_accuracy"] == pytest.approx(2 / 3)
    # correct slots 2; predicted 4; gold 3
    assert m["slot_precision"] == pytest.approx(2 / 4)
    assert m["slot_recall"] == pytest.approx(2 / 3)
    assert m["slot_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["exact_match"] == pytest.approx(1 / 3)


def test_slot_needs_both_type_and_words_and_counts_multisets():
    refs = ["Intent: a\nSlots: date(today), date(today)"]
    # type right words wrong, words right type wrong, and one duplicate too many
    preds = ["Intent: a\nSlots: date(tonight), time(today), date(today), date(today), date(today)"]
    m = intent_slot_metrics(preds, refs)
    assert m["slot_precision"] == pytest.approx(2 / 5)
    assert m["slot_recall"] == pytest.approx(1.0)
    assert m["exact_match"] == 0.0


def test_intent_slot_unparseable_prediction_is_wrong_and_no_slots_is_perfect():
    m = intent_slot_metrics(["???", "Intent: b\nSlots: None"], ["Intent: a\nSlots: None"] * 2)
    assert m["intent_accuracy"] == 0.0
    # no slot predicted and none expected anywhere: nothing was missed or invented
    assert (m["slot_precision"], m["slot_recall"], m["slot_f1"]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# generic, dispatch, table


def test_exact_match_metrics_strips_only():
    m = exact_match_metrics([" yes ", "No", "maybe"], ["yes", "no", "maybe\n"])
    assert m == {"exact_match": pytest.approx(2 / 3), "n": 3}


def test_compute_task_metrics_dispatch():
    sentiment = compute_task_metrics(
        "sentiment", ["positive", "neutral"], [{"label": "positive"}, {"label": "negative"}]
    )
    assert sentiment["labels"] == ["negative", "neutral", "positive"]
    assert sentiment["accuracy"] == 0.5

    squad = compute_task_metrics(
        "squad",
        ["broncos", "paris"],
        [{"answer": "Denver", "answers": ["Denver", "Broncos"]}, {"answer": "Paris"}],
    )
    assert squad["exact_match"] == pytest.approx(100.0)

    label = "Intent: a\nSlots: None"
    intent = compute_task_metrics("intent_and_slot", [label], [{"label": label}])
    assert intent["intent_accuracy"] == 1.0 and intent["exact_match"] == 1.0

    other = compute_task_metrics("boolq", ["true", "false"], [{"label": "true"}, {"label": "true"}])
    assert other == {"exact_match": 0.5, "n": 2}
    custom = pl.TaskTemplate("boolq", "{passage} {target}", 0, answer_field="target")
    assert compute_task_metrics(custom, ["yes"], [{"target": "yes"}])["exact_match"] == 1.0


def test_a_task_defined_only_by_its_template_gets_its_metric():
    """The metric, labels and answer field come from the template: no task name is special."""
    topic = pl.TaskTemplate("topic", "{text} topic: {category}", 0, answer_field="category",
                            metric="classification", labels=["alarm", "music", "weather"])
    m = compute_task_metrics(topic, ["alarm", "music", "alarm"], [{"category": c} for c in ("alarm", "weather", "alarm")])
    assert m["labels"] == ["alarm", "music", "weather"] and m["accuracy"] == pytest.approx(2 / 3)
    assert primary_metric(topic) == "accuracy" and primary_score(topic, m) == pytest.approx(2 / 3)
    summary = pl.TaskTemplate("summary", "{text} TL;DR: {summary}", 0, answer_field="summary", metric="rouge_l")
    r = compute_task_metrics(summary, ["the cat sat on the mat", "dogs"], [{"summary": "the cat is on the mat"},
                                                                           {"summary": "cats"}])
    assert r["rouge_l"] == pytest.approx((5 / 6 + 0) / 2) and r["n"] == 2  # LCS 5 of 6 words; nothing shared
    qa = pl.TaskTemplate("qa", "{q} A: {reply}", 0, answer_field="reply", metric="squad")
    assert compute_task_metrics(qa, ["Paris"], [{"reply": "paris"}])["f1"] == 100.0
    assert primary_score(qa, {"f1": 50.0}) == 0.5  # percentages to the 0..1 scale
    assert metric_scale(qa) == 100.0 and metric_scale("squad") == 100.0 and metric_scale(summary) == 1.0


@pytest.mark.parametrize("settings, message", [
    ({"metric": "bleu"}, "unknown metric 'bleu'"),
    ({"metric": "classification"}, "needs its labels"),
    ({"labels": ["a", "b"]}, "labels are the classes of metric 'classification'"),
    ({"metric": "classification", "labels": ["a", "a"]}, "distinct"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"stop": "\n"}, "stop must be a list"),
    ({"recipe": {"method": "lora"}}, "recipe method must be one of"),
    ({"recipe": {"method": "prompt_tuning", "encoder": "lstm"}}, r"unknown recipe key\(s\) \['encoder'\]"),
])
def test_inconsistent_task_settings_name_the_task(settings, message):
    with pytest.raises(pl.TemplateError, match=rf"task 'mine': .*{message}"):
        pl.TaskTemplate("mine", "{x} => {y}", 0, answer_field="y", **settings)


def test_compute_task_metrics_missing_field_names_record():
    with pytest.raises(DataError, match="record 1 has no 'label'"):
        records = [{"label": "positive"}, {"sentence": "x"}]
        compute_task_metrics("sentiment", ["positive", "positive"], records)


def test_primary_metric_and_direction():
    assert primary_metric("sentiment") == "accuracy"
    assert primary_metric("squad") == "f1"
    assert primary_metric("intent_and_slot") == "intent_accuracy"
    assert primary_metric("anything_else") == "exact_match"
    for task in ["sentiment", "squad", "intent_and_slot", "x"]:
        assert higher_is_better(primary_metric(task))
    assert not higher_is_better("val_loss")
    assert not higher_is_better("val/loss")


def test_format_metrics_table():
    results = {
        "sentiment": {"accuracy": 0.875, "macro_f1": 0.8, "n": 8, "per_label": {}, "labels": ["a"]},
        "squad": {"exact_match": 50.0, "f1": 62.5, "n": 2},
    }
    lines = format_metrics_table(results).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["task", "accuracy", "macro_f1", "exact_match", "f1", "n"]  # n last, no nested
    assert set(lines[1]) <= set("|-:")  # Markdown separator row
    assert cells[2] == ["sentiment", "0.8750", "0.8000", "-", "-", "8"]
    assert cells[3] == ["squad", "-", "-", "50.0000", "62.5000", "2"]
    assert len({len(line) for line in lines}) == 1  # padded: columns line up as plain text


def test_intervals():
    from promptlab.metrics import bootstrap_interval, wilson_interval

    low, high = wilson_interval(200, 227)
    assert low == pytest.approx(0.8325, abs=1e-4) and high == pytest.approx(0.9170, abs=1e-4)  # worked by hand
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    values = [1.0] * 90 + [0.0] * 10
    low, high = bootstrap_interval(values, seed=1)
    assert low < 0.9 < high and high - low < 0.15
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)  # seeded
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
