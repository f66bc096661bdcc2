"""Scoring a model on records: generation or label ranking, then each task's metrics."""
from __future__ import annotations

import random

from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from .data.features import collate, encode_records
from .data.sources import as_records
from .metrics import compute_task_metrics



def group_by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Record indices per task, in first-seen task order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["taskname"]].append(i)
    return dict(groups)


def sample_per_task(records: Sequence[Mapping[str, Any]], n: int, seed: int = 0) -> list[Mapping[str, Any]]:
    """At most ``n`` records of each task, drawn at random (fixed by ``seed``) from the whole split, not its
    first records (which often come from one article or one class); kept in their original order."""
    by_task: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[r.get("taskname")].append(i)
    rng = random.Random(seed)
    keep = sorted(i for idx in by_task.values() for i in (rng.sample(idx, n) if len(idx) > n else idx))
    return [records[i] for i in keep]


def answer_text(generated: str) -> str:
    """A generated continuation as the answer the metrics score: without surrounding whitespace (a sentiment
    answer follows "sentiment:" and starts with a space, an intent answer starts on a new line)."""
    return generated.strip()


def predict(model, records: Sequence[Mapping[str, Any]], max_new_tokens: int | Mapping[str, int] | None = None,
            batch_size: int = 16) -> list[str]:
    """Greedy answers for every record; tasks are generated in groups with their own token budgets and
    stop strings (their templates' ``max_new_tokens`` and ``stop``, unless ``max_new_tokens`` is given)."""
    out = [""] * len(records)
    for task, idx in group_by_task(records).items():
        template = model.tasks[task]
        budget = (max_new_tokens.get(task) if isinstance(max_new_tokens, Mapping) else max_new_tokens) or \
            template.max_new_tokens
        texts = model.generate([records[i] for i in idx], max_new_tokens=budget, batch_size=batch_size,
                               stop=template.stop)
        for i, t in zip(idx, texts):
            out[i] = answer_text(t)
    return out


@torch.no_grad()
def rank_labels(model, records: Sequence[Mapping[str, Any]], labels: Sequence[str], answer_field: str = "label",
                batch_size: int = 16) -> list[str]:
    """For each record, the candidate label with the highest log-likelihood (answer tokens plus EOS)."""
    candidates = [{**r, answer_field: label} for r in records for label in labels]
    examples, _ = encode_records(candidates, model.tasks, model.tokenizer, model.max_seq_length, strict=True)
    scores = torch.empty(len(examples))
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, model.tokenizer.pad_token_id, "right")
        mean = model(batch, reduction="none")  # (B,) mean loss per answer token
        counts = (batch["labels"][:, 1:] != -100).sum(1).to(mean.device)
        scores[start : start + len(chunk)] = -(mean * counts).cpu()  # total log-likelihood
    model.train(was_training)
    best = scores.view(len(records), len(labels)).argmax(1)
    return [labels[i] for i in best.tolist()]


def evaluate(model, records: Sequence[Mapping[str, Any]], max_new_tokens: int | Mapping[str, int] | None = None,
             batch_size: int = 16, rank: bool = True) -> dict[str, dict]:
    """Per-task metrics, each task's by its template's metric. A task with ``labels`` (classification) also
    gets ``ranked_accuracy`` (its labels ranked by likelihood) beside the accuracy of its greedy
    generation, unless ``rank`` is off. Each task's result holds its ``predictions`` too."""
    records = as_records(records, "evaluate")
    predictions = predict(model, records, max_new_tokens, batch_size)
    results = {}
    for task, idx in group_by_task(records).items():
        recs = [records[i] for i in idx]
        preds = [predictions[i] for i in idx]
        template = model.tasks[task]
        metrics = compute_task_metrics(template, preds, recs)
        if template.labels and rank:
            ranked = rank_labels(model, recs, template.labels, template.answer_field, batch_size=batch_size)
            metrics["ranked_accuracy"] = compute_task_metrics(template, ranked, recs)["accuracy"]
        metrics["predictions"] = preds
        results[task] = metrics
    return results
