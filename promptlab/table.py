"""`PromptTable`: every task's frozen prompt, saved as one safetensors file with metadata.

A table belongs to one base model (name, hidden size, fingerprint of its embedding matrix, and the
layers and key/value width a deep prompt needs). Each entry keeps its tensor float32 - (V, D) input
vectors for prompt tuning and p-tuning, (L, 2, P, KV) per-layer keys and values for deep prompt tuning -,
its template, its method, and a sha256 of its bytes; loading checks all of them and refuses a file that
does not match. Format v1 files (before deep prompts) still load. Adding, replacing or removing a task leaves the other
tensors untouched, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .version import __version__
from .errors import PromptTableError
from .io import load_checksummed, save_checksummed, tensor_sha256
from .templates import TaskTemplate

FORMAT = "promptlab.prompt_table.v2"
READABLE_FORMATS = ("promptlab.prompt_table.v1", FORMAT)
DEEP = "deep_prompt_tuning"
METHODS = ("prompt_tuning", "p_tuning", DEEP)


@dataclass
class TableEntry:
    """One frozen task prompt: a (V, D) or, for deep prompts, (L, 2, P, KV) float32 tensor, its template,
    and how it was learned."""

    prompt: torch.Tensor
    template: TaskTemplate
    method: str

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[2] if self.method == DEEP else self.prompt.shape[0]


class PromptTable:
    """Frozen per-task prompts for one base model. ``table[task]`` -> its tensor.

    ``prefix_shape`` is (layers, key/value width) of the base, which deep prompts must fit (None in tables
    written before deep prompts).
    """

    def __init__(self, base_model: str, hidden_size: int, fingerprint: str,
                 prefix_shape: tuple[int, int] | None = None):
        self.base_model = base_model
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        self.prefix_shape = tuple(prefix_shape) if prefix_shape is not None else None
        self._entries: dict[str, TableEntry] = {}

    @classmethod
    def for_base(cls, base) -> "PromptTable":
        """An empty table bound to a loaded `BaseModel`."""
        return cls(base.name, base.hidden_size, base.fingerprint, base.prefix_shape)

    # ------------------------------------------------------------------------------------- contents
    def tasks(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, task: str) -> bool:
        return task in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, task: str) -> torch.Tensor:
        return self.entry(task).prompt

    def entry(self, task: str) -> TableEntry:
        if task not in self._entries:
            raise PromptTableError(f"task {task!r} is not in the prompt table; it holds {self.tasks()}")
        return self._entries[task]

    def entries(self) -> dict[str, TableEntry]:
        """Every entry by task (a copy of the mapping; the entries themselves are shared)."""
        return dict(self._entries)

    def _check(self, task: str, prompt: torch.Tensor, template: TaskTemplate, method: str) -> torch.Tensor:
        if method not in METHODS:
            raise PromptTableError(f"task {task!r}: method must be one of {METHODS}, got {method!r}")
        if template.taskname != task:
            raise PromptTableError(f"task {task!r}: its template is named {template.taskname!r}")
        if method == DEEP:
            if self.prefix_shape is None:
                raise PromptTableError(f"task {task!r}: this table does not record the base model's layers, "
                                       f"so it cannot hold a deep prompt")
            layers, width = self.prefix_shape
            if prompt.dim() != 4 or prompt.shape[:2] != (layers, 2) or prompt.shape[3] != width or prompt.shape[2] < 1:
                raise PromptTableError(f"task {task!r}: deep prompt shape {tuple(prompt.shape)} must be "
                                       f"({layers}, 2, P, {width}) for this base model")
            if template.total_virtual_tokens:
                raise PromptTableError(f"task {task!r}: a deep prompt's template must have no virtual-token "
                                       f"markers (its prefix lives in the attention cache)")
            return prompt.detach().float().clone()
        if prompt.dim() != 2 or prompt.shape[1] != self.hidden_size:
            raise PromptTableError(f"task {task!r}: prompt shape {tuple(prompt.shape)} must be (V, {self.hidden_size})")
        if prompt.shape[0] != template.total_virtual_tokens:
            raise PromptTableError(f"task {task!r}: {prompt.shape[0]} prompt rows but the template has "
                                   f"{template.total_virtual_tokens} virtual tokens")
        return prompt.detach().float().clone()

    def add(self, task: str, prompt: torch.Tensor, template: TaskTemplate, method: str) -> None:
        """Add a new task; an existing one is an error (use `replace`)."""
        if task in self._entries:
            raise PromptTableError(f"task {task!r} is already in the prompt table; use replace() to overwrite it")
        self._entries[task] = TableEntry(self._check(task, prompt, template, method), template, method)

    def replace(self, task: str, prompt: torch.Tensor, template: TaskTemplate, method: str) -> None:
        """Set a task's prompt, whether or not it was there."""
        self._entries[task] = TableEntry(self._check(task, prompt, template, method), template, method)

    def remove(self, task: str) -> None:
        self.entry(task)
        del self._entries[task]

    def to(self, device) -> "PromptTable":
        for e in self._entries.values():
            e.prompt = e.prompt.to(device)
        return self

    def describe(self) -> list[dict]:
        """One row per task: name, method, virtual tokens, splits, parameters, norm."""
        return [{"task": t, "method": e.method, "virtual_tokens": e.num_virtual_tokens,
                 "splits": list(e.template.virtual_token_splits), "parameters": e.prompt.numel(),
                 "mean_norm": round(e.prompt.norm(dim=-1).mean().item(), 4)} for t, e in self._entries.items()]

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Atomically write the whole table (safetensors, no pickle)."""
        meta = {"format": FORMAT, "library_version": __version__, "base_model": self.base_model,
                "hidden_size": self.hidden_size, "fingerprint": self.fingerprint,
                "prefix_shape": list(self.prefix_shape) if self.prefix_shape else None,
                "tasks": {t: {"method": e.method, "num_virtual_tokens": e.num_virtual_tokens,
                              "template": e.template.to_dict(), "sha256": tensor_sha256(e.prompt)}
                          for t, e in self._entries.items()}}
        tensors = {t: e.prompt for t, e in self._entries.items()}
        save_checksummed(path, tensors, "promptlab", meta)

    @classmethod
    def load(cls, path: str | Path, base=None, check_base: bool = True) -> "PromptTable":
        """Read a table; with ``base`` it must match that model (name aside: hidden size and fingerprint).

        Every problem raises `PromptTableError` naming the file and what is wrong; nothing is changed.
        """
        tensors, meta = load_checksummed(path, "promptlab", PromptTableError, "prompt table file")
        _check_meta(path, meta)
        if base is not None and check_base:
            if meta["hidden_size"] != base.hidden_size:
                raise PromptTableError(f"{path}: made for hidden size {meta['hidden_size']} "
                                       f"({meta['base_model']}), but the base model {base.name!r} has {base.hidden_size}")
            if not base.matches(meta["fingerprint"]):
                raise PromptTableError(f"{path}: made for base model {meta['base_model']!r} whose embedding "
                                       f"fingerprint differs from the loaded {base.name!r}: prompts only work "
                                       f"with the model they were trained on"
                                       + ("; a table written by promptlab 0.1 is checked against the float32 "
                                          "weights: load the base with dtype='fp32' to read it"
                                          if meta.get("format") == READABLE_FORMATS[0] else ""))
            if meta.get("prefix_shape") and tuple(meta["prefix_shape"]) != base.prefix_shape:
                raise PromptTableError(f"{path}: made for a base with (layers, key/value width) "
                                       f"{tuple(meta['prefix_shape'])}, but {base.name!r} has {base.prefix_shape}")
        tasks = meta["tasks"]
        if set(tensors) != set(tasks):
            extra, missing = sorted(set(tensors) - set(tasks)), sorted(set(tasks) - set(tensors))
            raise PromptTableError(f"{path}: tensors and metadata disagree (unknown keys {extra}, missing {missing})")
        table = cls(meta["base_model"], meta["hidden_size"], meta["fingerprint"], meta.get("prefix_shape"))
        for task, info in tasks.items():
            t = tensors[task]
            try:
                template = TaskTemplate.from_dict(info["template"])
                if t.dtype != torch.float32:
                    raise ValueError(f"dtype {t.dtype}, expected float32")
                if tensor_sha256(t) != info["sha256"]:
                    raise ValueError("its bytes do not match the recorded sha256 (corrupted)")
                table._entries[task] = TableEntry(table._check(task, t, template, info["method"]), template,
                                                  info["method"])
            except (KeyError, TypeError, ValueError) as exc:  # PromptTableError is a ValueError
                raise PromptTableError(f"{path}: task {task!r} is invalid: {exc}") from exc
        if base is not None:
            if check_base:  # checked against this base: bound to it (an older file gets today's fingerprint)
                table.fingerprint, table.prefix_shape = base.fingerprint, base.prefix_shape
            table.to(base.device)
        return table


def _check_meta(path, meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise PromptTableError(f"{path}: not a prompt table of format {' or '.join(READABLE_FORMATS)}")
    shape = meta.get("prefix_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 2
                                  and all(isinstance(x, int) and x > 0 for x in shape)):
        raise PromptTableError(f"{path}: metadata field 'prefix_shape' must be [layers, width], got {shape!r}")
    for key, kind in (("base_model", str), ("hidden_size", int), ("fingerprint", str), ("tasks", dict)):
        if not isinstance(meta.get(key), kind):
            raise PromptTableError(f"{path}: metadata field {key!r} is missing or not a {kind.__name__}")
