"""Quality benchmark: promptlab against PEFT and the zero-/few-shot baselines, on real data.

How to run (from the repository root, after ``pip install -e .[bench]``):

    PROMPTLAB_DATA_MIRROR=/path/to/datasets python bench/quality.py            # the real run (about 2 h on one CPU core)
    python bench/quality.py --quick                                             # a smoke test (minutes)

Sentiment (the anchor protocol): Financial PhraseBank AllAgree, 80/10/10 split, the embedded
SmolLM2-135M-Instruct, batch 8, 150 optimizer steps, 10 virtual tokens, no validation-based selection (the
prompts after the last step are scored), accuracy on the 227 test records with the labels ranked by
likelihood and, beside it, exact match of greedy generation. promptlab prompt tuning and p-tuning (the
recommended recipes, ``RECIPES``), PEFT prompt tuning (TEXT init, lr 3e-2) and
PEFT p-tuning (LSTM, hidden 256, lr 1e-3) see the same token ids, batches, optimizer and schedule.
``--only TASK`` runs part of it; parts run in separate processes (each with its own ``PROMPTLAB_BENCH_DATA``
cache) merge by copying their cache entries into one cache and rendering with ``--resume``.
intent_and_slot and SQuAD (from_dev): promptlab against the baselines with a modest step budget.
Tables go into bench/RESULTS.md (the ``quality`` section; ``--quick`` writes to a temp file instead).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import promptlab as pl  # noqa: E402
from promptlab.baselines import baseline_model  # noqa: E402
from promptlab.data.features import encode_records  # noqa: E402
from promptlab.evaluate import evaluate  # noqa: E402
from promptlab.metrics import compute_task_metrics  # noqa: E402

SEED = 1234
SENTIMENT = pl.default_tasks()["sentiment"]  # its init text and labels come from tasks.yaml
SENTIMENT_INIT = SENTIMENT.init_text
SENTIMENT_LABELS = SENTIMENT.labels

# The recipes this benchmark recommends (found on the validation split; see RESULTS.md).
RECIPES = {
    "prompt_tuning": {"lr": 3e-2, "init_text": SENTIMENT_INIT, "warmup_steps": None, "min_lr_ratio": 0.1},
    "p_tuning": {"lr": 3e-2, "encoder_lr": 1e-4, "init_text": SENTIMENT_INIT, "encoder": "lstm", "hidden_size": 256,
                 "residual": True, "warmup_steps": None, "min_lr_ratio": 0.1},
}
# PEFT's documented settings (the anchors measured with these).
PEFT_SETTINGS = {"prompt_tuning": {"lr": 3e-2, "init_text": SENTIMENT_INIT},
                 "p_tuning": {"lr": 1e-3, "encoder": "LSTM", "hidden_size": 256}}
OTHER_TASKS = {
    "intent_and_slot": {"method": "prompt_tuning", "steps": 200, "test": 150,
                        "init_text": "Predict the intent and the slots of this assistant request",
                        "lr": 3e-2},
    "squad": {"method": "prompt_tuning", "steps": 150, "test": 100,
              "init_text": "Answer the question with a short span copied from the context",
              "lr": 3e-2},
}


# The recipe search (``--search``): sentiment, 150 steps, scored on the validation split (226 records).
# "lr": the prompt, or the p-tuning encoder's inputs; "encoder_lr": the encoder's weights (TrainConfig.p_tuning_lr).
SEARCH_GRID = [
    ("p_tuning", {"lr": 1e-3, "encoder_lr": 1e-3, "init_text": SENTIMENT_INIT}),
    ("p_tuning", {"lr": 3e-3, "encoder_lr": 3e-3, "init_text": SENTIMENT_INIT}),
    ("p_tuning", {"lr": 3e-2, "encoder_lr": 1e-3, "init_text": SENTIMENT_INIT}),
    ("p_tuning", {"lr": 3e-2, "encoder_lr": 3e-4, "init_text": SENTIMENT_INIT}),
    ("p_tuning", {"lr": 3e-2, "encoder_lr": 1e-4, "init_text": SENTIMENT_INIT}),
    ("p_tuning", {"lr": 3e-2, "encoder_lr": 1e-4, "encoder": "mlp", "init_text": SENTIMENT_INIT}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ promptlab
def train_promptlab(base, tasks, task: str, method: str, recipe: dict, train, steps: int, batch_size: int = 8,
                    seed: int = SEED) -> tuple[pl.PromptLearningModel, dict]:
    """Train one task's prompt with promptlab's Trainer (no validation: the last step's prompts are kept)."""
    torch.manual_seed(seed)
    model = pl.PromptLearningModel(base, {task: tasks[task]})
    if method == "prompt_tuning":
        model.add_prompt_tuning(task, init_text=recipe.get("init_text"), init=recipe.get("init", "text"))
    else:
        model.add_p_tuning([task], encoder=recipe.get("encoder", "lstm"), hidden_size=recipe.get("hidden_size", 256),
                           residual=recipe.get("residual", True), init=recipe.get("init", "text"),
                           init_text=recipe.get("init_text"), dropout=recipe.get("dropout", 0.0))
    config = pl.TrainConfig(max_steps=steps, batch_size=batch_size, eval_every=0, checkpoint_every=0, seed=seed,
                            progress=False, warmup_steps=recipe.get("warmup_steps"),
                            min_lr_ratio=recipe.get("min_lr_ratio", 0.1),
                            weight_decay=recipe.get("weight_decay", 0.0),
                            max_grad_norm=recipe.get("max_grad_norm", 1.0), lr=recipe["lr"],
                            p_tuning_lr=recipe.get("encoder_lr", pl.TrainConfig.p_tuning_lr))
    trainer = pl.Trainer(model, train, None, config)
    start = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - start
    steps_s = [h["seconds"] for h in history if "seconds" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    with torch.no_grad():
        norm = model.prompt(task).norm(dim=-1).mean().item()  # mean row norm; vocabulary rows: about 3-5
    return model, {"steps": steps, "train_s": seconds, "s_per_step": common.median(steps_s), "prompt_norm": norm,
                   "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


def score_promptlab(model, test, task: str) -> dict:
    start = time.perf_counter()
    metrics = evaluate(model, test, batch_size=16)[task]
    metrics.pop("predictions", None)
    return _headline(task, metrics) | {"eval_s": time.perf_counter() - start}


def _headline(task: str, m: dict) -> dict:
    if task == "sentiment":
        return {"ranked_accuracy": m.get("ranked_accuracy"), "generation_accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"], "invalid": m["n_invalid"], "n": m["n"]}
    if task == "intent_and_slot":
        return {"intent_accuracy": m["intent_accuracy"], "slot_f1": m["slot_f1"], "exact_match": m["exact_match"],
                "n": m["n"]}
    return {"exact_match": m["exact_match"], "f1": m["f1"], "n": m["n"]}


def run_baseline(base, tasks, task: str, kind: str, train, test) -> dict:
    model = baseline_model(base, {task: tasks[task]}, kind, train_records=train, k=3, seed=0)
    return {"steps": 0} | score_promptlab(model, test, task)


# --------------------------------------------------------------------------------------------- PEFT
def run_peft_sentiment(base, tasks, method: str, train, test, steps: int) -> dict:
    """PEFT on the same token ids (virtual tokens as its prefix), batches, optimizer and schedule."""
    tok = base.tokenizer
    settings = PEFT_SETTINGS[method]
    task = tasks["sentiment"]
    n = task.total_virtual_tokens
    examples, _ = encode_records(train, {"sentiment": task}, tok, 512)
    torch.manual_seed(SEED)
    if method == "prompt_tuning":
        peft_model = common.peft_prompt_tuning(base, n, settings["init_text"])
    else:
        peft_model = common.peft_p_tuning(base, n, settings["hidden_size"], settings["encoder"])
    start = time.perf_counter()
    history = common.train_peft(peft_model, examples, tok.pad_token_id, steps, settings["lr"], seed=SEED, log=log)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    candidates = [[{**r, "label": lab} for lab in SENTIMENT_LABELS] for r in test]
    by_label = [encode_records(row, {"sentiment": task}, tok, 512, strict=True)[0] for row in candidates]
    ranked = [SENTIMENT_LABELS[i] for i in common.peft_rank_labels(peft_model, by_label, tok.pad_token_id)]
    prompts, _ = encode_records(test, {"sentiment": task}, tok, 512, with_answer=False)
    # PEFT's own generate is broken with transformers 5 (the prompt is re-injected at every step), so the
    # generation score uses its prompt through plain generate(inputs_embeds=...); its own generate beside it
    generated, _ = common.generate_with_prompt(base.model, common.peft_prompt_vectors(peft_model), prompts, tok,
                                               max_new_tokens=4)
    eval_s = time.perf_counter() - start
    shipped, _ = common.peft_generate(peft_model, prompts, tok, max_new_tokens=4)
    gen = compute_task_metrics("sentiment", generated, test)
    losses = [h["loss"] for h in history]
    return {"steps": steps, "train_s": train_s, "s_per_step": common.median(h["seconds"] for h in history),
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "ranked_accuracy": compute_task_metrics("sentiment", ranked, test)["accuracy"],
            "generation_accuracy": gen["accuracy"], "macro_f1": gen["macro_f1"], "invalid": gen["n_invalid"],
            "peft_generate_accuracy": compute_task_metrics("sentiment", shipped, test)["accuracy"],
            "n": len(test), "eval_s": eval_s}


# ------------------------------------------------------------------------------------------- runs
def plan(quick: bool) -> list[dict]:
    """Every run of the benchmark, in order: task, name, kind, settings."""
    steps = 4 if quick else 150
    runs = [
        {"task": "sentiment", "name": "zero-shot (hand-written instruction)", "kind": "zero-shot"},
        {"task": "sentiment", "name": "few-shot (3 examples, one per label)", "kind": "few-shot"},
        {"task": "sentiment", "name": "promptlab prompt tuning (recommended recipe)", "kind": "promptlab",
         "method": "prompt_tuning", "recipe": RECIPES["prompt_tuning"], "steps": steps},
        {"task": "sentiment", "name": "promptlab p-tuning (recommended recipe)", "kind": "promptlab",
         "method": "p_tuning", "recipe": RECIPES["p_tuning"], "steps": steps},
        {"task": "sentiment", "name": "PEFT prompt tuning (TEXT init, lr 3e-2)", "kind": "peft",
         "method": "prompt_tuning", "steps": steps},
        {"task": "sentiment", "name": "PEFT p-tuning (LSTM, hidden 256, lr 1e-3)", "kind": "peft",
         "method": "p_tuning", "steps": steps},
    ]
    for task, spec in OTHER_TASKS.items():
        runs += [{"task": task, "name": "zero-shot (hand-written instruction)", "kind": "zero-shot",
                  "test": spec["test"]},
                 {"task": task, "name": f"few-shot ({1 if task == 'squad' else 3} example(s))", "kind": "few-shot",
                  "test": spec["test"]},
                 {"task": task, "name": f"promptlab {spec['method'].replace('_', ' ')}", "kind": "promptlab",
                  "method": spec["method"], "recipe": {k: spec[k] for k in ("lr", "init_text")},
                  "steps": 3 if quick else spec["steps"], "test": spec["test"]}]
    if quick:
        for r in runs:
            r["test"] = 12
    return runs


def execute(run: dict, base, tasks) -> dict:
    task = run["task"]
    train = common.load_split(task, "train")
    test = common.load_split(task, "test")
    if run.get("test"):
        test = test[: run["test"]]
    if run["kind"] in ("zero-shot", "few-shot"):
        return run_baseline(base, tasks, task, run["kind"], train, test)
    if run["kind"] == "peft":
        return run_peft_sentiment(base, tasks, run["method"], train, test, run["steps"])
    model, facts = train_promptlab(base, tasks, task, run["method"], run["recipe"], train, run["steps"])
    return facts | score_promptlab(model, test, task)


def key_of(run: dict) -> str:
    return json.dumps(run, sort_keys=True)


COLUMNS = {
    "sentiment": ["method", "steps", "ranked_accuracy", "generation_accuracy", "macro_f1", "invalid",
                  "peft_generate_accuracy", "s_per_step", "train_s", "eval_s"],
    "intent_and_slot": ["method", "steps", "intent_accuracy", "slot_f1", "exact_match", "n", "s_per_step",
                        "train_s", "eval_s"],
    "squad": ["method", "steps", "exact_match", "f1", "n", "s_per_step", "train_s", "eval_s"],
}


def report(results: list[tuple[dict, dict]], info: dict, quick: bool, wall: float) -> str:
    parts = ["## Quality (bench/quality.py)", "",
             f"Command: `{common.command_line()}` with `PROMPTLAB_DATA_MIRROR` set to the datasets folder; "
             f"total wall time {wall / 60:.1f} min.", "", "Machine:", common.machine_markdown(info), ""]
    if quick:
        parts += ["**--quick: a smoke test (a few steps, 12 test records); these numbers mean nothing.**", ""]
    notes = {
        "sentiment": "Financial PhraseBank AllAgree, 80/10/10 (1811/226/227), test = 227 records; batch 8, "
                     "10 virtual tokens, AdamW, 10% warmup + cosine, clipping 1.0, same length-grouped batch order "
                     "for every trained method; `ranked_accuracy`: the label with the highest log-likelihood "
                     "(answer tokens + EOS); `generation_accuracy`: greedy generation (4 tokens) equal to the label; "
                     "`invalid`: generations that are no label; `macro_f1` of the generations. PEFT rows generate with "
                     "PEFT's prompt through plain `generate(inputs_embeds=...)`, because PEFT 0.21's own `generate` "
                     "re-injects the prompt at every step under transformers 5; `peft_generate_accuracy` is what "
                     "PEFT's own `generate` scores. `s_per_step`: median training step (wall, shared machine). "
                     "Majority class (neutral) = 0.614.",
        "intent_and_slot": "NLU-Evaluation-Data fold 1; train on its 9960 training records, score the first "
                           "test records (greedy, 40 tokens).",
        "squad": "SQuAD v1.1 dev split by article 80/10/10 (`from_dev`); score the first test records "
                 "(greedy, 24 tokens, against all reference answers; EM/F1 in %).",
    }
    for task in COLUMNS:
        rows = [{"method": run["name"], **res} for run, res in results if run["task"] == task]
        if not rows:
            continue
        parts += [f"### {task}", "", notes[task], "", common.md_table(rows, COLUMNS[task]), ""]
    if any(run["task"] == "sentiment" for run, _ in results):
        parts += ["![sentiment accuracy](quality_sentiment.png)", ""]
    recipe_lines = [f"- {m}: `{json.dumps(r)}`" for m, r in RECIPES.items()]
    parts += ["Recipes used for the promptlab rows:", *recipe_lines,
              f"- intent_and_slot / squad: `{json.dumps(OTHER_TASKS)}`", ""]
    return "\n".join(parts)


def search(base, tasks, cache: dict, cache_path: Path, info: dict, out: Path, steps: int) -> None:
    """Train each grid entry on sentiment and score it on the validation split; a table in RESULTS.md."""
    train, val = common.load_split("sentiment", "train"), common.load_split("sentiment", "validation")
    rows, start = [], time.perf_counter()
    for method, recipe in SEARCH_GRID:
        key = json.dumps({"search": method, "recipe": recipe, "steps": steps}, sort_keys=True)
        if key not in cache:
            log(f"search: {method} {recipe} ...")
            model, facts = train_promptlab(base, tasks, "sentiment", method, recipe, train, steps)
            cache[key] = facts | score_promptlab(model, val, "sentiment")
            common.save_json(cache_path, cache)
        res = cache[key]
        log(f"  -> {json.dumps(res)}")
        rows.append({"method": method, "recipe": ", ".join(f"{k}={v}" for k, v in recipe.items() if k != "init_text"),
                     **res})
        text = ["## Recipe search (bench/quality.py --search)", "",
                f"Command: `{common.command_line()}`; sentiment, {steps} steps, batch 8, the validation split "
                f"(226 records); init text for all: \"{SENTIMENT_INIT}\"; p-tuning: bi-LSTM hidden 256 (or MLP), "
                "residual from the text-initialised prompt. The best of each method becomes `RECIPES`.", "",
                "Machine:", common.machine_markdown(info), "",
                common.md_table(rows, ["method", "recipe", "ranked_accuracy", "generation_accuracy", "macro_f1",
                                       "invalid", "last_loss", "s_per_step", "train_s"]), "",
                f"Total wall time {(time.perf_counter() - start) / 60:.1f} min (cached runs count zero)."]
        common.write_section("recipe-search", "\n".join(text), out)


def plot(results: list[tuple[dict, dict]], path: Path) -> None:
    """Sentiment test accuracy per method (ranked and generated), with the majority class for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(run["name"], res) for run, res in results if run["task"] == "sentiment"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.barh([v + 0.2 for v in y], [r["ranked_accuracy"] or 0 for _, r in rows], height=0.4, label="ranked by likelihood")
    ax.barh([v - 0.2 for v in y], [r["generation_accuracy"] or 0 for _, r in rows], height=0.4,
            label="greedy generation")
    ax.axvline(0.614, color="gray", linestyle="--", linewidth=1, label="majority class")
    ax.set_yticks(y, [name for name, _ in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy (227 records)")
    ax.set_title("Financial PhraseBank AllAgree, SmolLM2-135M, 150 steps")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps and records: checks the script works")
    parser.add_argument("--only", nargs="*", help="run only these tasks (sentiment, intent_and_slot, squad)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished runs with identical settings from the cache (after an interruption)")
    parser.add_argument("--out", help="Markdown file to write (default: bench/RESULTS.md; --quick: a temp file)")
    parser.add_argument("--search", action="store_true",
                        help="run the recipe search on the sentiment validation split instead")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a small shared CPU, more threads spin and slow down)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "promptlab-quality-quick.md"
                                           if args.quick else common.RESULTS)
    cache_path = common.data_dir() / ("quality-runs-quick.json" if args.quick else "quality-runs.json")
    cache = json.loads(cache_path.read_text()) if args.resume and cache_path.exists() else {}
    info = common.machine_info()
    base = pl.load_base_model("embedded")
    tasks = pl.default_tasks()
    if args.search:
        search(base, tasks, cache, cache_path, info, out, 4 if args.quick else 150)
        log(f"wrote {out}")
        return 0
    runs = [r for r in plan(args.quick) if not args.only or r["task"] in args.only]
    results, start = [], time.perf_counter()
    for run in runs:
        key = key_of(run)
        if key in cache:
            log(f"{run['task']}: {run['name']}: cached")
            res = cache[key]
        else:
            log(f"{run['task']}: {run['name']} ...")
            res = execute(run, base, tasks)
            cache[key] = res
            common.save_json(cache_path, cache)
        log(f"  -> {json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, default=str)}")
        results.append((run, res))
        common.write_section("quality", report(results, info, args.quick, time.perf_counter() - start), out)
    figure = (Path(tempfile.gettempdir()) / "promptlab-quality-quick.png" if args.quick
              else common.BENCH / "quality_sentiment.png")
    plot(results, figure)
    log(f"wrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
