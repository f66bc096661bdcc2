"""`PromptTable`: every task's frozen prompt, saved as one safetensors file with metadata.

A table belongs to one base model (name, hidden size, fingerprint of its embedding matrix). Each entry
keeps its tensor (V, D) float32, its template, its method, and a sha256 of its bytes; loading checks all
of them and refuses a file that does not match. Adding, replacing or removing a task leaves the other
tensors untouched, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .errors import PromptTableError
from .io import load_signed, save_signed, tensor_sha256
from .templates import TaskTemplate

FORMAT = "promptlab.prompt_table.v1"
METHODS = ("prompt_tuning", "p_tuning")


@dataclass
class TableEntry:
    """One frozen task prompt: tensor (V, D) float32, its template, and how it was learned."""

    prompt: torch.Tensor
    template: TaskTemplate
    method: str

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]


class PromptTable:
    """Frozen per-task prompts for one base model. ``table[task] -> (V, D)`` tensor."""

    def __init__(self, base_model: str, hidden_size: int, fingerprint: str):
        self.base_model = base_model
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        self._entries: dict[str, TableEntry] = {}

    @classmethod
    def for_base(cls, base) -> "PromptTable":
        """An empty table bound to a loaded `BaseModel`."""
        return cls(base.name, base.hidden_size, base.fingerprint)

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
            raise KeyError(f"task {task!r} is not in the prompt table; it holds {self.tasks()}")
        return self._entries[task]

    def _check(self, task: str, prompt: torch.Tensor, template: TaskTemplate, method: str) -> torch.Tensor:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if prompt.dim() != 2 or prompt.shape[1] != self.hidden_size:
            raise ValueError(f"task {task!r}: prompt shape {tuple(prompt.shape)} must be (V, {self.hidden_size})")
        if prompt.shape[0] != template.total_virtual_tokens:
            raise ValueError(f"task {task!r}: {prompt.shape[0]} prompt rows but the template has "
                             f"{template.total_virtual_tokens} virtual tokens")
        if template.taskname != task:
            raise ValueError(f"task {task!r}: its template is named {template.taskname!r}")
        return prompt.detach().float().clone()

    def add(self, task: str, prompt: torch.Tensor, template: TaskTemplate, method: str) -> None:
        """Add a new task; an existing one is an error (use `replace`)."""
        if task in self._entries:
            raise KeyError(f"task {task!r} is already in the prompt table; use replace() to overwrite it")
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
                "tasks": {t: {"method": e.method, "num_virtual_tokens": e.num_virtual_tokens,
                              "template": e.template.to_dict(), "sha256": tensor_sha256(e.prompt)}
                          for t, e in self._entries.items()}}
        tensors = {t: e.prompt for t, e in self._entries.items()}
        save_signed(path, tensors, "promptlab", meta)

    @classmethod
    def load(cls, path: str | Path, base=None, check_base: bool = True) -> "PromptTable":
        """Read a table; with ``base`` it must match that model (name aside: hidden size and fingerprint).

        Every problem raises `PromptTableError` naming the file and what is wrong; nothing is changed.
        """
        tensors, meta = load_signed(path, "promptlab", PromptTableError, "prompt table file")
        _check_meta(path, meta)
        if base is not None and check_base:
            if meta["hidden_size"] != base.hidden_size:
                raise PromptTableError(f"{path}: made for hidden size {meta['hidden_size']} "
                                       f"({meta['base_model']}), but the base model {base.name!r} has {base.hidden_size}")
            if meta["fingerprint"] != base.fingerprint:
                raise PromptTableError(f"{path}: made for base model {meta['base_model']!r} whose embedding "
                                       f"fingerprint differs from the loaded {base.name!r}: prompts only work "
                                       f"with the model they were trained on")
        tasks = meta["tasks"]
        if set(tensors) != set(tasks):
            extra, missing = sorted(set(tensors) - set(tasks)), sorted(set(tasks) - set(tensors))
            raise PromptTableError(f"{path}: tensors and metadata disagree (unknown keys {extra}, missing {missing})")
        table = cls(meta["base_model"], meta["hidden_size"], meta["fingerprint"])
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
            except (KeyError, TypeError, ValueError) as exc:
                raise PromptTableError(f"{path}: task {task!r} is invalid: {exc}") from exc
        if base is not None:
            table.to(base.device)
        return table


def _check_meta(path, meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PromptTableError(f"{path}: not a prompt table of format {FORMAT}")
    for key, kind in (("base_model", str), ("hidden_size", int), ("fingerprint", str), ("tasks", dict)):
        if not isinstance(meta.get(key), kind):
            raise PromptTableError(f"{path}: metadata field {key!r} is missing or not a {kind.__name__}")
