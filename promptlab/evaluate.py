"""Scoring a model on records: generation or label ranking, then each task's metrics."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from .data.features import collate, encode_records
from .metrics import compute_task_metrics

# New tokens to generate per task when none is given: enough for the longest typical answer.
MAX_NEW_TOKENS = {"sentiment": 4, "intent_and_slot": 40, "squad": 24}
DEFAULT_MAX_NEW_TOKENS = 30
SENTIMENT_LABELS = ("negative", "neutral", "positive")


def group_by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Record indices per task, in first-seen task order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r["taskname"]].append(i)
    return dict(groups)


def limit_per_task(records: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The first ``n`` records of each task, in their original order."""
    kept: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        if kept[r.get("taskname")] < n:
            kept[r.get("taskname")] += 1
            out.append(r)
    return out


def predict(model, records: Sequence[Mapping[str, Any]], max_new_tokens: int | Mapping[str, int] | None = None,
            batch_size: int = 16) -> list[str]:
    """Greedy answers for every record; tasks are generated in groups with their own token budgets."""
    out = [""] * len(records)
    for task, idx in group_by_task(records).items():
        budget = (max_new_tokens.get(task) if isinstance(max_new_tokens, Mapping) else max_new_tokens) or \
            MAX_NEW_TOKENS.get(task, DEFAULT_MAX_NEW_TOKENS)
        texts = model.generate([records[i] for i in idx], max_new_tokens=budget, batch_size=batch_size,
                               stop=["\n\n"] if task != "intent_and_slot" else None)
        for i, t in zip(idx, texts):
            out[i] = t.strip()
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
             batch_size: int = 16, rank_sentiment: bool = True) -> dict[str, dict]:
    """Per-task metrics. Sentiment also gets ``ranked_accuracy`` (labels ranked by likelihood) beside
    the accuracy of its greedy generation. Each task's result holds its ``predictions`` too."""
    predictions = predict(model, records, max_new_tokens, batch_size)
    results = {}
    for task, idx in group_by_task(records).items():
        recs = [records[i] for i in idx]
        preds = [predictions[i] for i in idx]
        metrics = compute_task_metrics(task, preds, recs, answer_field=model.tasks[task].answer_field or "label")
        if task == "sentiment" and rank_sentiment:
            ranked = rank_labels(model, recs, SENTIMENT_LABELS, batch_size=batch_size)
            metrics["ranked_accuracy"] = compute_task_metrics(task, ranked, recs)["accuracy"]
        metrics["predictions"] = preds
        results[task] = metrics
    return results
