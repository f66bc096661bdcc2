"""`PromptLearningModel`: a frozen causal LM plus learned prompts, for training and mixed-task generation.

Three methods, any mix of them in one batch:
- prompt tuning and p-tuning learn input vectors. Virtual tokens are positions, not vocabulary: a collated
  batch carries, per position, the row of its task's prompt (or -1), and `embed` writes those rows over the
  frozen token embeddings. The rows come from a trainable `PromptEmbedding`, a shared `PromptEncoder`, or
  the frozen `PromptTable`.
- deep prompt tuning learns keys and values at every layer (`promptlab.deep`): `prefix_cache` lays each
  row's prefix into the attention cache, and its real tokens are numbered after it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.features import IGNORE_INDEX, collate, encode_records
from .data.sources import as_records
from .deep import DeepPrompt, DeepPromptConfig, build_prefix_cache, prefix_from_tokens
from .errors import CheckpointError, ConfigError, DataError
from .generation import backbone_call, generate_batch
from .io import check_same_layout, check_tensor_sums, load_checksummed, save_checksummed, tensor_sha256
from .models import BaseModel, count_parameters
from .packing import pack_batch, packed_inputs, should_pack
from .prompts import EncoderConfig, PromptEmbedding, PromptEncoder, PromptInit, initial_prompt
from .table import DEEP, PromptTable
from .templates import TaskTemplate


class PromptLearningModel(nn.Module):
    """A frozen causal LM with per-task learned prompts.

    Args:
        base: a `BaseModel` from `load_base_model` (its parameters stay frozen).
        tasks: task templates by name (or a list of them).
        prompt_table: a loaded table of frozen prompts; by default an empty one bound to ``base``.
    """

    def __init__(self, base: BaseModel, tasks: Mapping[str, TaskTemplate] | Sequence[TaskTemplate],
                 prompt_table: PromptTable | None = None, max_seq_length: int = 512):
        super().__init__()
        self.base = base
        self.lm = base.model  # registered as a submodule so .to() moves it; never trained
        self.tokenizer = base.tokenizer
        self.tasks: dict[str, TaskTemplate] = dict(tasks) if isinstance(tasks, Mapping) else {t.taskname: t for t in tasks}
        self.prompt_table = prompt_table if prompt_table is not None else PromptTable.for_base(base)
        for name, entry in self.prompt_table.entries().items():
            if entry.method == DEEP:  # its input has no virtual positions, whatever template was passed
                self.tasks[name] = entry.template
            given = self.tasks.setdefault(name, entry.template)
            if given.total_virtual_tokens != entry.template.total_virtual_tokens:
                raise ConfigError(f"task {name!r}: the template passed has {given.total_virtual_tokens} virtual "
                                  f"tokens, the prompt table's has {entry.template.total_virtual_tokens}: pass the "
                                  f"table's templates (or none) for the tasks it holds")
        self.max_seq_length = max_seq_length
        # pack batches (no padding, shared prefixes once) where `promptlab.packing` measured it faster:
        # same results, less work; off: padded rows
        self.pack_sequences = True
        self.prompt_embeddings = nn.ModuleDict()  # task -> PromptEmbedding (prompt tuning, training)
        self.encoders = nn.ModuleDict()  # "encoder0", ... -> PromptEncoder shared by its tasks (p-tuning)
        self.deep_prompts = nn.ModuleDict()  # task -> DeepPrompt (deep prompt tuning, training)

    def train(self, mode: bool = True) -> "PromptLearningModel":
        """Train mode for the prompts; the frozen base always stays in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        return self

    # ----------------------------------------------------------------------------------- adding tasks
    def _template(self, task: str) -> TaskTemplate:
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; known tasks: {sorted(self.tasks)}")
        return self.tasks[task]

    def _check_new(self, task: str) -> TaskTemplate:
        template = self._template(task)
        if task in self.training_tasks():
            raise ConfigError(f"task {task!r} is already being trained ({self.method_of(task)})")
        return template

    def _init(self, task: str, init: str, init_text: str | None, num_virtual_tokens: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        template = self._check_new(task)
        n = num_virtual_tokens or template.total_virtual_tokens
        if n != template.total_virtual_tokens:
            raise ConfigError(f"task {task!r}: num_virtual_tokens={n} but its template has "
                              f"{template.total_virtual_tokens} virtual tokens")
        if not n:
            raise ConfigError(f"task {task!r}: its template has no <|VIRTUAL_PROMPT_n|> marker, so prompt "
                              f"tuning and p-tuning have nowhere to put a prompt (deep prompt tuning needs none)")
        text = init_text or template.init_text
        return initial_prompt(n, self.lm.get_input_embeddings().weight, self.tokenizer, init, text, generator)

    def add_prompt_tuning(self, task: str, num_virtual_tokens: int | None = None, init_text: str | None = None,
                          init: str = "text", generator: torch.Generator | None = None) -> PromptEmbedding:
        """Train ``task`` by prompt tuning: its (V, D) prompt is the parameter."""
        values = self._init(task, init, init_text, num_virtual_tokens, generator)
        self.prompt_embeddings[task] = PromptEmbedding(values).to(self.base.device)
        return self.prompt_embeddings[task]

    def add_p_tuning(self, tasks: str | Sequence[str], encoder: str = "lstm", hidden_size: int = 256,
                     num_layers: int = 2, dropout: float = 0.0, residual: bool = True, init: str = "text",
                     init_text: str | Mapping[str, str] | None = None,
                     generator: torch.Generator | None = None) -> PromptEncoder:
        """Train ``tasks`` by p-tuning with one encoder shared by them all (each task has its own inputs)."""
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        texts = init_text if isinstance(init_text, Mapping) else {t: init_text for t in tasks}
        inputs = {t: self._init(t, init, texts.get(t), None, generator) for t in tasks}
        config = EncoderConfig(encoder, hidden_size, num_layers, dropout, residual)
        key = f"encoder{len(self.encoders)}"
        while key in self.encoders:
            key += "_"
        self.encoders[key] = PromptEncoder(inputs, self.base.hidden_size, config).to(self.base.device)
        return self.encoders[key]

    def add_deep_prompt_tuning(self, task: str, num_virtual_tokens: int | None = None, reparameterize: bool = True,
                               hidden_size: int = 512, init: str = "text", init_text: str | None = None,
                               generator: torch.Generator | None = None) -> DeepPrompt:
        """Train ``task`` by deep prompt tuning: a (L, 2, P, KV) key/value prefix at every layer.

        P is ``num_virtual_tokens`` or the template's virtual-token count; the template's markers are
        removed from its input (see `promptlab.deep` for why, and for the init and the MLP). Start from the text
        (the default): on sentiment a random start scored 0.65-0.69 against 0.91-0.95 from the text (bench/RESULTS.md).
        """
        template = self._check_new(task)
        config = DeepPromptConfig(num_virtual_tokens or template.total_virtual_tokens, reparameterize, hidden_size)
        n = config.num_virtual_tokens
        text = init_text or template.init_text
        embeddings = self.lm.get_input_embeddings().weight
        inputs = initial_prompt(n, embeddings, self.tokenizer, init, text, generator)  # (P, D)
        # the token ids behind those inputs (the text's, tiled; or the sampled rows): their nearest rows
        ids = torch.cdist(inputs.to(embeddings.device), embeddings.detach().float()).argmin(-1)  # (P,)
        start = prefix_from_tokens(self.lm, ids)  # (L, 2, P, KV)
        if str(getattr(init, "value", init)).lower() == PromptInit.RANDOM.value:
            noise = torch.randn(start.shape, generator=generator).to(start.device)
            start = noise * start.std(dim=(2, 3), keepdim=True)  # per layer, keys and values at their own scale
        self.tasks[task] = template.without_virtual_tokens()
        self.deep_prompts[task] = DeepPrompt(start, inputs, config).to(self.base.device)
        return self.deep_prompts[task]

    def add_task(self, task: str, **options) -> nn.Module:
        """Train ``task`` the way its template's ``recipe`` says (method and options; ``options`` override
        them); a task without a recipe gets prompt tuning. Returns the new trainable module."""
        template = self._template(task)
        method = template.recipe_method
        settings = {**{k: v for k, v in (template.recipe or {}).items() if k not in ("method", "training")},
                    **options}
        if method == "prompt_tuning":
            return self.add_prompt_tuning(task, **settings)
        if method == "p_tuning":
            return self.add_p_tuning([task], **settings)
        return self.add_deep_prompt_tuning(task, **settings)

    def _encoder_of(self, task: str) -> PromptEncoder | None:
        return next((e for e in self.encoders.values() if task in e.inputs), None)

    def training_tasks(self) -> list[str]:
        return (list(self.prompt_embeddings) + [t for e in self.encoders.values() for t in e.tasks]
                + list(self.deep_prompts))

    def method_of(self, task: str) -> str:
        if task in self.prompt_embeddings:
            return "prompt_tuning"
        if self._encoder_of(task) is not None:
            return "p_tuning"
        if task in self.deep_prompts:
            return DEEP
        return self.prompt_table.entry(task).method

    # --------------------------------------------------------------------------------------- prompts
    def prompt(self, task: str) -> torch.Tensor:
        """The task's current prompt, (V, D) float32: trainable, encoder output, or frozen table row."""
        if task in self.prompt_embeddings:
            return self.prompt_embeddings[task]()
        encoder = self._encoder_of(task)
        if encoder is not None:
            return encoder(task)
        if task in self.prompt_table and self.prompt_table.entry(task).method != DEEP:
            return self.prompt_table[task]
        raise ConfigError(f"task {task!r} has no input prompt (neither training nor in the table); "
                          f"tasks with prompts: {sorted(self.training_tasks() + self.prompt_table.tasks())}")

    def prefix(self, task: str) -> torch.Tensor | None:
        """The task's deep prompt, (L, 2, P, KV) float32, or None for a task without one."""
        if task in self.deep_prompts:
            return self.deep_prompts[task]()
        if task in self.prompt_table and self.prompt_table.entry(task).method == DEEP:
            return self.prompt_table[task]
        return None

    def prompt_values(self, task: str) -> torch.Tensor:
        """What the table stores for the task: its deep prefix or its input prompt."""
        return self.prefix(task) if self.method_of(task) == DEEP else self.prompt(task)

    def freeze(self, tasks: Sequence[str] | None = None) -> None:
        """Move trained prompts into the table as frozen entries; drop encoders left with no task."""
        tasks = self.training_tasks() if tasks is None else list(tasks)
        with torch.no_grad():
            for task in tasks:
                method = self.method_of(task)
                self.prompt_table.replace(task, self.prompt_values(task).detach(), self._template(task), method)
        for task in tasks:
            if task in self.prompt_embeddings:
                del self.prompt_embeddings[task]
            elif task in self.deep_prompts:
                del self.deep_prompts[task]
            else:
                encoder = self._encoder_of(task)
                if encoder is not None:
                    del encoder.inputs[task]
        for key in [k for k, e in self.encoders.items() if not e.tasks]:
            del self.encoders[key]

    # ---------------------------------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor, virtual_index: torch.Tensor, tasknames: Sequence[str]) -> torch.Tensor:
        """Token embeddings with each row's virtual positions replaced by its task's prompt rows.

        input_ids, virtual_index: (B, T); returns (B, T, D) in the base model's dtype. This is the only
        place prompts enter the model.
        """
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        is_virtual = virtual_index >= 0  # (B, T)
        if not bool(is_virtual.any()):  # e.g. baselines: templates without virtual tokens
            return tokens
        names = list(dict.fromkeys(tasknames))
        prompts = [self.prompt(t) if self._template(t).total_virtual_tokens else tokens.new_zeros(1, tokens.shape[-1])
                   for t in names]
        width = max(p.shape[0] for p in prompts)
        stack = torch.stack([F.pad(p.float(), (0, 0, 0, width - p.shape[0])) for p in prompts])  # (K, Vmax, D)
        row_task = torch.tensor([names.index(t) for t in tasknames], device=input_ids.device)  # (B,)
        gathered = stack[row_task[:, None].expand_as(virtual_index), virtual_index.clamp(min=0)]  # (B, T, D)
        return torch.where(is_virtual[..., None], gathered.to(tokens.dtype), tokens)

    def prefix_cache(self, tasknames: Sequence[str]):
        """The attention cache of a batch's deep prompts: (cache, prefix mask (B, Pmax)), or None when no
        row has one. The only place deep prompts enter the model; rows without one get masked slots."""
        by_task = {t: self.prefix(t) for t in dict.fromkeys(tasknames)}
        if all(p is None for p in by_task.values()):
            return None
        return build_prefix_cache(self.lm, [by_task[t] for t in tasknames], self.base.dtype)

    @staticmethod
    def position_ids(attention_mask: torch.Tensor, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding never shifts a prompt; after a deep
        prompt of P positions they start at P. (B, T)"""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions if prefix_mask is None else positions + prefix_mask.sum(-1, keepdim=True)

    def backbone_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """What the frozen backbone gets for a padded batch: embeddings, mask, positions, prefix cache."""
        embeds = self.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
        mask = batch["attention_mask"]
        prefix = self.prefix_cache(batch["tasknames"])
        if prefix is None:
            return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": self.position_ids(mask)}
        cache, prefix_mask = prefix
        return {"inputs_embeds": embeds, "attention_mask": torch.cat([prefix_mask, mask], 1),  # (B, Pmax+T)
                "position_ids": self.position_ids(mask, prefix_mask), "cache": cache}

    def hidden_states(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Last hidden states of the frozen backbone, (B, T, D)."""
        return backbone_call(self.lm, use_cache=False, **self.backbone_inputs(batch)).last_hidden_state

    def forward(self, batch: Mapping[str, Any], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the labelled tokens; the LM head runs only where a label exists.

        ``reduction``: "mean" over all labelled tokens (a scalar), "sum", or "none" (per example mean, (B,)).
        """
        batch = self.to_device(batch)
        targets = batch["labels"][:, 1:]  # position t predicts token t+1
        has_label = targets != IGNORE_INDEX  # (B, T-1)
        logits = self.lm.get_output_embeddings()(self._labelled_hidden(batch, has_label))  # (N, vocab)
        token_loss = F.cross_entropy(logits.float(), targets[has_label], reduction="none")  # (N,)
        if reduction == "mean":
            return token_loss.mean()
        if reduction == "sum":
            return token_loss.sum()
        rows = has_label.nonzero()[:, 0]
        per_row = torch.zeros(len(targets), device=token_loss.device).index_add_(0, rows, token_loss)
        return per_row / has_label.sum(1).clamp(min=1)

    def _labelled_hidden(self, batch: Mapping[str, Any], has_label: torch.Tensor) -> torch.Tensor:
        """Hidden states at the N positions that predict a label, (N, D); packed when that saves work."""
        plan = None
        if self.can_pack(batch["tasknames"]):
            plan = pack_batch(batch["input_ids"], batch["virtual_index"], batch["attention_mask"], batch["tasknames"])
        if plan is None:
            return self.hidden_states(batch)[:, :-1][has_label]
        embeds = self.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
        packed, mask = packed_inputs(self.lm, embeds, plan)  # (R, S, D), (R, 1, S, S)
        out = backbone_call(self.lm, inputs_embeds=packed, attention_mask=mask, position_ids=plan.position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state.reshape(-1, packed.shape[-1])  # (R*S, D)
        return hidden[plan.target[:, :-1][has_label]]

    def can_pack(self, tasknames: Sequence[str]) -> bool:
        """Whether a batch of these tasks is packed: packing is on, measured worth it on this device, and
        no row has a deep prompt (a packed row would need several tasks' prefixes at once)."""
        return self.pack_sequences and should_pack(self.lm) and all(self.prefix(t) is None for t in set(tasknames))

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.base.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------------- generation
    def check_records(self, records: Sequence[Mapping[str, Any]]) -> None:
        for i, r in enumerate(records):
            name = r.get("taskname") if isinstance(r, Mapping) else None
            if name not in self.tasks:
                raise DataError(f"record {i + 1}: unknown task {name!r}; known tasks: {sorted(self.tasks)}")

    @torch.no_grad()
    def generate(self, records: Sequence[Mapping[str, Any]], max_new_tokens: int = 30, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                 batch_size: int = 16, seed: int | None = None) -> list[str]:
        """One generated answer per record (dicts, or rows of a `datasets.Dataset`); a batch may mix any
        tasks that have prompts.

        Greedy by default. Decoding stops at EOS or at any ``stop`` string (cut from the text), per row.
        """
        records = as_records(records, "generate")
        self.check_records(records)
        budget = self.max_seq_length - max_new_tokens
        examples, stats = encode_records(records, self.tasks, self.tokenizer, budget, with_answer=False,
                                         source="generate")
        if stats.skipped:
            raise DataError(f"generate: {sum(stats.skipped.values())} record(s) do not fit max_seq_length="
                            f"{self.max_seq_length} minus max_new_tokens={max_new_tokens}: {stats.skipped}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.base.device).manual_seed(seed)
        outputs = [""] * len(records)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths together
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([examples[i] for i in idx], self.tokenizer.pad_token_id, padding_side="left")
            texts = generate_batch(self, self.to_device(batch), max_new_tokens, do_sample, temperature, top_p,
                                   list(stop or []), generator)
            for i, text in zip(idx, texts):
                outputs[i] = text
        return outputs

    # --------------------------------------------------------------------------------- introspection
    def parameter_counts(self) -> list[dict]:
        """Per task: method, virtual tokens, trainable parameters (encoders split over their tasks)."""
        rows = []
        for task in self.prompt_embeddings:
            n = self.prompt_embeddings[task].weight.numel()
            rows.append({"task": task, "method": "prompt_tuning", "state": "training",
                         "virtual_tokens": self.tasks[task].total_virtual_tokens, "trainable": n, "stored": n})
        for key, enc in self.encoders.items():
            shared = count_parameters(enc) - sum(p.numel() for p in enc.inputs.values())
            for task in enc.tasks:
                own = enc.inputs[task].numel()
                rows.append({"task": task, "method": "p_tuning", "state": f"training ({key}, shared by "
                             f"{len(enc.tasks)})", "virtual_tokens": self.tasks[task].total_virtual_tokens,
                             "trainable": own + shared // len(enc.tasks), "stored": own})
        for task, deep in self.deep_prompts.items():
            n = count_parameters(deep)
            rows.append({"task": task, "method": DEEP, "state": "training" + (" (through an MLP)" if
                         deep.config.reparameterize else ""), "virtual_tokens": deep.num_virtual_tokens,
                         "trainable": n, "stored": deep().numel()})
        for row in self.prompt_table.describe():
            if row["task"] not in self.training_tasks():
                rows.append({"task": row["task"], "method": row["method"], "state": "frozen (table)",
                             "virtual_tokens": row["virtual_tokens"], "trainable": 0, "stored": row["parameters"]})
        return rows

    def parameter_summary(self) -> str:
        """The parameter table as text, with the frozen base's size for scale."""
        base = count_parameters(self.lm)
        lines = [f"{'task':<18}{'method':<20}{'virtual':>8}{'trainable':>12}{'stored':>10}  state"]
        for r in self.parameter_counts():
            lines.append(f"{r['task']:<18}{r['method']:<20}{r['virtual_tokens']:>8}{r['trainable']:>12,}"
                         f"{r['stored']:>10,}  {r['state']}")
        trainable = count_parameters(self, trainable_only=True)
        lines.append(f"trainable parameters: {trainable:,} of {trainable + base:,} "
                     f"({100 * trainable / (trainable + base):.3f}%); frozen base {self.base.name}: {base:,}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------- trainable state (resume)
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the learned parameters: prompt embeddings, encoders, deep prompts (never the frozen base)."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("prompt_embeddings.", "encoders.", "deep_prompts."))}

    def trainable_spec(self) -> dict:
        """What `load_trainable` needs to rebuild the trainable modules."""
        return {"prompt_tuning": list(self.prompt_embeddings),
                "encoders": {k: {"tasks": e.tasks, "config": vars(e.config)} for k, e in self.encoders.items()},
                "deep_prompts": {t: vars(d.config) for t, d in self.deep_prompts.items()},
                "templates": {t: self.tasks[t].to_dict() for t in self.training_tasks()},
                "base_fingerprint": self.base.fingerprint}

    def save_trainable(self, path: str | Path) -> None:
        """Save the unfrozen prompts and encoders (to resume training later), safetensors only."""
        tensors = self.trainable_state_dict()
        spec = {**self.trainable_spec(), "sha256": {k: tensor_sha256(v) for k, v in tensors.items()}}
        save_checksummed(path, tensors, "promptlab_trainable", spec)

    def load_trainable(self, path: str | Path) -> None:
        """Rebuild and restore the trainable modules saved by `save_trainable`, exactly."""
        tensors, spec = load_checksummed(path, "promptlab_trainable", CheckpointError, "promptlab trainable file")
        check_tensor_sums(path, tensors, spec.get("sha256"), CheckpointError)
        try:
            self.restore_trainable(spec, tensors, str(path))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed trainable-prompt metadata: {exc}") from exc

    def restore_trainable(self, spec: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
        if not isinstance(spec.get("base_fingerprint"), str) or not self.base.matches(spec["base_fingerprint"]):
            raise CheckpointError(f"{where}: trained on another base model (embedding fingerprint differs)")
        self.prompt_embeddings.clear()
        self.encoders.clear()
        self.deep_prompts.clear()
        dim = self.base.hidden_size
        for task, t in spec["templates"].items():
            self.tasks.setdefault(task, TaskTemplate.from_dict(t))
        for task in spec["prompt_tuning"]:
            n = self.tasks[task].total_virtual_tokens
            self.prompt_embeddings[task] = PromptEmbedding(torch.zeros(n, dim)).to(self.base.device)
        for key, enc in spec["encoders"].items():
            inputs = {t: torch.zeros(self.tasks[t].total_virtual_tokens, dim) for t in enc["tasks"]}
            self.encoders[key] = PromptEncoder(inputs, dim, EncoderConfig(**enc["config"])).to(self.base.device)
        layers, width = self.base.prefix_shape
        for task, settings in spec.get("deep_prompts", {}).items():  # absent in files before deep prompts
            config = DeepPromptConfig(**settings)
            start = torch.zeros(layers, 2, config.num_virtual_tokens, width)
            inputs = torch.zeros(config.num_virtual_tokens, dim)
            self.deep_prompts[task] = DeepPrompt(start, inputs, config).to(self.base.device)
            self.tasks[task] = TaskTemplate.from_dict(spec["templates"][task])  # without its markers
        check_same_layout(where, "parameters", self.trainable_state_dict(), tensors, CheckpointError)
        self.load_state_dict(tensors, strict=False)
