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

# The instruction of a task whose template names none (its ``instruction`` replaces the virtual tokens).
GENERIC_INSTRUCTION = "Complete the text.\n"
FEW_SHOT_SEPARATOR = "\n\n"


def _instruction(template: TaskTemplate) -> str:
    return template.instruction or GENERIC_INSTRUCTION


def _body(template: TaskTemplate) -> str:
    """The template text without its virtual-token markers."""
    return re.sub(r"  +", " ", MARKER_RE.sub("", template.prompt_template)).strip(" ")


def _plain(template: TaskTemplate, text: str) -> TaskTemplate:
    """The same task (metric, labels, budget, ...) with ``text`` as its template and no virtual tokens."""
    return TaskTemplate(**{**template.to_dict(), "prompt_template": text, "total_virtual_tokens": 0,
                           "virtual_token_splits": None})


def zero_shot_template(template: TaskTemplate) -> TaskTemplate:
    """The task's template with its virtual tokens replaced by one hand-written instruction in front."""
    return _plain(template, _escape(_instruction(template)) + _body(template))


def few_shot_template(template: TaskTemplate, shots: Sequence[Mapping[str, Any]]) -> TaskTemplate:
    """The zero-shot template with ``shots`` solved examples between the instruction and the query."""
    body = _body(template)
    solved = "".join(_escape(_plain(template, body).render(s)) + FEW_SHOT_SEPARATOR for s in shots)
    return _plain(template, _escape(_instruction(template)) + solved + body)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def pick_shots(train_records: Sequence[Mapping[str, Any]], task: str, k: int, seed: int = 0,
               max_chars: int = 600, answer_field: str | None = "label") -> list[Mapping[str, Any]]:
    """k training records of the task, one per distinct answer first (every class of a classification
    task, when k allows), short ones preferred."""
    pool = [r for r in train_records if r.get("taskname") == task]
    if not pool:
        raise ConfigError(f"few-shot baseline: no training record of task {task!r} to take examples from")
    rng = random.Random(seed)
    pool = [r for r in pool if sum(len(str(v)) for v in r.values()) <= max_chars] or pool
    rng.shuffle(pool)
    shots, seen = [], set()
    for r in pool:  # cover the answers first (the labels of a classification task), then fill up
        if r.get(answer_field) not in seen and len(shots) < k:
            shots.append(r)
            seen.add(r.get(answer_field))
    shots += [r for r in pool if r not in shots][: k - len(shots)]
    return shots[:k]


def baseline_tasks(tasks: Mapping[str, TaskTemplate], kind: str,
                   train_records: Sequence[Mapping[str, Any]] | None = None, k: int = 3,
                   seed: int = 0) -> dict[str, TaskTemplate]:
    """Templates of a baseline: ``kind`` is "zero-shot" or "few-shot" (k examples from ``train_records``;
    one for a task with a truncate field, whose long inputs would not fit several)."""
    if kind == "zero-shot":
        return {name: zero_shot_template(t) for name, t in tasks.items()}
    if kind == "few-shot":
        if not train_records:
            raise ConfigError("the few-shot baseline needs training records to take examples from")
        out = {}
        for name, t in tasks.items():
            if any(r.get("taskname") == name for r in train_records):
                shots = pick_shots(train_records, name, 1 if t.truncate_field else k, seed,
                                   answer_field=t.answer_field)
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
