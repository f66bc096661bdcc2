"""Config-driven training: one YAML file names the base model, tasks, methods, data and settings.

Example (``promptlab train run.yaml``)::

    # how to run: promptlab train run.yaml [--resume]
    model: embedded
    tasks: null                      # null: the built-in templates; or a YAML path, or a mapping
    prompt_table: null               # an existing table to add the new tasks to
    methods:
      - {task: sentiment}            # no method: the task's recipe in tasks.yaml (method and options)
      - {method: p_tuning, tasks: [squad], encoder: lstm, hidden_size: 256}
      - {method: deep_prompt_tuning, task: intent_and_slot, num_virtual_tokens: 20, reparameterize: true}
    data:
      train: [data/sentiment/train.jsonl, data/intent_and_slot/train.jsonl]
      validation: [data/sentiment/validation.jsonl]
    training: {max_steps: 150, batch_size: 8}   # over the trained tasks' recipe settings (`TrainConfig.from_recipe`)
    output_dir: runs/example

A run trains the way the README's calls do (`add_task`, `TrainConfig.from_recipe`): an entry without ``method``
takes its task's recipe, and ``training`` overrides the recipes' training settings of the tasks it trains.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data.jsonl import read_jsonl
from .errors import ConfigError
from .templates import METHOD_OPTIONS, TaskTemplate, default_tasks, load_tasks, parse_tasks
from .train import TrainConfig

# the keys of one `methods` entry: the method's options (the same as in a task's recipe) and its task(s)
METHOD_KEYS = {m: options | {"method", "tasks" if m == "p_tuning" else "task"} for m, options in METHOD_OPTIONS.items()}


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
        raise ConfigError(f"{path}: 'methods' must list at least one entry of {sorted(METHOD_KEYS)}")
    trained: list[str] = []
    for i, m in enumerate(methods):
        where = f"{path}: methods[{i}]"
        if isinstance(m, dict) and "method" not in m:  # the task's recipe
            if m.get("task") not in tasks:
                raise ConfigError(f"{where}: an entry without 'method' trains its 'task' by the task's recipe; "
                                  f"unknown task {m.get('task')!r}; known tasks: {sorted(tasks)}")
            method = tasks[m["task"]].recipe_method
            allowed, what = METHOD_OPTIONS[method] | {"task"}, f"task {m['task']!r}'s recipe ({method})"
        elif isinstance(m, dict) and m.get("method") in METHOD_KEYS:
            allowed, what = METHOD_KEYS[m["method"]], m["method"]
        else:
            raise ConfigError(f"{where}: 'method' must be one of {sorted(METHOD_KEYS)} (or left out, for the "
                              "task's recipe)")
        bad = sorted(set(m) - allowed)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} for {what}; known: {sorted(allowed)}")
        names = m.get("tasks") if m.get("method") == "p_tuning" else [m.get("task")]
        if isinstance(names, str):
            names = m["tasks"] = [names]
        for name in names or [None]:
            if name not in tasks:
                raise ConfigError(f"{where}: unknown task {name!r}; known tasks: {sorted(tasks)}")
        trained += names
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
        train_config = TrainConfig.from_recipe([tasks[n] for n in dict.fromkeys(trained)],
                                               **{**training, "output_dir": output_dir})
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

    base = base or load_base_model(config.model, device=process_device())
    table = PromptTable.load(config.prompt_table, base) if config.prompt_table and Path(config.prompt_table).exists() else None
    model = PromptLearningModel(base, config.tasks, prompt_table=table, max_seq_length=config.training.max_seq_length)
    for m in config.methods:
        options = {k: v for k, v in m.items() if k not in ("method", "task", "tasks")}
        if "method" not in m:
            model.add_task(m["task"], **options)
        elif m["method"] == "prompt_tuning":
            model.add_prompt_tuning(m["task"], **options)
        elif m["method"] == "deep_prompt_tuning":
            model.add_deep_prompt_tuning(m["task"], **options)
        else:
            model.add_p_tuning(m["tasks"], **options)
    return model


def read_records(files: list[str]) -> list[dict]:
    return [r for f in files for r in read_jsonl(f)]


def process_device(environ: Mapping[str, str] = os.environ) -> str | None:
    """This process's device under a multi-process launcher (torchrun, accelerate launch), which sets
    ``LOCAL_RANK``: its own GPU ``cuda:<LOCAL_RANK>``, or the CPU when the launcher asked for it
    (``ACCELERATE_USE_CPU``). None outside a launcher: `load_base_model` picks the device."""
    if "LOCAL_RANK" not in environ:
        return None
    if environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    import torch

    return f"cuda:{int(environ['LOCAL_RANK'])}" if torch.cuda.is_available() else None


def check_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch that asked for several processes but started one.

    ``accelerate launch --cpu --num_processes N`` starts one process: accelerate runs several CPU processes
    only through mpirun (``--mpirun_hostfile``), and otherwise just sets ``MASTER_ADDR`` for the others that
    never come. That single process would train alone, silently; this says so instead.
    """
    launched_by_accelerate_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    world = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_by_accelerate_cpu and "MASTER_ADDR" in environ and not any(k in environ for k in world):
        raise ConfigError(
            "accelerate launch --cpu --num_processes N started only this one process (accelerate starts several "
            "CPU processes only through mpirun). For N CPU processes run "
            "`torchrun --nproc_per_node N -m promptlab train CONFIG`, or "
            "`CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N -m promptlab train CONFIG`; "
            "for one process, leave out --num_processes")


def run_training(config: RunConfig, resume: bool = False, base=None) -> dict[str, Any]:
    """Train, freeze into the table, save ``prompts.safetensors`` and ``history.json`` in output_dir.

    ``resume``: continue from output_dir's checkpoint; a run killed before its first checkpoint has none,
    and then training starts fresh (and says so). Under a multi-process launcher every process trains the
    same prompts; only the main process writes the files and has ``main_process`` true in the result, so
    a caller prints its summary once.
    """
    import torch

    from .io import atomic_write_text
    from .train import Trainer

    check_launch()
    torch.manual_seed(config.training.seed)  # the prompt init (vocab/random) is part of the run
    model = build_model(config, base)
    trainer = Trainer(model, read_records(config.train_files), read_records(config.validation_files),
                      config.training)
    history = trainer.fit(resume=resume)
    trained = model.training_tasks()
    model.freeze()
    out = Path(config.output_dir)
    table_path = out / "prompts.safetensors"
    main = trainer.accelerator.is_main_process
    if main:
        model.prompt_table.save(table_path)
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    trainer.accelerator.wait_for_everyone()  # no process reports before the files are there
    return {"prompt_table": str(table_path), "tasks": trained, "steps": trainer.state.step,
            "best_step": trainer.state.best_step, "history": history, "model": model, "main_process": main}
