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


def _pieces(record: Mapping[str, Any], template: TaskTemplate, with_answer: bool, where: str):
    """Template segments as (kind, text-or-segment) with the leading-space rule applied."""
    segments = template.segments if with_answer else template.prompt_segments
    pieces: list[list] = []
    for seg in segments:
        if seg.kind == "virtual":
            pieces.append(["virtual", seg])
        elif seg.kind == "text":
            pieces.append(["text", seg.value])
        else:
            text = _field_text(record, seg.value, template, where)
            if pieces and pieces[-1][0] == "text" and pieces[-1][1].endswith(" ") and not text[:1].isspace():
                pieces[-1][1] = pieces[-1][1][:-1]
                text = " " + text
            pieces.append([seg.value, text])
    if not with_answer and template.answer_field and pieces and pieces[-1][0] == "text" \
            and pieces[-1][1].endswith(" "):
        pieces[-1][1] = pieces[-1][1][:-1]  # with the answer this space moves onto it: the prompt must not keep it
    return [p for p in pieces if p[0] != "text" or p[1]]  # empty fields stay: the answer may be ""


def encode(record: Mapping[str, Any], template: TaskTemplate, tokenizer, max_length: int,
           with_answer: bool = True, where: str = "record") -> Example | None:
    """Tokenize one record; None when it cannot fit ``max_length`` (no truncate field, or too little to cut).

    With ``with_answer`` the answer (plus EOS) is appended and labelled; without it the example ends where
    generation starts.
    """
    pieces = _pieces(record, template, with_answer, where)
    texts = [p[1] for p in pieces if p[0] != "virtual"]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    ids_per_piece = [None if p[0] == "virtual" else list(next(encoded)) for p in pieces]

    answer = template.answer_field
    if with_answer:
        eos = tokenizer.eos_token_id
        if answer is not None:
            ids_per_piece[-1] = ids_per_piece[-1] + [eos]
        else:
            ids_per_piece.append([eos])
            pieces.append(["text", ""])

    def length() -> int:
        return sum(p[1].length if p[0] == "virtual" else len(ids) for p, ids in zip(pieces, ids_per_piece))

    truncated = 0
    excess = length() - max_length
    if excess > 0:
        cut = [i for i, p in enumerate(pieces) if p[0] == template.truncate_field]
        if not cut or len(ids_per_piece[cut[0]]) <= excess:
            return None
        ids_per_piece[cut[0]] = ids_per_piece[cut[0]][:-excess]
        truncated = excess

    input_ids: list[int] = []
    virtual_index: list[int] = []
    labels: list[int] = []
    train_all = not (template.answer_only_loss and answer is not None)
    for piece, ids in zip(pieces, ids_per_piece):
        if piece[0] == "virtual":
            seg = piece[1]
            input_ids += [tokenizer.pad_token_id] * seg.length  # placeholder: the model writes the prompt here
            virtual_index += range(seg.start, seg.start + seg.length)
            labels += [IGNORE_INDEX] * seg.length
            continue
        is_answer = with_answer and (piece[0] == answer or (answer is None and piece is pieces[-1]))
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


# ------------------------------------------------------------------------------------ packing (loss only)
# Cost of one attended (query, key) pair relative to one token through the linear layers, forward plus
# backward; measured on CPU with SmolLM2-135M in float32. It decides how many packed rows a batch gets.
ATTENTION_COST = 1 / 1300


@dataclass
class PackedBatch:
    """A right-padded (B, T) batch packed into (R, S) rows: no padding inside, shared prefixes stored once.

    Rows of one task that begin with the same tokens (the virtual tokens and template text, or the same
    sentence scored with several labels) share those positions: they form a tree, each node stored once per
    packed row, and a position attends only to its own node (causally) and the node's ancestors. Every
    position therefore sees exactly the keys it sees in its own padded row, at the same position ids.

    Attributes:
        source: (R, S) index into the flattened (B*T) batch of the token at each packed slot (0 at padding).
        position_ids: (R, S) that token's position in its own row.
        attention: (R, 1, S, S) bool, True where the query slot (dim 2) may attend the key slot (dim 3).
        target: (B, T) index into the flattened (R*S) packed output of each real position (0 at padding).
    """

    source: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    target: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.source.numel()


def _prefix_tree(rows: list[int], keys: list[list[tuple[int, int]]], nodes: list[list[int]],
                 paths: list[list[int]]) -> int:
    """Append the tree of ``rows`` (all starting at position 0) to ``nodes`` ([parent, start, length, row]);
    ``paths[b]`` gets the nodes row b passes through. Returns the root's index."""
    root = -1
    stack = [(rows, 0, -1)]
    while stack:
        group, start, parent = stack.pop()
        first, end = group[0], min(len(keys[b]) for b in group)
        stop = start
        while stop < end and all(keys[b][stop] == keys[first][stop] for b in group):
            stop += 1
        node = len(nodes)
        nodes.append([parent, start, stop - start, first])
        root = node if parent < 0 else root
        branches: dict[tuple[int, int], list[int]] = {}
        for b in group:
            paths[b].append(node)
            if len(keys[b]) > stop:
                branches.setdefault(keys[b][stop], []).append(b)
        stack += [(g, stop, node) for g in branches.values()]
    return root


