"""Shared helpers of the benchmarks: real data, machine facts, the PEFT side, and RESULTS.md sections.

PEFT is a bench-only extra (``pip install -e .[bench]``); the library never imports it. Everything PEFT
is given comes from promptlab's own encoding of the same records, so both see identical token ids: for
templates whose virtual tokens all come first (sentiment: ``<|VIRTUAL_PROMPT_0|> {sentence} sentiment:
{label}``), dropping the virtual positions leaves exactly the text PEFT needs after its prefix, and the
labels stay answer-only.
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- data
def data_dir() -> Path:
    """Where prepared splits are cached (``PROMPTLAB_BENCH_DATA``, else a folder in the temp dir)."""
    return Path(os.environ.get("PROMPTLAB_BENCH_DATA", Path(tempfile.gettempdir()) / "promptlab-bench-data"))


def load_split(name: str, split: str) -> list[dict]:
    """Records of one split of a real dataset, prepared once from ``$PROMPTLAB_DATA_MIRROR`` (or the web).

    SQuAD is built ``from_dev`` (the dev file split by article 80/10/10), the others by their default rule.
    """
    from promptlab.data.jsonl import read_jsonl
    from promptlab.data.prepare import prepare_dataset

    folder = data_dir() / name
    if not (folder / "manifest.json").is_file():
        prepare_dataset(name, folder, source="remote", from_dev=(name == "squad"), progress=False)
    return list(read_jsonl(folder / f"{split}.jsonl"))


# ------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    from promptlab.precision import cpu_name

    return cpu_name()


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare numbers: hardware, threads, load, library versions."""
    import transformers

    import promptlab

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    info = {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "torch threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "promptlab": promptlab.__version__,
        "os": platform.platform(),
    }
    try:
        info["load average at start (1/5/15 min)"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def machine_markdown(info: Mapping[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"python bench/{Path(sys.argv[0]).name}{' ' + args if args else ''}"


# ------------------------------------------------------------------------------------------ results
def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table; floats get 3 decimals (or 1 when >= 10), None shows as a dash."""
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


RESULTS_HEADER = """# promptlab benchmarks: results

Produced by the scripts in `bench/` (see `bench/README.md`); each section is rewritten by the script named
in it, with the machine it ran on and the exact command.
"""


def write_section(name: str, text: str, path: Path | None = None) -> None:
    """Replace (or append) the section between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` of ``path``
    (default: RESULTS.md in ``BENCH``)."""
    path = path or BENCH / "RESULTS.md"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    old = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    block = f"{begin}\n{text.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


# --------------------------------------------------------------------------------------- PEFT side
def peft_example(example) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, V) of a promptlab `Example` whose virtual tokens all come first, without them."""
    v = sum(1 for i in example.virtual_index if i >= 0)
    if list(example.virtual_index[:v]) != list(range(v)) or any(i >= 0 for i in example.virtual_index[v:]):
        raise ValueError(f"task {example.taskname!r}: PEFT needs every virtual token in front (a prefix)")
    return list(example.input_ids[v:]), list(example.labels[v:]), v


def peft_collate(examples, pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad PEFT's view of promptlab examples: input_ids, attention_mask, labels (answer-only), (B, T)."""
    items = [peft_example(e)[:2] for e in examples]
    width = max(len(ids) for ids, _ in items)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in items:
        pad = width - len(ids)
        rows = {"input_ids": (ids, pad_id), "attention_mask": ([1] * len(ids), 0), "labels": (labels, IGNORE_INDEX)}
        for key, (values, fill) in rows.items():
            out[key].append(values + [fill] * pad if side == "right" else [fill] * pad + values)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def peft_prompt_tuning(base, num_virtual_tokens: int, init_text: str | None, adapter: str = "default",
                       peft_model=None):
    """A PEFT prompt-tuning model (TEXT init through the base's tokenizer folder) or a new adapter on one."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                prompt_tuning_init=PromptTuningInit.TEXT if init_text else PromptTuningInit.RANDOM,
                                prompt_tuning_init_text=init_text, tokenizer_name_or_path=tokenizer_dir(base))
    if peft_model is not None:
        peft_model.add_adapter(adapter, config)
        return peft_model
    return get_peft_model(base.model, config, adapter_name=adapter)


def peft_p_tuning(base, num_virtual_tokens: int, hidden_size: int = 256, encoder: str = "LSTM"):
    """A PEFT p-tuning model (``PromptEncoder``: LSTM or MLP reparameterization)."""
    from peft import PromptEncoderConfig, get_peft_model

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                 encoder_reparameterization_type=encoder, encoder_hidden_size=hidden_size)
    return get_peft_model(base.model, config)


def tokenizer_dir(base) -> str:
    """A local folder holding the base's tokenizer (PEFT's TEXT init loads a tokenizer by name or path)."""
    folder = Path(tempfile.gettempdir()) / "promptlab-bench-tokenizer" / re.sub(r"\W+", "_", base.name)
    if not (folder / "tokenizer_config.json").is_file():
        base.tokenizer.save_pretrained(folder)
    return str(folder)


def peft_trainable(peft_model) -> list[torch.nn.Parameter]:
    return [p for p in peft_model.parameters() if p.requires_grad]


def peft_loss(peft_model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's own loss: the base model's mean cross-entropy over the labelled tokens (full-vocab logits)."""
    return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss


def lr_at(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """The same warmup + cosine multiplier as promptlab's Trainer (a pure function of the step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_peft(peft_model, examples, pad_id: int, max_steps: int, lr: float, batch_size: int = 8, seed: int = 1234,
               warmup_steps: int | None = None, min_lr_ratio: float = 0.1, max_grad_norm: float = 1.0,
               log=None, checkpoint: Path | None = None, checkpoint_every: int = 50,
               validate=None, validate_every: int = 0) -> list[dict]:
    """PEFT trained with exactly promptlab's Trainer loop: its length-grouped batch order (same seed),
    AdamW, warmup + cosine, clipping; only the model call and its loss are PEFT's.

    ``checkpoint``: a file written every ``checkpoint_every`` steps (trainable weights, optimizer, history) and
    resumed from when it exists: the batch order is a function of the seed and the step, so a resumed run
    takes the same batches. ``validate(step) -> score``, called every ``validate_every`` steps, adds a history
    entry with ``val/score`` and its wall time (``seconds``), as promptlab's Trainer does."""
    from promptlab.data.features import length_grouped_batches
    from promptlab.io import atomic_write_bytes

    params = peft_trainable(peft_model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = warmup_steps if warmup_steps is not None else max(1, max_steps // 10)
    per_epoch = math.ceil(len(examples) / batch_size)
    lengths = [len(e) for e in examples]
    history, epoch_batches = [], {}
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        with torch.no_grad():
            for p, value in zip(params, saved["params"]):
                p.copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        history = saved["history"]
    done = sum(1 for h in history if "loss" in h)  # steps already trained (history also holds validations)
    if done and log:
        log(f"  peft: resumed from {checkpoint} at step {done}")
    peft_model.train()
    peft_model.base_model.eval()  # the frozen base never trains (no dropout), as in promptlab
    for step in range(done, max_steps):
        start = time.perf_counter()
        epoch, pos = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: length_grouped_batches(lengths, batch_size, seed=seed + epoch)}
        idx = epoch_batches[epoch][pos]
        for g in optimizer.param_groups:
            g["lr"] = lr * lr_at(step, max_steps, warmup, min_lr_ratio)
        batch = peft_collate([examples[i] for i in idx], pad_id, "right")
        loss = peft_loss(peft_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item(), "tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
                        "seconds": time.perf_counter() - start})
        if log and (step + 1) % 25 == 0:
            log(f"  peft step {step + 1}/{max_steps} loss {loss.item():.4f}")
        if validate is not None and validate_every and (step + 1) % validate_every == 0:
            start = time.perf_counter()
            score = validate(step + 1)
            history.append({"step": step + 1, "val/score": score, "seconds": time.perf_counter() - start})
            peft_model.train()
            peft_model.base_model.eval()
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < max_steps:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict(),
                        "history": history}, buffer)
            atomic_write_bytes(checkpoint, buffer.getvalue())
    peft_model.eval()
    return history


@torch.no_grad()
def peft_rank_labels(peft_model, examples_by_label: Sequence[Sequence], pad_id: int, batch_size: int = 16) -> list[int]:
    """Index of the most likely label per record: ``examples_by_label[r][k]`` is record r with label k
    (answer tokens plus EOS scored, summed log-likelihood, the same rule as promptlab's rank_labels)."""
    flat = [e for row in examples_by_label for e in row]
    scores = torch.empty(len(flat))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        batch = peft_collate(chunk, pad_id, "right")
        v = peft_example(chunk[0])[2]
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, v:]
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        mask = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        scores[start : start + len(chunk)] = (picked * mask).sum(1)
    k = len(examples_by_label[0])
    return scores.view(-1, k).argmax(1).tolist()


@torch.no_grad()
def peft_generate(peft_model, examples, tokenizer, max_new_tokens: int, batch_size: int = 16,
                  stop: str | None = "\n\n") -> tuple[list[str], int]:
    """Greedy answers with PEFT's generate (left padding), cut at EOS and ``stop``; also the token count."""
    out, produced = [""] * len(examples), 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = peft_collate([examples[i] for i in idx], tokenizer.pad_token_id, "left")
        gen = peft_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        produced += _decode_rows(gen[:, batch["input_ids"].shape[1]:], idx, out, tokenizer, stop)
    return out, produced


def _decode_rows(new_tokens: torch.Tensor, idx: list[int], out: list[str], tokenizer, stop: str | None) -> int:
    """Write each row's text (cut at EOS and ``stop``) into ``out[idx[row]]``; returns the tokens kept."""
    produced = 0
    for row, i in enumerate(idx):
        ids = new_tokens[row].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        produced += len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop and stop in text:
            text = text[: text.index(stop)]
        out[i] = text.strip()
    return produced


def peft_prompt_vectors(peft_model) -> torch.Tensor:
    """The (V, D) virtual-token embeddings PEFT puts in front of every example (prompt encoder run)."""
    with torch.no_grad():
        return peft_model.get_prompt(batch_size=1)[0].detach()


@torch.no_grad()
def generate_with_prompt(base_model, prompt: torch.Tensor, examples, tokenizer, max_new_tokens: int,
                         batch_size: int = 16, stop: str | None = "\n\n") -> tuple[list[str], int]:
    """Greedy answers from plain Hugging Face ``generate`` given ``inputs_embeds = [prompt; tokens]`` per row,
    left-padded in front of the prompt (a working KV cache). This is what PEFT's prompt tuning should compute;
    PEFT 0.21 with transformers 5 re-injects the prompt at every decoding step instead (see RESULTS.md)."""
    embed = base_model.get_input_embeddings()
    prompt = prompt.to(embed.weight.dtype)
    v = prompt.shape[0]
    out, produced = [""] * len(examples), 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        items = [peft_example(examples[i])[0] for i in idx]
        width = v + max(len(ids) for ids in items)
        rows, masks = [], []
        for ids in items:
            pad = width - v - len(ids)
            tokens = embed(torch.tensor([tokenizer.pad_token_id] * pad + ids, device=embed.weight.device))
            rows.append(torch.cat([tokens[:pad], prompt, tokens[pad:]]))  # pads, then prompt, then text
            masks.append([0] * pad + [1] * (v + len(ids)))
        gen = base_model.generate(inputs_embeds=torch.stack(rows),
                                  attention_mask=torch.tensor(masks, device=embed.weight.device),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        produced += _decode_rows(gen, idx, out, tokenizer, stop)  # with inputs_embeds: the new tokens only
    return out, produced
