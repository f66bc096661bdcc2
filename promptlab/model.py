"""`PromptLearningModel`: a frozen causal LM plus learned prompts, for training and mixed-task generation.

Virtual tokens are positions, not vocabulary: a collated batch carries, per position, the row of its
task's prompt (or -1), and `embed` writes those rows over the frozen token embeddings. Each task's prompt
comes from a trainable `PromptEmbedding`, a shared `PromptEncoder`, or the frozen `PromptTable`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.features import IGNORE_INDEX, collate, encode_records, pack_batch
from .errors import CheckpointError, DataError
from .io import check_same_layout, check_tensor_sums, load_signed, save_signed, tensor_sha256
from .models import BaseModel, count_parameters
from .prompts import EncoderConfig, PromptEmbedding, PromptEncoder, initial_prompt
from .table import PromptTable
from .templates import TaskTemplate


def _packs(lm: nn.Module) -> bool:
    """Whether the backbone takes a ready (B, 1, T, T) attention mask: transformers' mask utilities with
    SDPA or eager attention (other kernels, e.g. flash-attention, get padded rows)."""
    import importlib.util

    return (getattr(lm.config, "_attn_implementation", None) in ("sdpa", "eager")
            and importlib.util.find_spec("transformers.masking_utils") is not None)


# Text the prompts of the tutorial tasks start from when no init_text is given (text init). The sentiment
# one reached 0.934 validation accuracy after 150 steps on Financial PhraseBank (bench/quality.py).
DEFAULT_INIT_TEXTS = {
    "sentiment": "Classify the sentiment of this financial news as positive, neutral or negative",
    "intent_and_slot": "Predict the intent and the slots of this assistant request",
    "squad": "Answer the question with a short span copied from the context",
}


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
        for name in self.prompt_table:
            self.tasks.setdefault(name, self.prompt_table.entry(name).template)
        self.max_seq_length = max_seq_length
        # the loss packs each batch (no padding, shared prefixes once): same result, less work; off: padded rows
        self.pack_sequences = True
        self.prompt_embeddings = nn.ModuleDict()  # task -> PromptEmbedding (prompt tuning, training)
        self.encoders = nn.ModuleDict()  # "encoder0", ... -> PromptEncoder shared by its tasks (p-tuning)

    def train(self, mode: bool = True) -> "PromptLearningModel":
        """Train mode for the prompts; the frozen base always stays in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        return self

    # ----------------------------------------------------------------------------------- adding tasks
    def _template(self, task: str) -> TaskTemplate:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known tasks: {sorted(self.tasks)}")
        return self.tasks[task]

    def _init(self, task: str, init: str, init_text: str | None, num_virtual_tokens: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        template = self._template(task)
        if task in self.prompt_embeddings or self._encoder_of(task) is not None:
            raise ValueError(f"task {task!r} is already being trained")
        n = num_virtual_tokens or template.total_virtual_tokens
        if n != template.total_virtual_tokens:
            raise ValueError(f"task {task!r}: num_virtual_tokens={n} but its template has "
                             f"{template.total_virtual_tokens} virtual tokens")
        text = init_text or DEFAULT_INIT_TEXTS.get(task)
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

    def _encoder_of(self, task: str) -> PromptEncoder | None:
        return next((e for e in self.encoders.values() if task in e.inputs), None)

    def training_tasks(self) -> list[str]:
        return list(self.prompt_embeddings) + [t for e in self.encoders.values() for t in e.tasks]

    def method_of(self, task: str) -> str:
        if task in self.prompt_embeddings:
            return "prompt_tuning"
        if self._encoder_of(task) is not None:
            return "p_tuning"
        return self.prompt_table.entry(task).method

    # --------------------------------------------------------------------------------------- prompts
    def prompt(self, task: str) -> torch.Tensor:
        """The task's current prompt, (V, D) float32: trainable, encoder output, or frozen table row."""
        if task in self.prompt_embeddings:
            return self.prompt_embeddings[task]()
        encoder = self._encoder_of(task)
        if encoder is not None:
            return encoder(task)
        if task in self.prompt_table:
            return self.prompt_table[task]
        raise KeyError(f"task {task!r} has no prompt (neither training nor in the table); "
                       f"tasks with prompts: {sorted(self.training_tasks() + self.prompt_table.tasks())}")

    def freeze(self, tasks: Sequence[str] | None = None) -> None:
        """Move trained prompts into the table as frozen entries; drop encoders left with no task."""
        tasks = self.training_tasks() if tasks is None else list(tasks)
        with torch.no_grad():
            for task in tasks:
                method = self.method_of(task)
                self.prompt_table.replace(task, self.prompt(task).detach(), self._template(task), method)
        for task in tasks:
            if task in self.prompt_embeddings:
                del self.prompt_embeddings[task]
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

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding never shifts a prompt. (B, T)"""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Last hidden states of the frozen backbone, (B, T, D)."""
        embeds = self.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])
        mask = batch["attention_mask"]
        out = self.lm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids(mask),
                                 use_cache=False)
        return out.last_hidden_state

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
        if self.pack_sequences and _packs(self.lm):
            plan = pack_batch(batch["input_ids"], batch["virtual_index"], batch["attention_mask"], batch["tasknames"])
        if plan is None:
            return self.hidden_states(batch)[:, :-1][has_label]
        embeds = self.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
        packed, mask = self.packed_inputs(embeds, plan)
        out = self.lm.base_model(inputs_embeds=packed, attention_mask=mask, position_ids=plan.position_ids,
                                 use_cache=False)
        hidden = out.last_hidden_state.reshape(-1, packed.shape[-1])  # (R*S, D)
        return hidden[plan.target[:, :-1][has_label]]

    def packed_inputs(self, embeds: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) embeddings gathered into the plan's (R, S, D) rows, and the backbone's 4D mask."""
        packed = embeds.reshape(-1, embeds.shape[-1])[plan.source]  # (R, S, D)
        mask = plan.attention  # (R, 1, S, S) bool, used as is by SDPA; eager attention adds a float mask
        if self.lm.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=packed.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(packed.dtype).min)
        return packed, mask

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
        """One generated answer per record; a batch may mix any tasks that have prompts.

        Greedy by default. Decoding stops at EOS or at any ``stop`` string (cut from the text), per row.
        """
        from .generation import generate_batch

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
        for row in self.prompt_table.describe():
            if row["task"] not in self.training_tasks():
                rows.append({"task": row["task"], "method": row["method"], "state": "frozen (table)",
                             "virtual_tokens": row["virtual_tokens"], "trainable": 0, "stored": row["parameters"]})
        return rows

    def parameter_summary(self) -> str:
        """The parameter table as text, with the frozen base's size for scale."""
        base = count_parameters(self.lm)
        lines = [f"{'task':<18}{'method':<15}{'virtual':>8}{'trainable':>12}{'stored':>10}  state"]
        for r in self.parameter_counts():
            lines.append(f"{r['task']:<18}{r['method']:<15}{r['virtual_tokens']:>8}{r['trainable']:>12,}"
                         f"{r['stored']:>10,}  {r['state']}")
        trainable = count_parameters(self, trainable_only=True)
        lines.append(f"trainable parameters: {trainable:,} of {trainable + base:,} "
                     f"({100 * trainable / (trainable + base):.3f}%); frozen base {self.base.name}: {base:,}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------- trainable state (resume)
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the learned parameters: prompt embeddings and encoders (never the frozen base)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("prompt_embeddings.", "encoders."))}

    def trainable_spec(self) -> dict:
        """What `load_trainable` needs to rebuild the trainable modules."""
        return {"prompt_tuning": list(self.prompt_embeddings),
                "encoders": {k: {"tasks": e.tasks, "config": vars(e.config)} for k, e in self.encoders.items()},
                "templates": {t: self.tasks[t].to_dict() for t in self.training_tasks()},
                "base_fingerprint": self.base.fingerprint}

    def save_trainable(self, path: str | Path) -> None:
        """Save the unfrozen prompts and encoders (to resume training later), safetensors only."""
        tensors = self.trainable_state_dict()
        spec = {**self.trainable_spec(), "sha256": {k: tensor_sha256(v) for k, v in tensors.items()}}
        save_signed(path, tensors, "promptlab_trainable", spec)

    def load_trainable(self, path: str | Path) -> None:
        """Rebuild and restore the trainable modules saved by `save_trainable`, exactly."""
        tensors, spec = load_signed(path, "promptlab_trainable", CheckpointError, "promptlab trainable file")
        check_tensor_sums(path, tensors, spec.get("sha256"), CheckpointError)
        try:
            self.restore_trainable(spec, tensors, str(path))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed trainable-prompt metadata: {exc}") from exc

    def restore_trainable(self, spec: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
        if spec.get("base_fingerprint") != self.base.fingerprint:
            raise CheckpointError(f"{where}: trained on another base model (embedding fingerprint differs)")
        self.prompt_embeddings.clear()
        self.encoders.clear()
        dim = self.base.hidden_size
        for task, t in spec["templates"].items():
            self.tasks.setdefault(task, TaskTemplate.from_dict(t))
        for task in spec["prompt_tuning"]:
            n = self.tasks[task].total_virtual_tokens
            self.prompt_embeddings[task] = PromptEmbedding(torch.zeros(n, dim)).to(self.base.device)
        for key, enc in spec["encoders"].items():
            inputs = {t: torch.zeros(self.tasks[t].total_virtual_tokens, dim) for t in enc["tasks"]}
            self.encoders[key] = PromptEncoder(inputs, dim, EncoderConfig(**enc["config"])).to(self.base.device)
        check_same_layout(where, "parameters", self.trainable_state_dict(), tensors, CheckpointError)
        self.load_state_dict(tensors, strict=False)
