"""Baselines without learned prompts: the same frozen model with a hand-written instruction (zero-shot)
or with k solved examples before the query (few-shot). They score with the same metrics, so every
learned prompt is shown beside what the frozen model does alone.
"""
from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .templates import MARKER_RE, TaskTemplate

# What each virtual-token run is replaced with in the zero-shot template.
INSTRUCTIONS = {
    "sentiment": "Classify the sentiment of this financial news as positive, neutral or negative.\n",
    "intent_and_slot": "Predict the intent and the slots of the utterance, formatted as "
                       "'Intent: <intent>' then 'Slots: type(words), ...' or 'Slots: None'.\n",
    "squad": "Answer the question with a short span copied from the context.\n",
}
GENERIC_INSTRUCTION = "Complete the text.\n"
FEW_SHOT_SEPARATOR = "\n\n"


def _instruction(task: str) -> str:
    return INSTRUCTIONS.get(task, GENERIC_INSTRUCTION)


def _body(template: TaskTemplate) -> str:
    """The template text without its virtual-token markers."""
    return re.sub(r"  +", " ", MARKER_RE.sub("", template.prompt_template)).strip(" ")


def _plain(template: TaskTemplate, text: str) -> TaskTemplate:
    return TaskTemplate(template.taskname, text, 0, [], template.truncate_field, template.answer_field,
                        template.answer_only_loss)


def zero_shot_template(template: TaskTemplate) -> TaskTemplate:
    """The task's template with its virtual tokens replaced by one hand-written instruction in front."""
    return _plain(template, _escape(_instruction(template.taskname)) + _body(template))


def few_shot_template(template: TaskTemplate, shots: Sequence[Mapping[str, Any]]) -> TaskTemplate:
    """The zero-shot template with ``shots`` solved examples between the instruction and the query."""
    body = _body(template)
    solved = "".join(_escape(_plain(template, body).render(s)) + FEW_SHOT_SEPARATOR for s in shots)
    return _plain(template, _escape(_instruction(template.taskname)) + solved + body)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def pick_shots(train_records: Sequence[Mapping[str, Any]], task: str, k: int, seed: int = 0,
               max_chars: int = 600) -> list[Mapping[str, Any]]:
    """k training records of the task, one per label first when the task has labels, short ones preferred."""
    pool = [r for r in train_records if r.get("taskname") == task]
    if not pool:
        raise ConfigError(f"few-shot baseline: no training record of task {task!r} to take examples from")
    rng = random.Random(seed)
    pool = [r for r in pool if sum(len(str(v)) for v in r.values()) <= max_chars] or pool
    rng.shuffle(pool)
    shots, seen = [], set()
    for r in pool:  # cover the labels first (sentiment), then fill up
        if r.get("label") not in seen and len(shots) < k:
            shots.append(r)
            seen.add(r.get("label"))
    shots += [r for r in pool if r not in shots][: k - len(shots)]
    return shots[:k]


def baseline_tasks(tasks: Mapping[str, TaskTemplate], kind: str,
                   train_records: Sequence[Mapping[str, Any]] | None = None, k: int = 3,
                   seed: int = 0) -> dict[str, TaskTemplate]:
    """Templates of a baseline: ``kind`` is "zero-shot" or "few-shot" (k examples from ``train_records``)."""
    if kind == "zero-shot":
        return {name: zero_shot_template(t) for name, t in tasks.items()}
    if kind == "few-shot":
        if not train_records:
            raise ConfigError("the few-shot baseline needs training records to take examples from")
        out = {}
        for name, t in tasks.items():
            if any(r.get("taskname") == name for r in train_records):
                shots = pick_shots(train_records, name, 1 if name == "squad" else k, seed)
                out[name] = few_shot_template(t, shots)
        return out
    raise ConfigError(f"unknown baseline {kind!r}; choose zero-shot or few-shot")


def baseline_model(base, tasks: Mapping[str, TaskTemplate], kind: str,
                   train_records: Sequence[Mapping[str, Any]] | None = None, k: int = 3, seed: int = 0,
                   max_seq_length: int = 1024):
    """A `PromptLearningModel` with no learned prompt, whose templates are the baseline's."""
    from .model import PromptLearningModel

    return PromptLearningModel(base, baseline_tasks(tasks, kind, train_records, k, seed),
                               max_seq_length=max_seq_length)
