"""Task metrics: classification accuracy and macro-F1, SQuAD v1.1 EM/F1, intent accuracy and slot F1,
exact match, ROUGE-L. Which one a task gets is its template's ``metric`` (tasks.yaml), never its name.

Pure Python on lists of strings, so it runs anywhere (training loop, CLI, notebooks) without torch.

Scales: classification and intent/slot metrics are fractions in [0, 1]; SQuAD metrics are percentages,
like the official SQuAD v1.1 evaluation script, so its numbers compare directly with published ones.
Every metric this module returns is "higher is better" (see `higher_is_better`).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence

from promptlab.errors import DataError

# The headline value of each metric kind: picks the best checkpoint, compares methods. All higher-is-better.
_PRIMARY_METRICS = {
    "classification": "accuracy",
    "squad": "f1",
    "intent_and_slot": "intent_accuracy",
    "exact_match": "exact_match",
    "rouge_l": "rouge_l",
}
_PERCENT_METRICS = {"squad"}  # reported in percent, like the official SQuAD script


# --------------------------------------------------------------------------------------------------
# helpers


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Raise DataError when predictions and references do not pair up one to one."""
    if len(predictions) != len(references):
        raise DataError(
            f"got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (scikit-learn's zero_division=0)."""
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall; 0.0 when both are 0."""
    return _ratio(2 * precision * recall, precision + recall)


def _normalize_label(text: str) -> str:
    """Strip surrounding whitespace and lowercase: the only normalisation classification applies."""
    return str(text).strip().lower()


# --------------------------------------------------------------------------------------------------
# classification


def classification_metrics(
    predictions: list[str], references: list[str], labels: list[str] | None = None
) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1 and a confusion matrix.

    Predictions and references are normalised by stripping whitespace and lowercasing, nothing more:
    a generation like "positive sentiment" does not count as "positive" (map generations to labels
    before calling this if you want that).

    The label set is `labels` (normalised) or, when None, the sorted set of normalised references.
    A prediction outside the label set is simply wrong: it is a false negative of its reference label,
    is tallied in "n_invalid", and has no column in the confusion matrix (so a matrix row can sum to
    less than that label's support). A reference outside a given label set raises DataError.

    Returns a dict with "accuracy", "macro_f1" (unweighted mean of per-label F1 over the label set; a
    label never predicted or never present scores 0), "n", "n_invalid", "labels", "per_label"
    ({label: {"precision", "recall", "f1", "support"}}) and "confusion_matrix" (nested list,
    rows = reference label, columns = predicted label, both in "labels" order).
    """
    _check_lengths(predictions, references)
    preds = [_normalize_label(p) for p in predictions]
    refs = [_normalize_label(r) for r in references]
    label_set = _label_order(refs, labels)
    matrix = _confusion_matrix(preds, refs, label_set)
    support = Counter(refs)

    per_label = {}
    for i, label in enumerate(label_set):
        predicted = sum(row[i] for row in matrix)
        precision = _ratio(matrix[i][i], predicted)
        recall = _ratio(matrix[i][i], support[label])
        per_label[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": support[label],
        }

    correct = sum(matrix[i][i] for i in range(len(label_set)))
    return {
        "accuracy": _ratio(correct, len(refs)),
        "macro_f1": _ratio(sum(s["f1"] for s in per_label.values()), len(per_label)),
        "n": len(refs),
        "n_invalid": sum(pred not in per_label for pred in preds),
        "labels": label_set,
        "per_label": per_label,
        "confusion_matrix": matrix,
    }


def _label_order(refs: list[str], labels: list[str] | None) -> list[str]:
    """The label set in a fixed order; checks that every reference belongs to it."""
    if labels is None:
        return sorted(set(refs))
    label_set = list(dict.fromkeys(_normalize_label(label) for label in labels))
    unknown = sorted(set(refs) - set(label_set))
    if unknown:
        raise DataError(f"reference labels {unknown} are not in the label set {label_set}")
    return label_set


def _confusion_matrix(preds: list[str], refs: list[str], label_set: list[str]) -> list[list[int]]:
    """Counts [reference][prediction] over label_set; predictions outside it are left out."""
    index = {label: i for i, label in enumerate(label_set)}
    matrix = [[0] * len(label_set) for _ in label_set]
    for pred, ref in zip(preds, refs):
        if pred in index:
            matrix[index[ref]][index[pred]] += 1
    return matrix


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1 (same normalisation and scoring as the official evaluate-v1.1.py)

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, drop punctuation, drop a/an/the, collapse spaces.

    The order matters and matches the official script: "The-Cat" -> "thecat" (punctuation is removed
    before articles, so the hyphen joins the words and "the" is no longer a separate word).
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(pred: str, gold: str) -> bool:
    """True when the normalised prediction equals the normalised gold answer."""
    return normalize_answer(pred) == normalize_answer(gold)


def squad_f1(pred: str, gold: str) -> float:
    """Token-overlap F1 in [0, 1] between the normalised prediction and gold answer.

    As in the official v1.1 script, an empty side (after normalisation) scores 0, even when both are
    empty.
    """
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    # Counter intersection counts a repeated word only as often as it appears on both sides.
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return _f1(precision, recall)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """SQuAD v1.1 scores: {"exact_match": %, "f1": %, "n"}.

    Each prediction is scored against each of its reference answers and keeps the best score, then
    scores are averaged over examples and multiplied by 100, like the official script. An example
    with no reference answers raises DataError (the official script would crash on it too).
    """
    _check_lengths(predictions, references)
    exact_total = f1_total = 0.0
    for i, (pred, golds) in enumerate(zip(predictions, references)):
        if isinstance(golds, str):
            golds = [golds]  # a lone answer string is a common slip; treat it as one answer
        if not golds:
            raise DataError(f"example {i} has no reference answers")
        exact_total += max(float(squad_exact_match(pred, gold)) for gold in golds)
        f1_total += max(squad_f1(pred, gold) for gold in golds)
    n = len(predictions)
    return {"exact_match": 100.0 * _ratio(exact_total, n), "f1": 100.0 * _ratio(f1_total, n), "n": n}


# --------------------------------------------------------------------------------------------------
# intent and slot

# "type(words)": the type has no spaces, commas or parentheses; words have no parentheses but may
# hold commas ("place_name(philadelphia, pa)"), so splitting the slot list on commas would be wrong.
_SLOT = re.compile(r"([^\s,()]+)\s*\(([^()]*)\)")
# "[type : words]": a slot marked inside the utterance itself ("wake me up at [time : six am]")
_INLINE_SLOT = re.compile(r"\[\s*([^\s\[\]:]+)\s*:\s*([^\[\]]*?)\s*\]")
# "type = words; ...": the words follow a space, as they do in the utterance, so they are the same tokens
_ASSIGNED_SLOT = re.compile(r"([^\s,;()=\[\]]+)\s*=\s*([^;=]*?)\s*(?:;|$)")
# "words -> type; ...": the same, each slot's words first and its type after them
_NAMED_SPAN = re.compile(r"\s*([^;]*?)\s*->\s*([^\s,;()=\[\]]+)\s*(?:;|$)")
_INTENT = re.compile(r"intent\s*:", re.IGNORECASE)
_SLOTS = re.compile(r"slots\s*:", re.IGNORECASE)


def _normalize_words(text: str) -> str:
    """Lowercase and collapse whitespace, so "Six  AM" and "six am" are the same slot value."""
    return " ".join(text.lower().split())


def _line_after(text: str, marker: re.Pattern, stop: re.Pattern) -> str | None:
    """The rest of the line after the first ``marker`` in ``text``, cut where ``stop`` begins on it (the other
    line's marker, when a newline is missing); None when there is no ``marker``."""
    found = marker.search(text)
    if not found:
        return None
    line = text[found.end() :].split("\n", 1)[0]
    cut = stop.search(line)
    return line[: cut.start()] if cut else line


def parse_intent_slot(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Parse "Intent: <intent>\\nSlots: type(words), ..." (or "Slots: None") into (intent, slots).

    The slot line may instead be the utterance with its slots marked in place, "Slots: wake me up at
    [time : six am]" (read so whenever the line holds a "[type : words]" mark), or, when it holds no
    "type(words)", list the slots as "Slots: time = six am; date = tomorrow" or "Slots: six am -> time;
    tomorrow -> date".

    Never raises: generated text may be malformed, so this returns whatever can be read.
    - intent: the text after the first "Intent:" up to the end of that line (or up to "Slots:" if the
      newline is missing), stripped and lowercased; None when there is no "Intent:" or nothing after it.
    - slots: every "type(words)" on the line after the first "Slots:" (trailing lines are ignored, e.g. a
      model that runs on into another example); the two lines may come in either order. Types and words
      are lowercased with whitespace collapsed. "None", no "Slots:" at all, or no parseable slot give [].
    """
    if not isinstance(text, str):
        return None, []
    intent_line = _line_after(text, _INTENT, _SLOTS)
    intent = (intent_line.strip().lower() or None) if intent_line is not None else None
    slot_line = _line_after(text, _SLOTS, _INTENT)
    if slot_line is None:
        return intent, []
    found = (_INLINE_SLOT.findall(slot_line) or _SLOT.findall(slot_line) or _ASSIGNED_SLOT.findall(slot_line)
             or [(slot_type, words) for words, slot_type in _NAMED_SPAN.findall(slot_line)])
    slots = [(_normalize_words(slot_type), _normalize_words(words)) for slot_type, words in found]
    return intent, slots


def intent_slot_metrics(predictions: list[str], references: list[str]) -> dict:
    """Intent accuracy, slot precision/recall/F1 and exact match for intent-and-slot labels.

    Both sides are parsed with `parse_intent_slot`. A predicted intent is correct when it equals the
    reference intent (an unparseable prediction, intent None, is always wrong). A slot is correct only
    when its type and its words both match a reference slot; slots are compared as multisets per
    example and counted micro-averaged over all examples. With no predicted slots anywhere precision
    is 0 unless there are no reference slots either (then 1); recall likewise. An example is an exact
    match when the intent is correct and the slot multisets are equal (order does not matter).
    Returns fractions in [0, 1] plus "n".
    """
    _check_lengths(predictions, references)
    intent_correct = exact = 0
    slot_correct = slot_predicted = slot_gold = 0
    for pred_text, ref_text in zip(predictions, references):
        pred_intent, pred_slots = parse_intent_slot(pred_text)
        ref_intent, ref_slots = parse_intent_slot(ref_text)
        intent_ok = pred_intent is not None and pred_intent == ref_intent
        pred_counts, ref_counts = Counter(pred_slots), Counter(ref_slots)
        intent_correct += intent_ok
        exact += intent_ok and pred_counts == ref_counts
        slot_correct += sum((pred_counts & ref_counts).values())
        slot_predicted += len(pred_slots)
        slot_gold += len(ref_slots)

    no_slots_anywhere = slot_predicted == 0 and slot_gold == 0
    precision = 1.0 if no_slots_anywhere else _ratio(slot_correct, slot_predicted)
    recall = 1.0 if no_slots_anywhere else _ratio(slot_correct, slot_gold)
    n = len(predictions)
    return {
        "intent_accuracy": _ratio(intent_correct, n),
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": _f1(precision, recall),
        "exact_match": _ratio(exact, n),
        "n": n,
    }


# --------------------------------------------------------------------------------------------------
# generic and dispatch


def exact_match_metrics(predictions: list[str], references: list[str]) -> dict:
    """{"exact_match": fraction of predictions equal to their reference after strip(), "n"}.

    Case and inner whitespace matter; use this for tasks without a dedicated metric.
    """
    _check_lengths(predictions, references)
    matches = sum(str(p).strip() == str(r).strip() for p, r in zip(predictions, references))
    return {"exact_match": _ratio(matches, len(predictions)), "n": len(predictions)}


def _field(records: list[dict], i: int, name: str, taskname: str):
    """records[i][name], or a DataError naming the task, the record and the field."""
    try:
        return records[i][name]
    except KeyError:
        raise DataError(f"task {taskname!r}: record {i} has no {name!r} field to score against") from None


def rouge_l_metrics(predictions: list[str], references: list[str]) -> dict:
    """{"rouge_l": mean ROUGE-L F-measure, "n"}: longest common subsequence of words, as ROUGE-1.5.5
    computes it (the rouge-score package: offline, no metric download)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(str(r), str(p))["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"rouge_l": _ratio(sum(scores), len(scores)), "n": len(scores)}


def _squad_answers(records: list[dict], i: int, answer_field: str, taskname: str) -> list[str]:
    """The reference answers of a SQuAD-style record: its "answers" list, else its answer field."""
    answers = records[i].get("answers")
    return list(answers) if answers else [_field(records, i, answer_field, taskname)]


def _template(task):
    """A TaskTemplate, or a task name looked up in the tutorial's tasks.yaml (for notebooks and scripts
    that pass names); an unknown name scores by exact match on "label"."""
    if not isinstance(task, str):
        return task
    from promptlab.templates import TaskTemplate, default_tasks

    return default_tasks().get(task) or TaskTemplate(task, "{label}", 0, answer_field="label")


def compute_task_metrics(task, predictions: list[str], records: list[dict]) -> dict:
    """Score one task's predictions against its records with the metric its template names.

    ``task`` is the task's `TaskTemplate` (or its name, see `_template`). References are each record's
    answer field; SQuAD-style scoring uses every reference in the record's ``answers`` when it has them.
    """
    template = _template(task)
    name, field = template.taskname, template.answer_field or "label"
    _check_lengths(predictions, records)
    if template.metric == "squad":
        return squad_metrics(predictions, [_squad_answers(records, i, field, name) for i in range(len(records))])
    refs = [_field(records, i, field, name) for i in range(len(records))]
    if template.metric == "classification":
        return classification_metrics(predictions, refs, labels=template.labels)
    if template.metric == "intent_and_slot":
        return intent_slot_metrics(predictions, refs)
    if template.metric == "rouge_l":
        return rouge_l_metrics(predictions, refs)
    return exact_match_metrics(predictions, refs)


def primary_metric(task) -> str:
    """The metric that picks the best checkpoint and headlines a task's results (higher is better):
    accuracy (classification), f1 (squad), intent_accuracy, exact_match or rouge_l."""
    return _PRIMARY_METRICS[_template(task).metric]


def higher_is_better(metric_name: str) -> bool:
    """Whether a larger value of this metric is better.

    True for every metric this module computes; False only for losses (names ending in "loss"), which
    the trainer logs next to them.
    """
    return not metric_name.rsplit("/", 1)[-1].endswith("loss")


# --------------------------------------------------------------------------------------------------
# uncertainty


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): for an accuracy of ``successes`` out of
    ``n`` records. Unlike mean +- 2 SE it stays inside [0, 1] and behaves near 0 and 1."""
    if n <= 0:
        raise ValueError("an interval needs at least one record")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], seed: int = 0, rounds: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of per-record scores (e.g. SQuAD F1 per question)."""
    if not values:
        raise ValueError("an interval needs at least one record")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(rounds))
    tail = (1 - level) / 2
    return means[int(tail * rounds)], means[min(rounds - 1, int((1 - tail) * rounds))]


# --------------------------------------------------------------------------------------------------
# reporting


def _is_scalar(value) -> bool:
    """A number worth a table column (bool is excluded: it is an int subclass but not a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_cell(value) -> str:
    """Integers as they are, floats with 4 decimals, a missing metric as "-"."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def format_metrics_table(results: dict[str, dict]) -> str:
    """A Markdown table of per-task metrics: one row per task, one column per scalar metric.

    Columns are the scalar (int/float) metrics in order of first appearance, with "n" last; nested
    values (per-label scores, confusion matrices) are left out. A task lacking a metric shows "-".
    Cells are padded so the table also reads well as plain text.
    """
    columns: list[str] = []
    for metrics in results.values():
        for name, value in metrics.items():
            if _is_scalar(value) and name not in columns:
                columns.append(name)
    if "n" in columns:
        columns.remove("n")
        columns.append("n")

    header = ["task", *columns]
    rows = [
        [task, *(_format_cell(metrics.get(c) if _is_scalar(metrics.get(c)) else None) for c in columns)]
        for task, metrics in results.items()
    ]
    widths = [max(len(str(row[j])) for row in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        # Text columns (task names) align left, numbers right, as a reader expects.
        padded = [
            str(cell).ljust(w) if j == 0 else str(cell).rjust(w)
            for j, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join(
        "-" * (w + 1) + ":" if j else ":" + "-" * (w + 1) for j, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def metric_scale(task) -> float:
    """What the task's metrics are reported out of: 100 for percentages (SQuAD), else 1."""
    return 100.0 if _template(task).metric in _PERCENT_METRICS else 1.0


def primary_score(task, metrics: dict) -> float:
    """The task's primary metric on a 0..1 scale (SQuAD's percentages divided by 100), to compare tasks."""
    template = _template(task)  # a name is looked up once, not by each helper
    return float(metrics[primary_metric(template)]) / metric_scale(template)
