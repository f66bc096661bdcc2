"""Config-driven training: one YAML file names the base model, tasks, methods, data and settings.

Example (``promptlab train run.yaml``)::

    # how to run: promptlab train run.yaml [--resume]
    model: embedded
    tasks: null                      # null: the built-in templates; or a YAML path, or a mapping
    prompt_table: null               # an existing table to add the new tasks to
    methods:
      - {method: prompt_tuning, task: sentiment, init_text: "Classify the sentiment of this financial news"}
      - {method: p_tuning, tasks: [intent_and_slot], encoder: lstm, hidden_size: 256}
    data:
      train: [data/sentiment/train.jsonl, data/intent_and_slot/train.jsonl]
      validation: [data/sentiment/validation.jsonl]
    training: {max_steps: 150, batch_size: 8}
    output_dir: runs/example
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.jsonl import read_jsonl
from .errors import ConfigError
from .templates import TaskTemplate, default_tasks, load_tasks, parse_tasks
from .train import TrainConfig

PROMPT_TUNING_KEYS = {"method", "task", "init", "init_text", "num_virtual_tokens"}
P_TUNING_KEYS = {"method", "tasks", "encoder", "hidden_size", "num_layers", "dropout", "residual", "init", "init_text"}


@dataclass
class RunConfig:
    """A whole training run.

    Attributes:
        model: base model name ("embedded", "tiny", a hub name or a directory).
        tasks: templates by name.
        methods: one entry per prompt-tuning task or p-tuning encoder (see the module docstring).
        train_files / validation_files: JSONL record files.
        training: the `TrainConfig`.
        output_dir: checkpoint, prompt table, history.
        prompt_table: an existing table to extend (its tasks stay frozen and bit-identical).
    """

    model: str
    tasks: dict[str, TaskTemplate]
    methods: list[dict[str, Any]]
    train_files: list[str]
    validation_files: list[str]
    training: TrainConfig
    output_dir: str
    prompt_table: str | None = None
    source: str = field(default="<config>", repr=False)


def _files(value: Any, where: str, base: Path) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected a file path or a list of paths")
    return [str((base / v) if not Path(v).is_absolute() else Path(v)) for v in items]


def load_run_config(path: str | Path) -> RunConfig:
    """Parse and validate a run YAML; an unknown key, task or method is an error naming it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the run config: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: cannot read the run config: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {"model", "tasks", "prompt_table", "methods", "data", "training", "output_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    here = path.parent
    tasks_value = data.get("tasks")
    if tasks_value is None:
        tasks = default_tasks()
    elif isinstance(tasks_value, str):
        tasks = load_tasks(here / tasks_value)
    else:
        tasks = parse_tasks(tasks_value, source=f"{path}: tasks")
    methods = data.get("methods") or []
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"{path}: 'methods' must list at least one prompt_tuning or p_tuning entry")
    for i, m in enumerate(methods):
        where = f"{path}: methods[{i}]"
        if not isinstance(m, dict) or m.get("method") not in ("prompt_tuning", "p_tuning"):
            raise ConfigError(f"{where}: 'method' must be prompt_tuning or p_tuning")
        allowed = PROMPT_TUNING_KEYS if m["method"] == "prompt_tuning" else P_TUNING_KEYS
        bad = sorted(set(m) - allowed)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} for {m['method']}; known: {sorted(allowed)}")
        names = [m.get("task")] if m["method"] == "prompt_tuning" else m.get("tasks")
        if isinstance(names, str):
            names = m["tasks"] = [names]
        for name in names or [None]:
            if name not in tasks:
                raise ConfigError(f"{where}: unknown task {name!r}; known tasks: {sorted(tasks)}")
    d = data.get("data") or {}
    if not isinstance(d, dict) or set(d) - {"train", "validation"}:
        raise ConfigError(f"{path}: 'data' takes 'train' and 'validation' file lists")
    train_files = _files(d.get("train"), f"{path}: data.train", here)
    if not train_files:
        raise ConfigError(f"{path}: data.train names no file")
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError(f"{path}: 'training' must be a mapping of TrainConfig settings")
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str):
        raise ConfigError(f"{path}: 'output_dir' is required")
    output_dir = str(here / output_dir) if not Path(output_dir).is_absolute() else output_dir
    try:
        train_config = TrainConfig.from_dict({**training, "output_dir": output_dir})
    except ConfigError as exc:
        raise ConfigError(f"{path}: training: {exc}") from exc
    table = data.get("prompt_table")
    return RunConfig(str(data.get("model", "embedded")), tasks, methods, train_files,
                     _files(d.get("validation"), f"{path}: data.validation", here), train_config, output_dir,
                     str(here / table) if table else None, str(path))


def build_model(config: RunConfig, base=None):
    """The base model, any existing table, and the trainable prompts the config asks for."""
    from .model import PromptLearningModel
    from .models import load_base_model
    from .table import PromptTable

    base = base or load_base_model(config.model)
    table = PromptTable.load(config.prompt_table, base) if config.prompt_table and Path(config.prompt_table).exists() else None
    model = PromptLearningModel(base, config.tasks, prompt_table=table, max_seq_length=config.training.max_seq_length)
    for m in config.methods:
        options = {k: v for k, v in m.items() if k not in ("method", "task", "tasks")}
        if m["method"] == "prompt_tuning":
            model.add_prompt_tuning(m["task"], **options)
        else:
            model.add_p_tuning(m["tasks"], **options)
    return model


def read_records(files: list[str]) -> list[dict]:
    return [r for f in files for r in read_jsonl(f)]


def run_training(config: RunConfig, resume: bool = False, base=None) -> dict[str, Any]:
    """Train, freeze into the table, save ``prompts.safetensors`` and ``history.json`` in output_dir."""
    import torch

    from .io import atomic_write_text
    from .train import Trainer

    torch.manual_seed(config.training.seed)  # the prompt init (vocab/random) is part of the run
    model = build_model(config, base)
    trainer = Trainer(model, read_records(config.train_files), read_records(config.validation_files),
                      config.training)
    history = trainer.fit(resume=resume)
    trained = model.training_tasks()
    model.freeze()
    out = Path(config.output_dir)
    table_path = out / "prompts.safetensors"
    model.prompt_table.save(table_path)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    return {"prompt_table": str(table_path), "tasks": trained, "steps": trainer.state.step,
            "best_step": trainer.state.best_step, "history": history, "model": model}
