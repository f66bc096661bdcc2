"""Speed and memory benchmark: promptlab against PEFT prompt tuning, same model, same real records.

How to run (from the repository root, after ``pip install -e .[bench]``):

    PROMPTLAB_DATA_MIRROR=/path/to/datasets python bench/speed.py      # the real run (about 35 min on one CPU core)
    python bench/speed.py --quick                                        # a smoke test

1. Training step time (forward + backward + clipping + optimizer step, collation included), measured
   alternately in one process, step by step, on real sentiment and SQuAD training records (batch 8):
   PEFT and promptlab on the very same random batches; promptlab also on its Trainer's length-grouped
   batches of the same records (what `Trainer` feeds it), and with packing off (padded rows) for reference.
2. Mixed generation: 8 test records each of sentiment, intent_and_slot and SQuAD, greedy, 24 new tokens.
   promptlab generates the 24 mixed records in one call; PEFT (one PeftModel, one adapter per task,
   switched with ``set_adapter``) generates task by task. Both hold the same prompt vectors, and every
   template has its virtual tokens in front, so both must produce the same text (checked).
3. Peak memory of training steps (random batches), each library in a fresh child process: peak RSS
   (VmHWM) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
4. ``generate-reference``: the records of 2., promptlab's `generate` against ONE transformers
   ``generate(inputs_embeds=..., attention_mask=...)`` call on promptlab's embeddings of the whole mixed,
   left-padded batch, at the default precision; the texts must agree (identical rows counted).
5. ``precision``: promptlab's training step (as in 1., length-grouped batches) with the frozen base held in
   float32 and in bfloat16, the same batches and starting prompt; step times and the losses of both.
Tables go into bench/RESULTS.md (the ``speed``, ``speed-generate-reference`` and ``speed-precision`` sections;
``--quick`` writes to a temp file instead). ``--parts`` runs a subset, e.g. ``--parts generate-reference precision``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import promptlab as pl  # noqa: E402
from promptlab.data.features import IGNORE_INDEX, collate, encode_records, length_grouped_batches  # noqa: E402

BATCH = 8
SEED = 1234
PARTS = ["training", "generation", "memory", "generate-reference", "precision"]
# Templates with every virtual token in front, so PEFT (prefix only) runs exactly the same token ids.
SPEED_TASKS = {
    "sentiment": pl.TaskTemplate("sentiment", "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", 10,
                                 answer_field="label"),
    "intent_and_slot": pl.TaskTemplate("intent_and_slot",
                                       "<|VIRTUAL_PROMPT_0|> Predict intent and slot:\n{utterance}\n{label}", 10,
                                       answer_field="label"),
    "squad": pl.TaskTemplate("squad", "<|VIRTUAL_PROMPT_0|> Context: {context}\n\nQuestion: {question}\n\nAnswer: "
                             "{answer}", 15, truncate_field="context", answer_field="answer"),
}
INIT_TEXT = {"sentiment": "Classify the sentiment of this financial news",
             "intent_and_slot": "Predict the intent and the slots",
             "squad": "Answer the question from the context"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Wall and CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> "Clock":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def interleaved(run, names: list[str], rounds: int) -> tuple[dict, dict, dict]:
    """Call ``run(name, i)`` for every name in each round ``i``, the order rotating by one every round (so that
    no variant always runs after the same one), each call timed. Returns wall seconds, CPU seconds and results,
    each a list per name in round order. Warm up before calling it: every round counts."""
    wall, cpu, results = ({k: [] for k in names} for _ in range(3))
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            with Clock() as c:
                results[name].append(run(name, i))
            wall[name].append(c.wall)
            cpu[name].append(c.cpu)
    return wall, cpu, results


# ------------------------------------------------------------------------------------- the models
def promptlab_model(base, tasks: list[str]) -> pl.PromptLearningModel:
    torch.manual_seed(SEED)
    model = pl.PromptLearningModel(base, {t: SPEED_TASKS[t] for t in tasks})
    for t in tasks:
        model.add_prompt_tuning(t, init_text=INIT_TEXT[t])
    return model


def peft_model(base, tasks: list[str], prompts: dict[str, torch.Tensor] | None = None):
    """One PeftModel with an adapter per task (the first is "default"); prompts copied in when given."""
    model = None
    for t in tasks:
        model = common.peft_prompt_tuning(base, SPEED_TASKS[t].total_virtual_tokens, INIT_TEXT[t], adapter=t,
                                          peft_model=model)
        if prompts is not None:
            with torch.no_grad():
                model.prompt_encoder[t].embedding.weight.copy_(prompts[t])
    model.set_adapter(tasks[0])
    return model


def train_examples(base, task: str, n: int) -> list:
    records = common.load_split(task, "train")[:n]
    examples, _ = encode_records(records, {task: SPEED_TASKS[task]}, base.tokenizer, 512)
    return examples


def random_batches(count: int, size: int, steps: int, seed: int = SEED) -> list[list[int]]:
    """What a shuffled DataLoader gives (PEFT's usual input): random batches, no length grouping."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i * size : (i + 1) * size] for i in range(steps)]


# --------------------------------------------------------------------------------------- steps
def promptlab_step(model, optimizer, examples, pad_id: int) -> float:
    """One Trainer step: the sum over labelled tokens / their count, backward, clip, AdamW; returns the loss."""
    batch = collate(examples, pad_id, "right")
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(batch, reduction="sum") / tokens
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.prompt_embeddings.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def peft_step(model, optimizer, examples, pad_id: int) -> None:
    batch = {k: v.to(model.device) for k, v in common.peft_collate(examples, pad_id, "right").items()}
    loss = common.peft_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(common.peft_trainable(model), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_training(base, task: str, steps: int) -> dict:
    """Step times of the variants interleaved step by step (the order rotates every step).

    A pool of ``steps * 8`` training records is cut into ``steps`` batches twice: at random (PEFT's usual
    shuffled DataLoader; promptlab with and without packing runs the very same batches) and by promptlab's
    length grouping (what its Trainer feeds it). Both cuts hold the same records, so their totals compare
    the cost of one pass over the pool; medians compare single steps.
    """
    pad = base.tokenizer.pad_token_id
    examples = train_examples(base, task, (steps + 1) * BATCH)
    pool, warm = examples[: steps * BATCH], examples[steps * BATCH :]
    rand = random_batches(len(pool), BATCH, steps)
    grouped = length_grouped_batches([len(e) for e in pool], BATCH, seed=SEED)
    model = promptlab_model(base, [task])
    model.train()
    opt = torch.optim.AdamW(model.prompt_embeddings.parameters(), lr=1e-3)
    pm = peft_model(base, [task])
    pm.train()
    pm.base_model.eval()
    popt = torch.optim.AdamW(common.peft_trainable(pm), lr=1e-3)

    def run_promptlab(batches, pack):
        def go(i):
            model.pack_sequences = pack
            promptlab_step(model, opt, warm if i < 0 else [pool[j] for j in batches[i]], pad)
        return go

    variants = {
        "PEFT, random batches": lambda i: peft_step(pm, popt, warm if i < 0 else [pool[j] for j in rand[i]], pad),
        "promptlab, the same random batches": run_promptlab(rand, True),
        "promptlab, Trainer's length-grouped batches": run_promptlab(grouped, True),
        "promptlab, the same random batches, packing off": run_promptlab(rand, False),
    }
    names = list(variants)
    for name in names:
        variants[name](-1)  # warm-up on records outside the pool
    wall, cpu, _ = interleaved(lambda name, i: variants[name](i), names, steps)
    model.pack_sequences = True
    rows = []
    ref = names[0]
    for name in names:
        rows.append({"task": task, "variant": name,
                     "median_wall_s": common.median(wall[name]), "median_cpu_s": common.median(cpu[name]),
                     "total_wall_s": sum(wall[name]), "total_cpu_s": sum(cpu[name]),
                     "median_wall_vs_peft": common.median(wall[name]) / common.median(wall[ref]),
                     "total_wall_vs_peft": sum(wall[name]) / sum(wall[ref]),
                     "total_cpu_vs_peft": sum(cpu[name]) / sum(cpu[ref])})

    def share(batches):
        lens = [[len(pool[j]) for j in idx] for idx in batches]
        return sum(map(sum, lens)) / sum(len(x) * max(x) for x in lens)

    return {"rows": rows, "steps": steps, "real_token_share": {"random": share(rand), "grouped": share(grouped)}}


# ----------------------------------------------------------------------------------- generation
def generation_records(n: int) -> list[dict]:
    out = []
    for task in SPEED_TASKS:
        out += common.load_split(task, "test")[:n]
    random.Random(SEED).shuffle(out)  # a mixed stream of requests
    return out


def bench_generation(base, per_task: int, new_tokens: int, repeats: int) -> dict:
    """Three ways to answer one mixed list of requests, interleaved (the order rotates every repeat)."""
    tasks = list(SPEED_TASKS)
    records = generation_records(per_task)
    model = promptlab_model(base, tasks)
    model.freeze()  # inference: the prompts live in the table
    model.eval()
    pm = peft_model(base, tasks, {t: model.prompt_table[t] for t in tasks})
    pm.eval()
    tok = base.tokenizer
    by_task = {t: [i for i, r in enumerate(records) if r["taskname"] == t] for t in tasks}
    examples, _ = encode_records(records, SPEED_TASKS, tok, 512 - new_tokens, with_answer=False)

    def count(texts):  # the same measure for every variant: tokens of the returned (stripped) texts
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def run_promptlab():
        return [t.strip() for t in model.generate(records, max_new_tokens=new_tokens, batch_size=len(records))]

    def task_by_task(generate_one):
        def run():
            texts = [""] * len(records)
            for t, idx in by_task.items():
                for i, text in zip(idx, generate_one(t, [examples[i] for i in idx])):
                    texts[i] = text
            return texts
        return run

    def peft_generate(task, exs):
        pm.set_adapter(task)
        return common.peft_generate(pm, exs, tok, new_tokens, batch_size=len(exs), stop=None)[0]

    def hf_generate(task, exs):
        pm.set_adapter(task)
        return common.generate_with_prompt(base.model, common.peft_prompt_vectors(pm), exs, tok, new_tokens,
                                           batch_size=len(exs), stop=None)[0]

    variants = {"promptlab: one call, mixed batch": run_promptlab,
                "PEFT generate, task by task (as shipped)": task_by_task(peft_generate),
                "HF generate with PEFT's prompt as inputs_embeds, task by task": task_by_task(hf_generate)}
    names = list(variants)
    for name in names:
        variants[name]()  # warm-up
    wall, cpu, results = interleaved(lambda name, i: variants[name](), names, repeats)
    outputs = {name: results[name][-1] for name in names}
    rows = []
    for name in names:
        n, w, c = count(outputs[name]), common.median(wall[name]), common.median(cpu[name])
        same = sum(a == b for a, b in zip(outputs[name], outputs[names[0]]))
        rows.append({"variant": name, "calls": 1 if name == names[0] else len(tasks), "tokens": n,
                     "same_text_as_promptlab": f"{same}/{len(records)}", "median_wall_s": w, "median_cpu_s": c,
                     "tokens_per_s_wall": n / w, "tokens_per_s_cpu": n / c})
    for row in rows:
        row["promptlab_speedup_wall"] = rows[0]["tokens_per_s_wall"] / row["tokens_per_s_wall"]
        row["promptlab_speedup_cpu"] = rows[0]["tokens_per_s_cpu"] / row["tokens_per_s_cpu"]
    return {"rows": rows, "records": len(records), "new_tokens": new_tokens, "repeats": repeats,
            "samples": [{"task": records[i]["taskname"], **{k: outputs[k][i][:60] for k in names}}
                        for i in range(min(6, len(records)))]}


def reference_texts(model, records: list[dict], new_tokens: int) -> list[str]:
    """Greedy texts from ONE transformers `generate` call on promptlab's embeddings of the whole mixed batch.

    The same inputs promptlab's backbone gets: `encode_records`, left-padded `collate`, `embed` (prompts written
    into the virtual positions), then ``model.lm.generate(inputs_embeds=..., attention_mask=...)``. No position
    ids are passed: transformers 5 derives them from the mask (cumsum - 1, pads at 0), as promptlab does.
    """
    tok = model.tokenizer
    examples, _ = encode_records(records, model.tasks, tok, model.max_seq_length - new_tokens, with_answer=False)
    batch = model.to_device(collate(examples, tok.pad_token_id, padding_side="left"))
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                max_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)  # (B, <=N): the new tokens only
    texts = []
    for ids in out.tolist():
        ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


def cell(text: str) -> str:
    """Text for a Markdown table cell: newlines and pipes escaped."""
    return json.dumps(text)[1:-1].replace("|", "\\|")


def dtype_name(base) -> str:
    return str(base.dtype).replace("torch.", "")


def frozen_model(base, tasks: list[str]) -> pl.PromptLearningModel:
    model = promptlab_model(base, tasks)
    model.freeze()  # inference: the prompts live in the table
    return model.eval()


def agreement(base, records: list[dict], new_tokens: int, model=None, reference=None) -> list[dict]:
    """Rows whose text promptlab and transformers' generate agree on, with promptlab's packed prompt pass
    (the default) and with its padded one (the computation transformers does)."""
    model = model or frozen_model(base, list(SPEED_TASKS))
    reference = reference or reference_texts(model, records, new_tokens)
    rows = []
    for pack, label in ((True, "packed (default)"), (False, "padded (pack_sequences=False)")):
        model.pack_sequences = pack
        texts = model.generate(records, max_new_tokens=new_tokens, batch_size=len(records))
        same = sum(a == b for a, b in zip(texts, reference))
        rows.append({"base_dtype": dtype_name(base), "promptlab_prompt_pass": label,
                     "same_text_as_transformers": f"{same}/{len(records)}"})
    model.pack_sequences = True
    return rows


def bench_generate_reference(base, per_task: int, new_tokens: int, repeats: int, check_bases=()) -> dict:
    """promptlab's decoding loop against transformers' `generate`, both in one call on the same mixed batch.

    The records, prompts and new-token budget of `bench_generation`; each variant goes from records to texts
    (encoding and collation included), interleaved, the order alternating every repeat. Then, untimed, the
    rows whose text agrees, for ``base`` and each of ``check_bases`` (other dtypes), packed and padded.
    """
    tasks = list(SPEED_TASKS)
    records = generation_records(per_task)
    model = frozen_model(base, tasks)
    tok = base.tokenizer
    variants = {"promptlab generate (its own loop)":
                    lambda: model.generate(records, max_new_tokens=new_tokens, batch_size=len(records)),
                "transformers generate(inputs_embeds=...)": lambda: reference_texts(model, records, new_tokens)}
    names = list(variants)
    for name in names:
        variants[name]()  # warm-up
    wall, cpu, results = interleaved(lambda name, i: variants[name](), names, repeats)
    outputs = {name: results[name][-1] for name in names}
    rows = []
    for name in names:
        same = sum(a == b for a, b in zip(outputs[name], outputs[names[0]]))
        n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in outputs[name])
        rows.append({"variant": name, "base_dtype": dtype_name(base), "calls": 1, "tokens": n,
                     "same_text_as_promptlab": f"{same}/{len(records)}", "median_wall_s": common.median(wall[name]),
                     "median_cpu_s": common.median(cpu[name])})
    ours, ref = rows
    for row in rows:
        row["time_vs_transformers_wall"] = row["median_wall_s"] / ref["median_wall_s"]
        row["time_vs_transformers_cpu"] = row["median_cpu_s"] / ref["median_cpu_s"]
    differing = [i for i in range(len(records)) if outputs[names[0]][i] != outputs[names[1]][i]]
    checks = agreement(base, records, new_tokens, model, outputs[names[1]])
    for other in check_bases:
        checks += agreement(other, records, new_tokens)
    return {"rows": rows, "checks": checks, "records": len(records), "new_tokens": new_tokens, "repeats": repeats,
            "ratio_wall": ours["time_vs_transformers_wall"], "ratio_cpu": ours["time_vs_transformers_cpu"],
            "differing": [{"task": records[i]["taskname"], **{k: cell(outputs[k][i][:60]) for k in names}}
                          for i in differing[:4]]}


