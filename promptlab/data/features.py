"""Records -> token ids, virtual-token positions and labels; collation; length-grouped batches.

Each template segment is tokenized on its own, so the prompt part of an example is tokenized identically
for training (with the answer) and generation (without it). A space that ends a text segment is moved
onto the field that follows it, so ``"sentiment: {label}"`` tokenizes the label as `` positive`` the way
running text would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import DataError
from ..templates import TaskTemplate

IGNORE_INDEX = -100  # label of positions without loss
REAL = -1  # virtual_index of a real (vocabulary) token


@dataclass
class Example:
    """One tokenized record.

    ``virtual_index[i]`` is the row of the task's prompt at position i, or -1 for a real token;
    ``labels[i]`` is the token expected at position i (-100: no loss), unshifted.
    """

    taskname: str
    input_ids: list[int]
    virtual_index: list[int]
    labels: list[int]
    index: int = 0  # position of the record in its source
    truncated: int = 0  # tokens cut from the truncate field

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """What encoding a set of records did: kept, skipped (too long) and truncated counts per task."""

    kept: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)

    def bump(self, table: dict[str, int], task: str) -> None:
        table[task] = table.get(task, 0) + 1


def _field_text(record: Mapping[str, Any], name: str, template: TaskTemplate, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: task {template.taskname!r} needs field {name!r}, which the record lacks "
                        f"(it has {sorted(k for k in record if k != 'taskname')})")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (valid in JSON, not text): the tokenizer would crash
        raise DataError(f"{where}: field {name!r} of task {template.taskname!r} is not valid Unicode text "
                        f"({exc.reason} at character {exc.start})") from None
    return text


@dataclass
class _Piece:
    """One template segment of a record: kind "virtual", "text" (literal) or "field" (named ``name``)."""

    kind: str
    text: str = ""
    name: str = ""  # the field's name, for kind "field"
    segment: Any = None  # the virtual run, for kind "virtual"


def _pieces(record: Mapping[str, Any], template: TaskTemplate, with_answer: bool, where: str) -> list[_Piece]:
    """Template segments with the record's field texts and the leading-space rule applied. The kind of a
    piece never comes from a field's name: a field may be called ``text`` or ``virtual``."""
    segments = template.segments if with_answer else template.prompt_segments
    pieces: list[_Piece] = []
    for seg in segments:
        if seg.kind == "virtual":
            pieces.append(_Piece("virtual", segment=seg))
        elif seg.kind == "text":
            pieces.append(_Piece("text", seg.value))
        else:
            text = _field_text(record, seg.value, template, where)
            if pieces and pieces[-1].kind == "text" and pieces[-1].text.endswith(" ") and not text[:1].isspace():
                pieces[-1].text = pieces[-1].text[:-1]
                text = " " + text
            pieces.append(_Piece("field", text, name=seg.value))
    if not with_answer and template.answer_field and pieces and pieces[-1].kind == "text" \
            and pieces[-1].text.endswith(" "):
        pieces[-1].text = pieces[-1].text[:-1]  # with the answer this space moves onto it: the prompt must not keep it
    return [p for p in pieces if p.kind != "text" or p.text]  # empty fields stay: the answer may be ""


def encode(record: Mapping[str, Any], template: TaskTemplate, tokenizer, max_length: int,
           with_answer: bool = True, where: str = "record") -> Example | None:
    """Tokenize one record; None when it cannot fit ``max_length`` (no truncate field, or too little to cut).

    With ``with_answer`` the answer (plus EOS) is appended and labelled; without it the example ends where
    generation starts.
    """
    pieces = _pieces(record, template, with_answer, where)
    texts = [p.text for p in pieces if p.kind != "virtual"]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    ids_per_piece = [None if p.kind == "virtual" else list(next(encoded)) for p in pieces]

    answer = template.answer_field
    if with_answer:
        eos = tokenizer.eos_token_id
        if answer is not None:
            ids_per_piece[-1] = ids_per_piece[-1] + [eos]  # the template ends with the answer field
        else:
            ids_per_piece.append([eos])
            pieces.append(_Piece("text"))

    def length() -> int:
        return sum(p.segment.length if p.kind == "virtual" else len(ids) for p, ids in zip(pieces, ids_per_piece))

    truncated = 0
    excess = length() - max_length
    if excess > 0:
        cut = [i for i, p in enumerate(pieces) if p.kind == "field" and p.name == template.truncate_field]
        if not cut or len(ids_per_piece[cut[0]]) <= excess:
            return None
        ids_per_piece[cut[0]] = ids_per_piece[cut[0]][:-excess]
        truncated = excess

    input_ids: list[int] = []
    virtual_index: list[int] = []
    labels: list[int] = []
    train_all = not (template.answer_only_loss and answer is not None)
    for piece, ids in zip(pieces, ids_per_piece):
        if piece.kind == "virtual":
            seg = piece.segment
            input_ids += [tokenizer.pad_token_id] * seg.length  # placeholder: the model writes the prompt here
            virtual_index += range(seg.start, seg.start + seg.length)
            labels += [IGNORE_INDEX] * seg.length
            continue
        is_answer = with_answer and ((piece.kind == "field" and piece.name == answer)
                                     or (answer is None and piece is pieces[-1]))
        input_ids += ids
        virtual_index += [REAL] * len(ids)
        labels += ids if (with_answer and (is_answer or train_all)) else [IGNORE_INDEX] * len(ids)
    return Example(record.get("taskname", template.taskname), input_ids, virtual_index, labels, truncated=truncated)