def pack_batch(input_ids: torch.Tensor, virtual_index: torch.Tensor, attention_mask: torch.Tensor,
               tasknames: Sequence[str], attention_cost: float = ATTENTION_COST) -> PackedBatch | None:
    """Plan packing a right-padded batch (see `PackedBatch`); None when it would not save work.

    The packed width S and row count R minimise R*S*(1 + attention_cost*S) (tokens through the linear
    layers plus attended pairs) over row counts, each filled longest-first into the least loaded row.
    """
    mask = attention_mask.bool()
    if mask.shape[1] < 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None  # left padding (generation) or holes: not a training batch
    B, T = mask.shape
    lengths = mask.sum(1).tolist()
    ids, virtual = input_ids.tolist(), virtual_index.tolist()
    keys = [list(zip(ids[b][: lengths[b]], virtual[b][: lengths[b]])) for b in range(B)]
    nodes: list[list[int]] = []  # [parent, start, length, representative row]
    paths: list[list[int]] = [[] for _ in range(B)]
    by_task: dict[str, list[int]] = {}
    for b, task in enumerate(tasknames):
        by_task.setdefault(task, []).append(b)
    roots = [_prefix_tree(rows, keys, nodes, paths) for rows in by_task.values()]
    children: dict[int, list[int]] = {}
    for n, (parent, *_rest) in enumerate(nodes):
        children.setdefault(parent, []).append(n)

    def subtree(n: int) -> list[int]:  # preorder: a parent before its children
        out, stack = [], [n]
        while stack:
            m = stack.pop()
            out.append(m)
            stack += reversed(children.get(m, []))
        return out

    # units placed in packed rows: each subtree under a task root (the root is stored once per packed row)
    units = [(root, subtree(c)) for root in roots for c in children.get(root, [])]
    units += [(root, []) for root in roots if root not in children]
    units.sort(key=lambda u: -sum(nodes[n][2] for n in u[1]))
    best = None
    for count in range(1, len(units) + 1):
        loads, members = [0] * count, [dict() for _ in range(count)]  # per packed row: root -> its units
        for root, sub in units:
            size = sum(nodes[n][2] for n in sub)
            costs = [loads[k] + size + (0 if root in members[k] else nodes[root][2]) for k in range(count)]
            k = min(range(count), key=costs.__getitem__)
            loads[k] = costs[k]
            members[k].setdefault(root, []).append(sub)
        width = max(loads)
        cost = count * width * (1 + attention_cost * width)
        if best is None or cost < best[0]:
            best = (cost, width, members)
    if best is None or best[0] >= B * T * (1 + attention_cost * T):
        return None
    _, width, members = best
    count = len(members)
    source = [[0] * width for _ in range(count)]
    position = [[0] * width for _ in range(count)]
    instance = [[-1] * width for _ in range(count)]  # node instance of each slot (-1: padding)
    parents: list[int] = []  # parent instance of each instance
    slot_of: dict[tuple[int, int], tuple[int, int]] = {}  # (packed row, node) -> (instance, first slot)
    for k, placed in enumerate(members):
        at = 0
        for root, subs in placed.items():
            for n in [root] + [m for sub in subs for m in sub]:
                parent, start, length, row = nodes[n]
                inst = len(parents)
                parents.append(slot_of[(k, parent)][0] if parent >= 0 else -1)
                slot_of[(k, n)] = (inst, at)
                for j in range(length):
                    source[k][at + j] = row * T + start + j
                    position[k][at + j] = start + j
                    instance[k][at + j] = inst
                at += length
    home = {n: k for k, placed in enumerate(members) for subs in placed.values() for sub in subs for n in sub}
    target = [[0] * T for _ in range(B)]
    for b in range(B):
        k = home.get(paths[b][-1], None)
        if k is None:  # the row is its task's root alone
            k = next(k for k, placed in enumerate(members) if paths[b][0] in placed)
        for n in paths[b]:
            _, start, length, _ = nodes[n]
            first = slot_of[(k, n)][1]
            for j in range(length):
                target[b][start + j] = k * width + first + j
    n_inst = len(parents)
    ancestor = torch.eye(n_inst + 1, dtype=torch.bool)  # [x, y]: y is x or an ancestor of x; last: padding
    for x in range(n_inst):
        y = parents[x]
        while y >= 0:
            ancestor[x, y] = True
            y = parents[y]
    device = input_ids.device
    inst = torch.tensor(instance)  # (R, S); -1 indexes the padding row/column of `ancestor`
    slots = torch.arange(width)
    causal = slots[None, :] <= slots[:, None]  # (S, S): key <= query
    attention = causal[None] & ancestor[inst[:, :, None], inst[:, None, :]]  # (R, S, S)
    return PackedBatch(torch.tensor(source, device=device), torch.tensor(position, device=device),
                       attention[:, None].to(device), torch.tensor(target, device=device))