# ------------------------------------------------------------------------------------------ precision
def bench_precision(bases: dict[str, object], task: str, steps: int) -> dict:
    """Training step time and loss with the frozen base held in each dtype of ``bases``, same batches.

    Each variant trains its own copy of the same starting prompt (the first base's text init, copied into the
    others) on the same length-grouped batches (what `Trainer` feeds), step by step interleaved, the order
    rotating each step, after one warm-up step each on records outside the pool.
    """
    names = list(bases)
    first = next(iter(bases.values()))
    examples = train_examples(first, task, (steps + 1) * BATCH)
    pool, warm = examples[: steps * BATCH], examples[steps * BATCH :]
    batches = length_grouped_batches([len(e) for e in pool], BATCH, seed=SEED)[:steps]
    models, optimizers = {}, {}
    for name, base in bases.items():
        models[name] = promptlab_model(base, [task])
        if name != names[0]:
            with torch.no_grad():
                models[name].prompt_embeddings[task].weight.copy_(models[names[0]].prompt_embeddings[task].weight)
        models[name].train()
        optimizers[name] = torch.optim.AdamW(models[name].prompt_embeddings.parameters(), lr=1e-3)
    pad = first.tokenizer.pad_token_id
    for name in names:
        promptlab_step(models[name], optimizers[name], warm, pad)
    wall, cpu, losses = interleaved(
        lambda name, i: promptlab_step(models[name], optimizers[name], [pool[j] for j in batches[i]], pad),
        names, len(batches))
    ref = names[0]
    rows = []
    for name in names:
        rows.append({"task": task, "base_dtype": name, "steps": len(batches),
                     "median_wall_s": common.median(wall[name]), "median_cpu_s": common.median(cpu[name]),
                     "total_wall_s": sum(wall[name]), "total_cpu_s": sum(cpu[name]),
                     "total_wall_vs_fp32": sum(wall[name]) / sum(wall[ref]),
                     "total_cpu_vs_fp32": sum(cpu[name]) / sum(cpu[ref]),
                     "first_loss": losses[name][0], "last_loss": losses[name][-1],
                     "mean_loss": sum(losses[name]) / len(losses[name]),
                     "max_abs_loss_diff_vs_fp32": f"{max(abs(a - b) for a, b in zip(losses[name], losses[ref])):.2g}"})
    return {"rows": rows, "losses": losses}


