"""`promptlab demo`: the whole story on the embedded model, written up as a Markdown report with plots.

Prepare sentiment and intent_and_slot (real data from a mirror or the public homes when reachable, else
the bundled samples), train each task by its recipe in tasks.yaml (sentiment: prompt tuning; intent_and_slot:
deep prompts, which the 135M model needs to learn it at all), freeze both into one prompt table, generate for
a mixed batch, and compare with the zero-shot baseline on the test records.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .baselines import baseline_model
from .data import prepare_dataset, read_jsonl
from .errors import DownloadError
from .evaluate import evaluate, sample_per_task
from .io import atomic_write_text
from .metrics import format_metrics_table, primary_metric
from .model import PromptLearningModel
from .models import load_base_model
from .templates import default_tasks
from .train import TrainConfig, Trainer

DEMO_TASKS = ("sentiment", "intent_and_slot")


def _prepare(out: Path, quick: bool, log) -> tuple[dict[str, dict[str, list]], str]:
    """Splits per task, and where they came from."""
    source = "samples"
    if not quick:
        try:
            for task in DEMO_TASKS:
                prepare_dataset(task, out / "data" / task, source="remote", progress=False)
            source = "remote"
        except DownloadError as exc:
            log(f"real data unavailable ({str(exc).splitlines()[0]}); using the bundled samples instead")
    if source == "samples":
        for task in DEMO_TASKS:
            prepare_dataset(task, out / "data" / task, source="samples", progress=False)
    splits = {t: {s: read_jsonl(out / "data" / t / f"{s}.jsonl") for s in ("train", "validation", "test")}
              for t in DEMO_TASKS}
    return splits, source


def _train(model, task: str, splits, config: TrainConfig, log) -> list[dict]:
    log(f"training {task} ({model.method_of(task)}) for {config.max_steps} steps ...")
    start = time.perf_counter()
    history = Trainer(model, splits[task]["train"], splits[task]["validation"], config).fit()
    model.freeze([task])
    log(f"  done in {time.perf_counter() - start:.0f} s")
    return history


def run_demo(out_dir: str | Path = "runs/demo", model_name: str = "embedded", steps: int | None = None,
             quick: bool = False, eval_records: int | None = None, log=print) -> Path:
    """Run the demo and return the path of its report (``out_dir/report.md``)."""
    import matplotlib

    matplotlib.use("Agg")
    from .viz import plot_metrics_comparison, plot_training_curves

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        model_name = "tiny"
    steps = steps or (4 if quick else 100)
    eval_records = eval_records or (8 if quick else 60)
    splits, source = _prepare(out, quick, log)
    log(f"data: {source}; " + ", ".join(f"{t} {len(s['train'])}/{len(s['validation'])}/{len(s['test'])}"
                                       for t, s in splits.items()))
    base = load_base_model(model_name)
    log(f"base model: {base.name} on {base.device}")
    tasks = default_tasks()
    model = PromptLearningModel(base, tasks)
    torch.manual_seed(0)
    histories = {}
    for task in DEMO_TASKS:  # each by its recipe (method and learning rates), at the demo's step budget
        model.add_task(task)
        config = TrainConfig.from_recipe(tasks[task], max_steps=steps, batch_size=8, eval_every=max(steps // 2, 1),
                                         eval_max_records=eval_records // 2, progress=not quick)
        histories[task] = _train(model, task, splits, config, log)
    table_path = out / "prompts.safetensors"
    model.prompt_table.save(table_path)

    test = sample_per_task([r for t in DEMO_TASKS for r in splits[t]["test"]], eval_records)
    mixed = [test[0], next(r for r in test if r["taskname"] == "intent_and_slot")]
    mixed_out = model.generate(mixed, max_new_tokens=30, stop=["\n\n"])
    log("evaluating learned prompts and the zero-shot baseline ...")
    learned = evaluate(model, test)
    zero = evaluate(baseline_model(base, tasks, "zero-shot"), test)

    figures = {}
    for task, history in histories.items():
        figures[f"curves_{task}.png"] = plot_training_curves(history)
    comparison = {"zero-shot": {t: zero[t][primary_metric(t)] for t in zero},
                  "learned prompts": {t: learned[t][primary_metric(t)] for t in learned}}
    figures["comparison.png"] = plot_metrics_comparison(comparison)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
    results = {"source": source, "model": base.name, "steps": steps,
               "methods": {t: model.method_of(t) for t in DEMO_TASKS}, "learned": _scalars(learned),
               "zero_shot": _scalars(zero), "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    report = out / "report.md"
    atomic_write_text(report, _report(results, learned, zero, mixed, mixed_out, model, figures))
    log(f"demo finished in {results['seconds']:.0f} s")
    return report


def _scalars(results: dict[str, dict]) -> dict[str, dict]:
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in results.items()}


def _report(results, learned, zero, mixed, mixed_out, model, figures) -> str:
    lines = [
        "# promptlab demo report", "",
        f"Base model: **{results['model']}** (frozen). Data: **{results['source']}**"
        + (" (the bundled samples: tiny, for a quick look, not a benchmark)" if results["source"] == "samples" else "")
        + f". Training steps per task: {results['steps']}. Total time: {results['seconds']:.0f} s.", "",
        "## Prompt parameters", "", "```", model.parameter_summary(), "```", "",
        "## Test metrics: learned prompts", "", format_metrics_table(_scalars(learned)), "",
        "## Test metrics: zero-shot baseline (same model, a hand-written instruction)", "",
        format_metrics_table(_scalars(zero)), "", "![comparison](comparison.png)", "",
        "## One mixed batch (both tasks, each with its own method, one forward pass per step)", "",
    ]
    for record, text in zip(mixed, mixed_out):
        shown = {k: v for k, v in record.items() if k not in ("label", "answers")}
        lines += [f"- `{json.dumps(shown, ensure_ascii=False)}`", f"  -> `{text.strip()}`"]
    lines += ["", "## Training curves", ""]
    lines += [f"![{name}]({name})" for name in figures if name.startswith("curves_")]
    return "\n".join(lines) + "\n"
