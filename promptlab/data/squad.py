"""SQuAD v1.1 (Rajpurkar et al. 2016): ``train-v1.1.json`` / ``dev-v1.1.json`` -> question-answering records.

The file is one JSON document: ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}, ...]}]}]}], "version": "1.1"}``. Records are grouped by article so
splits can keep every article in one split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

TASKNAME = "squad"
TRAIN_FILE = "squad/train-v1.1.json"
DEV_FILE = "squad/dev-v1.1.json"


@dataclass
class Article:
    """One Wikipedia article of SQuAD with its question records (in file order)."""

    title: str
    records: list[dict[str, Any]] = field(default_factory=list)


def _require(value: Any, kind: type, path: Path, where: str, what: str) -> Any:
    if not isinstance(value, kind):
        found = "nothing" if value is None else type(value).__name__
        raise DataError(f"{path}: {where}: expected {what} ({kind.__name__}), found {found}")
    return value


def parse_squad(path: str | Path) -> list[Article]:
    """Parse a SQuAD v1.1 file into articles of records.

    Each record: ``{"taskname": "squad", "context", "question", "answer"`` (the first reference answer),
    ``"answers"`` (every reference answer text, for scoring), ``"id", "title"}``. Raises DataError naming
    the file and the line and column (bad JSON) or the JSON path (e.g. ``data[3].paragraphs[1].qas[0]``)
    of the first problem.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte offset {exc.start})") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError:
        raise DataError(f"{path}: not valid SQuAD JSON (nested too deeply)") from None
    _require(document, dict, path, "top level", "an object with a 'data' list")
    articles = []
    for a, raw_article in enumerate(_require(document.get("data"), list, path, "data", "a list of articles")):
        where = f"data[{a}]"
        _require(raw_article, dict, path, where, "an article object")
        title = _require(raw_article.get("title"), str, path, f"{where}.title", "the article title")
        article = Article(title)
        paragraphs = _require(raw_article.get("paragraphs"), list, path, f"{where}.paragraphs", "a list")
        for p, paragraph in enumerate(paragraphs):
            pwhere = f"{where}.paragraphs[{p}]"
            _require(paragraph, dict, path, pwhere, "a paragraph object")
            context = _require(paragraph.get("context"), str, path, f"{pwhere}.context", "the paragraph text")
            for q, qa in enumerate(_require(paragraph.get("qas"), list, path, f"{pwhere}.qas", "a list")):
                qwhere = f"{pwhere}.qas[{q}]"
                _require(qa, dict, path, qwhere, "a question object")
                question = _require(qa.get("question"), str, path, f"{qwhere}.question", "the question text")
                qid = _require(qa.get("id"), str, path, f"{qwhere}.id", "the question id")
                answers = _require(qa.get("answers"), list, path, f"{qwhere}.answers", "a list")
                if not answers:
                    raise DataError(f"{path}: {qwhere} (id {qid}): no reference answer")
                texts = [
                    _require(_require(ans, dict, path, f"{qwhere}.answers[{i}]", "an answer object").get("text"),
                             str, path, f"{qwhere}.answers[{i}].text", "the answer text")
                    for i, ans in enumerate(answers)
                ]
                article.records.append({
                    "taskname": TASKNAME, "context": context, "question": question.strip(),
                    "answer": texts[0], "answers": texts, "id": qid, "title": title,
                })
        articles.append(article)
    if not articles:
        raise DataError(f"{path}: 'data' holds no article")
    return articles