# ------------------------------------------------------------------------------------ memory (child)
def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def memory_child(library: str, task: str, steps: int, threads: int) -> dict:
    """Run in a fresh process: load, then ``steps`` training steps of ``task`` and one mixed generation."""
    torch.set_num_threads(threads)
    base = pl.load_base_model("embedded")
    pad = base.tokenizer.pad_token_id
    examples = train_examples(base, task, 400)
    batches = random_batches(len(examples), BATCH, steps)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = current_rss_mb()
    if library == "promptlab":
        model = promptlab_model(base, [task])
        model.train()
        opt = torch.optim.AdamW(model.prompt_embeddings.parameters(), lr=1e-3)
        for idx in batches:
            promptlab_step(model, opt, [examples[j] for j in idx], pad)
    else:
        model = peft_model(base, [task])
        model.train()
        model.base_model.eval()
        opt = torch.optim.AdamW(common.peft_trainable(model), lr=1e-3)
        for idx in batches:
            peft_step(model, opt, [examples[j] for j in idx], pad)
    out = {"library": library, "task": task, "steps": steps, "rss_after_load_mb": loaded,
           "peak_rss_mb": peak_rss_mb()}
    out["peak_increase_mb"] = out["peak_rss_mb"] - loaded
    if cuda:
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_memory(tasks: list[str], steps: int, threads: int) -> list[dict]:
    rows = []
    for task in tasks:
        for library in ("peft", "promptlab"):
            cmd = [sys.executable, __file__, "--memory-child", library, task, str(steps), str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            log(f"  memory {task} {library}: {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------ report
def report(info: dict, training: dict, generation: dict | None, memory: list[dict], quick: bool, wall: float,
           threads: int) -> str:
    parts = ["## Speed and memory (bench/speed.py)", "",
             f"Command: `{common.command_line()}`; total wall time {wall / 60:.1f} min; torch threads: {threads}.",
             "", "Machine:", common.machine_markdown(info), ""]
    if quick:
        parts += ["**--quick: a smoke test (a few steps); these numbers mean nothing.**", ""]
    if training:
        parts += ["### Training step (batch 8, forward + backward + clip + AdamW step, collation included)", "",
                  "Variants interleaved step by step in one process (the order rotates each step) after one "
                  "warm-up step each; a pool of records is cut into random batches (PEFT, and promptlab with and "
                  "without packing, run the very same ones) and into promptlab's length-grouped batches (the same "
                  "records): totals are the cost of one pass over the pool. `*_vs_peft` < 1 means faster than "
                  "PEFT. Wall time is what you wait; CPU time (one torch thread) is steadier when other jobs share "
                  "the machine.", ""]
        rows = []
        for task, res in training.items():
            share = res["real_token_share"]
            parts.append(f"- {task}: {res['steps']} measured steps; real (non-padding) share of the padded batch: "
                         f"random batches {share['random']:.2f}, length-grouped {share['grouped']:.2f}")
            rows += res["rows"]
        parts += ["", common.md_table(rows, ["task", "variant", "median_wall_s", "median_cpu_s", "total_wall_s",
                                             "total_cpu_s", "median_wall_vs_peft", "total_wall_vs_peft",
                                             "total_cpu_vs_peft"]), ""]
    if generation:
        g = generation
        parts += ["### Mixed-task generation", "",
                  f"{g['records']} test records (8 each of sentiment, intent_and_slot, squad, shuffled), greedy, "
                  f"up to {g['new_tokens']} new tokens, medians of {g['repeats']} repeats after a warm-up, the "
                  "variants interleaved. promptlab generates the mixed list in one call; PEFT cannot mix tasks, "
                  "so it generates task by task (one PeftModel, one adapter per task, `set_adapter`). All hold "
                  "the same prompt vectors. PEFT 0.21's `generate` does not work with transformers 5 (it looks "
                  "for `past_key_values`, which transformers 5 passes as `cache`, so it re-injects the virtual "
                  "tokens at every decoding step: wrong text after the first token, and more work per step); the "
                  "third row is the fair task-by-task baseline: plain `generate` with PEFT's prompt spliced into "
                  "`inputs_embeds` (pads, prompt, text), which must give promptlab's text. `tokens`: tokens of "
                  "the returned texts; `promptlab_speedup_*`: promptlab's tokens/s over the row's.", "",
                  common.md_table(g["rows"], ["variant", "calls", "tokens", "same_text_as_promptlab",
                                              "median_wall_s", "median_cpu_s", "tokens_per_s_wall",
                                              "tokens_per_s_cpu", "promptlab_speedup_wall",
                                              "promptlab_speedup_cpu"]), ""]
    if memory:
        parts += ["### Peak memory", "",
                  "Each row a fresh process: load the model, then the training steps on random batches. "
                  "`peak_increase_mb`: peak RSS (VmHWM) minus RSS after loading.", "",
                  common.md_table(memory, ["task", "library", "steps", "rss_after_load_mb", "peak_rss_mb",
                                           "peak_increase_mb"] +
                                  (["cuda_peak_allocated_mb"] if "cuda_peak_allocated_mb" in memory[0] else [])), ""]
        for task in dict.fromkeys(m["task"] for m in memory):
            a = next(m for m in memory if m["task"] == task and m["library"] == "promptlab")
            b = next(m for m in memory if m["task"] == task and m["library"] == "peft")
            parts.append(f"- {task}: promptlab / PEFT peak increase {a['peak_increase_mb'] / b['peak_increase_mb']:.2f}x, "
                         f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
        parts.append("")
    parts += ["![promptlab relative to PEFT](speed.png)", ""]
    return "\n".join(parts)


def header(title: str, info: dict, quick: bool, wall: float, threads: int) -> list[str]:
    parts = [f"## {title}", "",
             f"Command: `{common.command_line()}`; wall time {wall / 60:.1f} min; torch threads: {threads}.", "",
             "Machine:", common.machine_markdown(info), ""]
    if quick:
        parts += ["**--quick: a smoke test (a few steps); these numbers mean nothing.**", ""]
    return parts


def report_generate_reference(info: dict, g: dict, quick: bool, wall: float, threads: int) -> str:
    parts = header("Generation: promptlab's loop against transformers' generate (bench/speed.py)", info, quick,
                   wall, threads)
    faster = 1 / g["ratio_wall"]
    parts += [f"The records of the mixed-generation table ({g['records']} test records, 8 each of sentiment, "
              f"intent_and_slot, squad, shuffled), greedy, up to {g['new_tokens']} new tokens, the base at the "
              "default precision (`load_base_model(\"embedded\")`), medians of "
              f"{g['repeats']} repeats after a warm-up, the two interleaved. Both make ONE call on the whole "
              "mixed batch and go from records to texts: promptlab's `model.generate` (its own loop: packed "
              "prompt pass, KV cache, finished rows dropped) and transformers' `model.lm.generate(inputs_embeds="
              "..., attention_mask=...)` on promptlab's embeddings of the left-padded batch (`model.embed`; "
              "transformers derives the position ids from the mask as promptlab does). `same_text_as_promptlab`: "
              "rows whose text is identical; `time_vs_transformers_*`: median time over transformers' median.", "",
              common.md_table(g["rows"], ["variant", "base_dtype", "calls", "tokens", "same_text_as_promptlab",
                                          "median_wall_s", "median_cpu_s", "time_vs_transformers_wall",
                                          "time_vs_transformers_cpu"]), "",
              f"Ratio promptlab / transformers: {g['ratio_wall']:.3f} (wall), {g['ratio_cpu']:.3f} (CPU): the "
              f"custom loop is {faster:.2f}x as fast as transformers' generate, "
              f"{'at least' if faster >= 1.3 else 'less than'} the 1.3x target.", "",
              "Agreement (untimed, same records): rows where promptlab's text equals transformers', with "
              "promptlab's packed prompt pass (the default: no padding, shared prefixes computed once) and with "
              "its padded one (the very computation transformers does), per dtype of the base:", "",
              common.md_table(g["checks"], ["base_dtype", "promptlab_prompt_pass", "same_text_as_transformers"]),
              ""]
    if g["differing"]:
        parts += ["First rows whose text differs in the timed run (first 60 characters):", "",
                  common.md_table(g["differing"], list(g["differing"][0])), ""]
    return "\n".join(parts)


def report_precision(info: dict, precision: dict, quick: bool, wall: float, threads: int) -> str:
    parts = header("Training step: frozen base in float32 against bfloat16 (bench/speed.py)", info, quick, wall,
                   threads)
    rows = [row for res in precision.values() for row in res["rows"]]
    parts += ["promptlab prompt tuning, batch 8, forward + backward + clip + AdamW step (collation included), "
              "the embedded model loaded twice: `load_base_model(\"embedded\", dtype=torch.float32)` and "
              "`dtype=torch.bfloat16` (prompts and optimizer state stay float32 in both). Both train the same "
              "starting prompt on the same length-grouped batches of real training records, step by step "
              "interleaved (the order rotating each step) after one warm-up step each. Losses are each "
              "variant's own (their prompts drift apart as they train); `max_abs_loss_diff_vs_fp32` is the largest "
              "per-step difference. `*_vs_fp32` < 1 means faster than float32.", "",
              common.md_table(rows, ["task", "base_dtype", "steps", "median_wall_s", "median_cpu_s", "total_wall_s",
                                     "total_cpu_s", "total_wall_vs_fp32", "total_cpu_vs_fp32", "first_loss",
                                     "last_loss", "mean_loss", "max_abs_loss_diff_vs_fp32"]), ""]
    return "\n".join(parts)


def plot(training: dict, generation: dict | None, memory: list[dict], path: Path) -> None:
    """promptlab relative to PEFT: training time per pass, generation throughput, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if training:
        bars = {f"{task}: {row['variant']}": row["total_cpu_vs_peft"]
                for task, res in training.items() for row in res["rows"]}
        panels.append(("training time relative to PEFT (CPU, one pass)", bars, 0.5))
    if generation:
        rows = generation["rows"]
        bars = {row["variant"]: row["tokens_per_s_cpu"] / rows[1]["tokens_per_s_cpu"] for row in rows}
        panels.append(("generation tokens/s relative to PEFT's own generate (as shipped)", bars, 2.0))
    if memory:
        bars = {f"{m['task']}: {m['library']}": m["peak_increase_mb"] for m in memory}
        panels.append(("peak RSS increase while training (MB)", bars, None))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels) + 1.5))
    for ax, (title, bars, target) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        labels = [k if len(k) < 60 else k[:57] + "..." for k in bars][::-1]
        ax.barh(labels, list(bars.values())[::-1], color="tab:blue")
        if target:
            ax.axvline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target}")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.subplots_adjust(left=0.36)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the script works")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared CPU, more threads spin and slow down)")
    parser.add_argument("--out", help="Markdown file to write (default: bench/RESULTS.md; --quick: a temp file)")
    parser.add_argument("--parts", nargs="*", default=PARTS, choices=PARTS, help="run only these parts")
    parser.add_argument("--memory-child", nargs=4, metavar=("LIBRARY", "TASK", "STEPS", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory_child:
        library, task, steps, threads = args.memory_child
        print(json.dumps(memory_child(library, task, int(steps), int(threads))))
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "promptlab-speed-quick.md"
                                           if args.quick else common.RESULTS)
    info = common.machine_info()
    start = time.perf_counter()
    base = pl.load_base_model("embedded")
    steps = {"sentiment": 2 if args.quick else 16, "squad": 2 if args.quick else 8}
    training, generation, memory = {}, None, []
    for task, n in steps.items() if "training" in args.parts else []:
        log(f"training steps: {task} ...")
        training[task] = bench_training(base, task, n)
        log(f"  {json.dumps(training[task]['rows'])}")
        common.write_section("speed", report(info, training, generation, memory, args.quick,
                                             time.perf_counter() - start, args.threads), out)
    if "generation" in args.parts:
        log("mixed generation ...")
        generation = bench_generation(base, per_task=8, new_tokens=24, repeats=1 if args.quick else 5)
        log(f"  {json.dumps(generation['rows'])}")
        common.write_section("speed", report(info, training, generation, memory, args.quick,
                                             time.perf_counter() - start, args.threads), out)
    if "memory" in args.parts:
        log("peak memory ...")
        memory = bench_memory(list(steps), 2 if args.quick else 4, args.threads)
    if set(args.parts) & {"training", "generation", "memory"}:  # else the speed section and figure stay as they are
        common.write_section("speed", report(info, training, generation, memory, args.quick,
                                             time.perf_counter() - start, args.threads), out)
        common.save_json(common.data_dir() / ("speed-quick.json" if args.quick else "speed.json"),
                         {"training": training, "generation": generation, "memory": memory})
        figure = Path(tempfile.gettempdir()) / "promptlab-speed-quick.png" if args.quick else common.BENCH / "speed.png"
        plot(training, generation, memory, figure)
        log(f"wrote {figure}")
    loaded = {base.dtype: base}

    def embedded(dtype: torch.dtype):
        if dtype not in loaded:
            loaded[dtype] = pl.load_base_model("embedded", dtype=dtype)
        return loaded[dtype]

    if "generate-reference" in args.parts:
        started = time.perf_counter()
        log("generation: promptlab's loop against transformers' generate ...")
        checks = [embedded(torch.float32)] if base.dtype != torch.float32 else []
        ref = bench_generate_reference(base, per_task=8, new_tokens=24, repeats=1 if args.quick else 5,
                                       check_bases=checks)
        log(f"  {json.dumps(ref['rows'])}")
        common.write_section("speed-generate-reference", report_generate_reference(
            info, ref, args.quick, time.perf_counter() - started, args.threads), out)
        common.save_json(common.data_dir() / f"speed-generate-reference{'-quick' if args.quick else ''}.json", ref)
    if "precision" in args.parts:
        started = time.perf_counter()
        bases = {"float32": embedded(torch.float32), "bfloat16": embedded(torch.bfloat16)}
        precision = {}
        for task, n in steps.items():
            log(f"training steps, float32 against bfloat16 base: {task} ...")
            precision[task] = bench_precision(bases, task, n)
            log(f"  {json.dumps(precision[task]['rows'])}")
            common.write_section("speed-precision", report_precision(
                info, precision, args.quick, time.perf_counter() - started, args.threads), out)
        common.save_json(common.data_dir() / f"speed-precision{'-quick' if args.quick else ''}.json", precision)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