def encode_records(records: Sequence[Mapping[str, Any]], tasks: Mapping[str, TaskTemplate], tokenizer,
                   max_length: int = 512, with_answer: bool = True, strict: bool = False,
                   source: str = "records") -> tuple[list[Example], EncodeStats]:
    """Encode many records; too-long ones are skipped and counted (``strict``: an error instead).

    An unknown task or a missing field is always an error naming the record's line in ``source``.
    """
    stats = EncodeStats()
    examples = []
    for i, record in enumerate(records):
        where = f"{source}, line {i + 1}"
        template = template_for(record, tasks, where)
        ex = encode(record, template, tokenizer, max_length, with_answer=with_answer, where=where)
        if ex is None:
            if strict:
                raise DataError(f"{where}: task {template.taskname!r} example is longer than max_length={max_length} "
                                f"and has no truncate_field to shorten")
            stats.bump(stats.skipped, template.taskname)
            continue
        ex.index = i
        if ex.truncated:
            stats.bump(stats.truncated, template.taskname)
        stats.bump(stats.kept, template.taskname)
        examples.append(ex)
    return examples, stats


def template_for(record: Mapping[str, Any], tasks: Mapping[str, TaskTemplate], where: str) -> TaskTemplate:
    """The template of a record's ``taskname``; errors name the record and the known tasks."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    name = record.get("taskname")
    if name is None:
        raise DataError(f"{where}: the record has no 'taskname' field")
    if name not in tasks:
        raise DataError(f"{where}: unknown task {name!r}; known tasks: {sorted(tasks)}")
    return tasks[name]


def collate(examples: Sequence[Example], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad a list of examples into tensors.

    Returns input_ids, attention_mask, virtual_index (-1: real or pad), labels (-100 at pads), all (B, T),
    and ``tasknames`` (list of B names). Right padding for training, left padding for generation.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(e) for e in examples)
    rows = {"input_ids": [], "attention_mask": [], "virtual_index": [], "labels": []}
    for e in examples:
        pad = width - len(e)
        parts = {"input_ids": (e.input_ids, pad_token_id), "attention_mask": ([1] * len(e), 0),
                 "virtual_index": (e.virtual_index, REAL), "labels": (e.labels, IGNORE_INDEX)}
        for key, (values, fill) in parts.items():
            rows[key].append(values + [fill] * pad if padding_side == "right" else [fill] * pad + values)
    batch: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
    batch["tasknames"] = [e.taskname for e in examples]
    return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           group_factor: int = 50, shuffle: bool = True) -> list[list[int]]:
    """Batches of indices with similar lengths, to cut padding, in a random order fixed by ``seed``.

    Indices are shuffled, cut into groups of ``batch_size * group_factor``, each group sorted by length
    and cut into batches; then the batches are shuffled. Without ``shuffle``: sorted by length, in order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    group = max(batch_size * group_factor, batch_size)
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def iter_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int, padding_side: str = "right",
                 grouped: bool = True) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Collated batches in length order (for evaluation): yields (indices, batch)."""
    lengths = [len(e) for e in examples]
    order: Iterable[list[int]] = (length_grouped_batches(lengths, batch_size, shuffle=False) if grouped
                                  else [list(range(i, min(i + batch_size, len(examples))))
                                        for i in range(0, len(examples), batch_size)])
    for idx in order:
        yield idx, collate([examples[i] for i in idx], pad_token_id, padding_side)
