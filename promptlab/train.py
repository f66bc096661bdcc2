"""Training: `TrainConfig` and `Trainer`, a plain loop on Hugging Face Accelerate.

Only the learned prompts (prompt embeddings and p-tuning encoders) are optimised; the base model stays
frozen and is never synchronised between processes: after each backward pass the prompt gradients are
summed across processes by hand. The loss of a step is the sum over its labelled tokens divided by the
number of labelled tokens in the whole global batch, so one process with batch 8 and two with batch 4
take the same step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .data.features import IGNORE_INDEX, collate, encode_records, iter_batches, length_grouped_batches
from .data.sources import as_records
from .errors import ConfigError, DataError, TrainingError
from .templates import TaskTemplate
from .evaluate import evaluate, sample_per_task
from .metrics import primary_score
from .precision import Precision


@dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes:
        max_steps: optimizer steps.
        max_time: a wall-time budget in seconds (None: none). After its first ``CALIBRATION_STEPS`` steps the
            run measures its step time and trains as many steps as fit, at most max_steps, with the
            schedule shortened to match; the decision is printed and kept in checkpoints. Validation time
            is not counted. For notebooks on machines of unknown speed.
        batch_size: examples per process per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: learning rate of the vectors that live in embedding space: prompt-tuning prompts and the
            inputs of p-tuning encoders (with the residual encoder these are the prompt it starts from).
        p_tuning_lr: learning rate of the p-tuning encoders' network weights (LSTM / MLP).
        deep_prompt_lr: learning rate of deep prompts (their prefixes, or their MLP and its inputs). At 1e-2
            the intent_and_slot recipe diverged at step ~80 with seed 1 (loss 0.5 -> 10.6, never recovering);
            3e-3 trained smoothly on the same batches.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps; None: 10% of the run's steps (max_steps, or the time budget's).
        min_lr_ratio: the cosine schedule decays to lr * min_lr_ratio.
        max_grad_norm: gradient clipping (0 or None: off).
        max_seq_length: longer examples are truncated (truncate_field) or skipped.
        mixed_precision: "auto" follows the dtype the base is held in (`promptlab.precision` chose it when
            the model loaded): bf16 computes in bf16, fp16 in fp16 with loss scaling, fp32 in fp32. "bf16"
            or "fp16" on a float32 base add autocast; a value that contradicts a low-precision base is an
            error (load the base with the dtype you want). "no" computes in the base's own dtype.
        eval_every: validate every N steps (0: only at the end).
        eval_max_records: validation records scored per task with generation: a sample across the whole
            split, drawn with ``seed``, never the first records.
        eval_loss_records: also compute the validation loss, on this many validation records per task,
            sampled the same way (the same number as eval_max_records is the same sample). None: the loss
            only when no metrics are scored (eval_max_records=0; on all the records, and it picks the best
            prompt). The loss of a record costs about what generating its answer does: on sentiment it
            doubled validation's time (bench/RESULTS.md, time-to-target).
        eval_batch_size: batch size of validation.
        early_stopping_patience: stop after this many validations without improvement (None: never).
        keep_best: at the end, restore the prompts of the best validation.
        checkpoint_every: write a checkpoint every N steps (0: only at the end); needs output_dir.
        output_dir: where checkpoints and the history go (None: nothing is written).
        seed: seeds the batch order and the initial RNG state.
        group_by_length: batches of similar lengths (less padding); off: random batches.
        progress: show tqdm progress bars.
    """

    max_steps: int = 150
    max_time: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-2
    p_tuning_lr: float = 1e-4
    deep_prompt_lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    max_seq_length: int = 512
    mixed_precision: str = "auto"
    eval_every: int = 50
    eval_max_records: int = 200
    eval_loss_records: int | None = None
    eval_batch_size: int = 16
    early_stopping_patience: int | None = None
    keep_best: bool = True
    checkpoint_every: int = 50
    output_dir: str | None = None
    seed: int = 1234
    group_by_length: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"TrainConfig.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("lr", "p_tuning_lr", "deep_prompt_lr", "weight_decay", "min_lr_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if not (value is None and name == "max_grad_norm") and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
                raise ConfigError(f"TrainConfig.{name} must be a number, got {value!r} ({type(value).__name__}); "
                                  f"note YAML reads 1e-3 as text: write 1.0e-3")
        if self.max_time is not None and (isinstance(self.max_time, bool) or not isinstance(self.max_time, (int, float))
                                          or not self.max_time > 0):
            raise ConfigError(f"TrainConfig.max_time must be a positive number of seconds or None, got {self.max_time!r}")
        if self.lr <= 0 or self.p_tuning_lr <= 0 or self.deep_prompt_lr <= 0:
            raise ConfigError("TrainConfig learning rates must be positive")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig needs weight_decay >= 0 and 0 <= min_lr_ratio <= 1, got "
                              f"{self.weight_decay!r} and {self.min_lr_ratio!r}")
        for name, low in (("eval_every", 0), ("checkpoint_every", 0), ("eval_max_records", 0), ("eval_batch_size", 1),
                          ("warmup_steps", 0), ("early_stopping_patience", 1), ("eval_loss_records", 1)):
            value = getattr(self, name)
            if value is None and name in ("warmup_steps", "early_stopping_patience", "eval_loss_records"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def check_names(cls, data: Mapping[str, Any]) -> None:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        cls.check_names(data)
        return cls(**data)

    @classmethod
    def from_recipe(cls, templates: TaskTemplate | Sequence[TaskTemplate], **overrides) -> "TrainConfig":
        """The training settings of the tasks' recipes (``recipe.training`` in tasks.yaml), then
        ``overrides``. Tasks trained together must not disagree on a setting (a ConfigError names it)."""
        templates = [templates] if hasattr(templates, "taskname") else list(templates)
        cls.check_names(overrides)  # the caller's own mistake first
        merged: dict[str, Any] = {}
        for t in templates:
            for key, value in ((t.recipe or {}).get("training") or {}).items():
                if key in merged and merged[key] != value and key not in overrides:
                    raise ConfigError(f"the recipes of the tasks disagree on {key}: {merged[key]!r} and "
                                      f"{value!r} (task {t.taskname!r}); choose with {key}=... (under "
                                      "`training:` in a run config)")
                merged[key] = value
        try:
            return cls.from_dict({**merged, **overrides})
        except ConfigError as exc:
            names = ", ".join(t.taskname for t in templates)
            raise ConfigError(f"recipe of task(s) {names}: {exc}") from None

    def resume_key(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to continue this run exactly."""
        ignore = {"output_dir", "progress", "checkpoint_every", "eval_batch_size", "max_time"}  # a budget decided is kept
        return {k: v for k, v in asdict(self).items() if k not in ignore}


CALIBRATION_STEPS = 3  # steps timed before a time budget decides how many steps the run takes


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``; a pure function of the step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Train a `PromptLearningModel`'s prompts on records (dicts with ``taskname`` and template fields, or a
    `datasets.Dataset` of them)."""

    def __init__(self, model, train_records: Sequence[Mapping[str, Any]],
                 val_records: Sequence[Mapping[str, Any]] | None = None, config: TrainConfig | None = None):
        from accelerate import Accelerator

        self.model = model
        self.config = config or TrainConfig()
        train_records = as_records(train_records, "train")  # a datasets.Dataset works too
        self.val_records = as_records(val_records or [], "validation")
        model.max_seq_length = self.config.max_seq_length
        if not model.training_tasks():
            raise ConfigError("the model has no task to train: call add_prompt_tuning, add_p_tuning or "
                              "add_deep_prompt_tuning first")
        if not train_records:
            raise DataError("the training set is empty")
        unknown = sorted({r.get("taskname") for r in train_records} - set(model.training_tasks()))
        if unknown:
            raise ConfigError(f"training records of task(s) {unknown} that are not being trained; "
                              f"training: {model.training_tasks()}")
        self.examples, self.encode_stats = encode_records(train_records, model.tasks, model.tokenizer,
                                                         self.config.max_seq_length, source="train")
        if not self.examples:
            raise DataError(f"no training example fits max_seq_length={self.config.max_seq_length}")
        self.precision, autocast = self._precision()
        self.accelerator = Accelerator(mixed_precision=autocast, cpu=model.base.device.type == "cpu")
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=self.config.weight_decay)
        # fp16 needs loss scaling; the scaler is ours (not Accelerate's) since the optimizer is a plain one
        self.scaler = torch.amp.GradScaler(model.base.device.type) if self.precision == "fp16" else None
        self.state = TrainState()

    def _precision(self) -> tuple[str, str]:
        """(the precision the base computes in, the autocast Accelerate adds: "no", "bf16" or "fp16")."""
        held = Precision.of(self.model.base.dtype).name
        choice = self.config.mixed_precision
        if choice in ("auto", "no") or choice == held:
            return held, "no"
        if held == "fp32":
            return choice, choice
        raise ConfigError(f"TrainConfig.mixed_precision={choice!r}, but the base model is held in {held}: "
                          f"load it with load_base_model(..., dtype={choice!r}) or use mixed_precision='auto'")

    def _param_groups(self) -> list[dict]:
        cfg, model = self.config, self.model
        inputs = [p for enc in model.encoders.values() for p in enc.inputs.values()]
        prompt = [*model.prompt_embeddings.parameters(), *inputs]
        encoder = [p for p in model.encoders.parameters() if all(p is not q for q in inputs)]
        groups = [{"params": prompt, "lr": cfg.lr, "base_lr": cfg.lr},
                  {"params": encoder, "lr": cfg.p_tuning_lr, "base_lr": cfg.p_tuning_lr},
                  {"params": list(model.deep_prompts.parameters()), "lr": cfg.deep_prompt_lr,
                   "base_lr": cfg.deep_prompt_lr}]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------------------------------ data
    def _global_batches(self, epoch: int) -> list[list[int]]:
        """This epoch's global batches (every process computes the same list)."""
        size = self.config.batch_size * self.accelerator.num_processes
        lengths = [len(e) for e in self.examples]
        if self.config.group_by_length:
            return length_grouped_batches(lengths, size, seed=self.config.seed + epoch)
        return length_grouped_batches([0] * len(lengths), size, seed=self.config.seed + epoch, group_factor=1)

    def _step_batches(self, step: int) -> list[list[int]]:
        """The ``grad_accum`` global micro-batches of one optimizer step: a function of the step alone."""
        per_epoch = math.ceil(len(self.examples) / (self.config.batch_size * self.accelerator.num_processes))
        out = []
        for k in range(step * self.config.grad_accum, (step + 1) * self.config.grad_accum):
            epoch, pos = divmod(k, per_epoch)
            out.append(self._global_batches(epoch)[pos])
        return out

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> list[dict]:
        """Train to ``max_steps`` (or early stop); returns the history (one dict per step and validation)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resume and self._has_checkpoint():
            self._resume()
            self._say(f"{self.checkpoint_path}: resuming at step {self.state.step} of {self.total_steps}")
        else:
            if resume:
                self._say(f"{self.checkpoint_path}: no checkpoint yet, starting a fresh run")
            torch.manual_seed(cfg.seed)
        self._say(f"training {', '.join(f'{t} ({self.model.method_of(t)})' for t in self.model.training_tasks())} "
                  f"on {self.model.base.device.type} in {self.precision}"
                  + (" with loss scaling" if self.scaler else "") + "; prompts and optimizer state in fp32")
        self._broadcast_parameters()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training",
                   disable=not (cfg.progress and self.accelerator.is_main_process))
        # a resumed run that had early-stopped stays stopped, as one that reached max_steps does
        stop = (cfg.early_stopping_patience is not None
                and self.state.evals_without_improvement >= cfg.early_stopping_patience)
        while self.state.step < self.total_steps and not stop:
            record = self.train_step(self.state.step)
            self.state.step += 1
            self.state.history.append(record)
            if cfg.max_time is not None and self.state.total_steps is None \
                    and self.state.step == min(CALIBRATION_STEPS, cfg.max_steps):
                self._fit_budget()
                bar.total = self.total_steps
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            last = self.state.step == self.total_steps
            if (cfg.eval_every and self.state.step % cfg.eval_every == 0) or last:
                stop = self._validate()
            if cfg.output_dir and ((cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0)
                                   or last or stop):
                self.save_checkpoint()
        bar.close()
        if cfg.keep_best and self.state.best_params is not None:
            self.model.load_state_dict(self.state.best_params, strict=False)
        self.model.eval()
        return self.state.history

    @property
    def total_steps(self) -> int:
        """The steps this run trains: max_steps, or what the time budget allows once it is measured."""
        return self.state.total_steps or self.config.max_steps

    def _fit_budget(self) -> None:
        """Set the step budget from the time budget and the step time measured so far (every process
        takes the smallest, so they all stop together)."""
        steps = [h for h in self.state.history if "loss" in h]
        per_step = sum(h["seconds"] for h in steps) / len(steps)
        budget = torch.tensor(max(self.state.step, min(self.config.max_steps, int(self.config.max_time / per_step))))
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            budget = budget.to(self.model.base.device)
            dist.all_reduce(budget, op=dist.ReduceOp.MIN)
        self.state.total_steps = int(budget)
        self._say(f"time budget {self.config.max_time:.0f} s at {per_step:.2f} s per step: "
                  f"{self.state.total_steps} of {self.config.max_steps} steps")

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over the step's global micro-batches; returns its history record."""
        cfg, acc, model = self.config, self.accelerator, self.model
        start = time.perf_counter()
        total = self.total_steps
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 10)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(step, total, warmup, cfg.min_lr_ratio)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        micro = self._step_batches(step)
        names = model.training_tasks()
        task_tokens = dict.fromkeys(names, 0)  # labelled tokens of each task in the global step
        for i in (i for idx in micro for i in idx):
            task_tokens[self.examples[i].taskname] += self._label_count([i])
        tokens = sum(task_tokens.values())
        loss_sum = torch.zeros((), device=model.base.device)
        task_sums = torch.zeros(len(names), device=model.base.device)  # summed token losses per task
        for idx in micro:
            mine = idx[acc.process_index :: acc.num_processes]  # this process's share
            if not mine:
                continue
            batch = collate([self.examples[i] for i in mine], model.tokenizer.pad_token_id, "right")
            with acc.autocast():
                row_sums = model(batch, reduction="none") * (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # (B,)
                loss = row_sums.sum() / tokens
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
            rows = torch.tensor([names.index(t) for t in batch["tasknames"]], device=task_sums.device)
            task_sums.index_add_(0, rows, row_sums.detach().float())
        self._sync_gradients(params, loss_sum, task_sums)
        if not bool(torch.isfinite(loss_sum)):
            hint = ("fp16 overflowed: train in fp32 or bf16 (load_base_model(..., dtype='fp32'), or 'bf16' on "
                    "hardware that has it)" if self.precision == "fp16" else
                    "lower the learning rates or check the data")
            raise TrainingError(f"step {step + 1}: the loss is {loss_sum.item()}; stopping rather than training "
                                f"on NaN. {hint}")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm
                     else torch.zeros(()))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # each task's own mean loss per labelled token this step (tasks absent from the step are left out)
        task_loss = {t: s / task_tokens[t] for t, s in zip(names, task_sums.tolist()) if task_tokens[t]}
        return {"step": step + 1, "loss": loss_sum.item(), "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm), "tokens": tokens, "task_loss": task_loss,
                "seconds": time.perf_counter() - start}

    def _label_count(self, idx: list[int]) -> int:
        return sum(sum(1 for t in self.examples[i].labels[1:] if t != IGNORE_INDEX) for i in idx)

    def _broadcast_parameters(self) -> None:
        """Start every process from the main process's prompts and encoders (as DDP does when it wraps a
        model): ranks whose random encoder init differed would otherwise drift apart silently."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in (p for g in self.optimizer.param_groups for p in g["params"]):
                dist.broadcast(p.data, src=0)

    def _sync_gradients(self, params: list[torch.Tensor], loss_sum: torch.Tensor, task_sums: torch.Tensor) -> None:
        """Sum prompt gradients (and the loss, overall and per task) over processes: the only communication of a step.

        A parameter that got no gradient on any process (its task was in no example of the global batch)
        keeps ``grad=None`` so the optimizer skips it, exactly as one process would; a zero gradient
        would still move it through Adam's momentum and weight decay.
        """
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=loss_sum.device)
        dist.all_reduce(has_grad)
        for p, n in zip(params, has_grad.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        dist.all_reduce(loss_sum)
        dist.all_reduce(task_sums)

    # ------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss per labelled token over the validation records of the tasks being trained (records of
        other tasks are ignored, as by the metrics: a frozen or prompt-less task has nothing to select), or
        over a seeded sample of ``eval_loss_records`` of them per task."""
        records = self._validation_subset(self.config.eval_loss_records)
        examples, _ = encode_records(records, self.model.tasks, self.model.tokenizer,
                                     self.config.max_seq_length, source="validation")
        total, count = 0.0, 0
        for _, batch in iter_batches(examples, self.config.eval_batch_size, self.model.tokenizer.pad_token_id):
            total += self.model(batch, reduction="sum").item()
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return total / max(count, 1)

    def _validate(self) -> bool:
        """Task metrics (and the validation loss when asked, or when there are no metrics); keeps the best
        prompts; True when early stopping says stop."""
        if not self.val_records:
            return False
        model, cfg = self.model, self.config
        model.eval()
        start = time.perf_counter()
        entry: dict[str, Any] = {"step": self.state.step}
        subset = self._validation_subset(cfg.eval_max_records)
        if cfg.eval_loss_records is not None or not subset:  # the loss costs about what the metrics do
            entry["val_loss"] = self.validation_loss()
        scores = []
        if subset:
            for task, metrics in evaluate(model, subset, batch_size=cfg.eval_batch_size, rank=False).items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and k != "n":
                        entry[f"val/{task}/{k}"] = v
                scores.append(primary_score(model.tasks[task], metrics))
        # the mean primary metric decides what is best; without metrics, the lower loss
        score = sum(scores) / len(scores) if scores else -entry["val_loss"]
        entry["val/score"] = score
        entry["seconds"] = time.perf_counter() - start  # validation's wall time, for time-to-target curves
        self.state.history.append(entry)
        model.train()
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.state.best_params = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
            self.state.evals_without_improvement = 0
            return False
        self.state.evals_without_improvement += 1
        return cfg.early_stopping_patience is not None and self.state.evals_without_improvement >= cfg.early_stopping_patience

    def _validation_subset(self, per_task: int | None) -> list[Mapping[str, Any]]:
        """``per_task`` validation records of each task being trained (None: all), sampled with the seed."""
        training = set(self.model.training_tasks())
        records = [r for r in self.val_records if r.get("taskname") in training]
        return records if per_task is None else sample_per_task(records, per_task, seed=self.config.seed)

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        if not self.config.output_dir:
            raise ConfigError("checkpoints need TrainConfig.output_dir")
        return Path(self.config.output_dir) / "checkpoint.safetensors"

    def save_checkpoint(self) -> None:
        """Atomically write prompts, optimizer, loss scale, RNG, step, best prompts and history (main process)."""
        if self.accelerator.is_main_process:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.state, self.config.resume_key(),
                            self.scaler)
        self.accelerator.wait_for_everyone()

    def _has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists()

    def _resume(self) -> None:
        self.state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.config.resume_key(),
                                     self.scaler)

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"promptlab: {message}")

