"""The command line: ``promptlab prepare|train|generate|evaluate|table|demo`` (also ``python -m promptlab``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PromptlabError


def _cmd_prepare(args) -> None:
    from .data import prepare_dataset

    manifest = prepare_dataset(args.dataset, args.out, seed=args.seed, from_dev=args.from_dev,
                               agreement=args.agreement, source="samples" if args.samples else "remote",
                               slot_format=args.slot_format)
    counts = manifest.get("counts", {})
    print(f"{args.dataset}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {args.out}")


def _cmd_train(args) -> None:
    from .pipeline import load_run_config, run_training

    result = run_training(load_run_config(args.config), resume=args.resume)
    if not result["main_process"]:  # under torchrun / accelerate launch the main process reports
        return
    print(f"trained {result['tasks']} for {result['steps']} steps (best at step {result['best_step']}); "
          f"prompt table: {result['prompt_table']}")


def _load(args, base=None):
    from .model import PromptLearningModel
    from .models import load_base_model
    from .table import PromptTable

    base = base or load_base_model(args.model)
    table = PromptTable.load(args.prompts, base)
    return PromptLearningModel(base, {t: table.entry(t).template for t in table}, prompt_table=table,
                               max_seq_length=args.max_seq_length)


def _read_records(spec: str, task: str | None, tasks, with_answer: bool = True) -> list[dict]:
    """``--data``/``--input``: a JSON Lines file of records (each with its taskname), or with ``--task`` (or
    a column mapping) any CSV/JSON/JSON Lines/Parquet file: ``PATH[:field=column,...]``."""
    from .data.jsonl import read_jsonl
    from .data.sources import parse_data_argument, records_from

    path, columns = parse_data_argument(spec)
    if task is None and not columns and Path(path).suffix.lower() == ".jsonl":
        return read_jsonl(path)
    if task is None:
        raise PromptlabError(f"{spec}: name the task its rows belong to with --task (only JSON Lines records "
                             f"carry their own taskname)")
    if task not in tasks:
        raise PromptlabError(f"--task {task!r} is not a task of this model; known: {sorted(tasks)}")
    return records_from(path, task, columns, template=tasks[task], with_answer=with_answer)


def _cmd_generate(args) -> None:
    from .data.jsonl import write_jsonl
    from .evaluate import answer_text

    model = _load(args)
    records = _read_records(args.input, args.task, model.tasks, with_answer=False)
    texts = model.generate(records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           stop=args.stop or None)
    # the answer as `evaluate` scores it, whatever whitespace the template put before it
    n = write_jsonl(args.output, [{**r, "prediction": answer_text(t)} for r, t in zip(records, texts)])
    print(f"wrote {n} predictions to {args.output}")


def _cmd_evaluate(args) -> None:
    from .baselines import baseline_model
    from .evaluate import evaluate, sample_per_task
    from .io import atomic_write_text
    from .metrics import format_metrics_table
    from .models import load_base_model

    if args.baseline:
        from .templates import default_tasks, load_tasks

        base = load_base_model(args.model)
        tasks = load_tasks(args.tasks) if args.tasks else default_tasks()
        if args.prompts:
            table = _load(args, base).prompt_table
            tasks.update({t: table.entry(t).template for t in table})
        train = _read_records(args.train, args.task, tasks) if args.train else None
        model = baseline_model(base, tasks, args.baseline, train, k=args.shots)
    else:
        if not args.prompts:
            raise PromptlabError("evaluate needs --prompts FILE (or --baseline zero-shot|few-shot)")
        model = _load(args)
    records = _read_records(args.data, args.task, model.tasks)
    if args.max_records:
        records = sample_per_task(records, args.max_records)
    results = evaluate(model, records, batch_size=args.batch_size)
    print(format_metrics_table(results))
    if args.output:
        atomic_write_text(args.output, json.dumps(results, indent=1))
        print(f"metrics and predictions written to {args.output}")


def _cmd_table(args) -> None:
    from .table import PromptTable

    if args.action in ("export-peft", "import-peft"):
        return _peft(args)
    table = PromptTable.load(args.path)
    if args.action == "list":
        print(f"{args.path}: base model {table.base_model}, hidden size {table.hidden_size}, {len(table)} task(s)")
        for row in table.describe():
            print(f"  {row['task']:<20} {row['method']:<18} {row['virtual_tokens']:>3} virtual tokens "
                  f"(splits {row['splits']}), mean norm {row['mean_norm']}")
    elif args.action == "show":
        if not args.task:
            raise PromptlabError("table show needs a TASK")
        entry = table.entry(args.task)  # PromptTableError naming the tasks it holds
        print(json.dumps({"task": args.task, "method": entry.method, "shape": list(entry.prompt.shape),
                          "template": entry.template.to_dict(),
                          "norms": [round(x, 4) for x in entry.prompt.norm(dim=-1).tolist()]}, indent=1))
    else:
        if not args.task:
            raise PromptlabError("table remove needs a TASK")
        table.remove(args.task)
        table.save(args.path)
        print(f"removed {args.task!r} from {args.path}; left: {table.tasks()}")


def _peft(args) -> None:
    """``table export-peft TABLE TASK DIR`` and ``table import-peft TABLE TASK DIR``."""
    from .adapters import export_peft, import_peft
    from .models import load_base_model
    from .table import PromptTable
    from .templates import load_tasks

    if not args.task or not args.dir:
        raise PromptlabError(f"table {args.action} needs TABLE TASK DIR")
    base = load_base_model(args.model, verbose=False)
    if args.action == "export-peft":
        table = PromptTable.load(args.path, base)
        out = export_peft(table, args.task, args.dir, base)
        print(f"wrote the {table.entry(args.task).method} prompt of {args.task!r} as a PEFT adapter: {out}")
        return
    table = PromptTable.load(args.path, base) if Path(args.path).exists() else PromptTable.for_base(base)
    template = None
    if args.tasks:
        tasks = load_tasks(args.tasks)
        if args.task not in tasks:
            raise PromptlabError(f"{args.tasks}: no task {args.task!r}; it defines {sorted(tasks)}")
        template = tasks[args.task]
    import_peft(args.dir, base, table, args.task, template=template, replace=args.replace)
    table.save(args.path)
    print(f"imported {args.dir} as {table.entry(args.task).method} task {args.task!r} into {args.path}")


def _cmd_demo(args) -> None:
    from .demo import run_demo

    report = run_demo(out_dir=args.out, model_name=args.model, steps=args.steps, quick=args.quick)
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlab", description="Prompt tuning and p-tuning of frozen causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="download a dataset and write train/validation/test JSONL")
    s.add_argument("dataset", choices=["sentiment", "intent_and_slot", "squad"])
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--from-dev", action="store_true", help="squad: split dev-v1.1.json by article")
    s.add_argument("--agreement", default="AllAgree", help="sentiment: AllAgree, 75Agree, 66Agree or 50Agree")
    s.add_argument("--slot-format", choices=["list", "words-first", "marks"], default="list",
                   help="intent_and_slot: how answers write the slots: list 'time(six am)' (default), words-first "
                   "'six am -> time' (more slots right, intent a little worse), marks 'at [time : six am]'")
    s.add_argument("--slot-marks", dest="slot_format", action="store_const", const="marks",
                   help="the same as --slot-format marks")
    s.add_argument("--samples", action="store_true", help="use the small sample files bundled with promptlab")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("train", help="train prompts from a YAML run config")
    s.add_argument("config")
    s.add_argument("--resume", action="store_true",
                   help="continue from output_dir/checkpoint.safetensors (none yet: start fresh, and say so)")
    s.set_defaults(func=_cmd_train)

    for name, func, help_ in (("generate", _cmd_generate, "generate answers for JSONL records"),
                              ("evaluate", _cmd_evaluate, "per-task metrics on JSONL records")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--prompts", required=name == "generate", help="prompt table file")
        s.add_argument("--model", default="embedded", help="base model the table was trained on")
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--max-seq-length", type=int, default=1024)
        s.set_defaults(func=func)
    gen = sub.choices["generate"]
    data_help = ("PATH[:field=column,...]: JSON Lines records with their taskname, or with --task any "
                 ".csv/.tsv/.json/.jsonl/.parquet file whose columns map to the template's fields")
    for parser in (sub.choices["generate"], sub.choices["evaluate"]):
        parser.add_argument("--task", help="the task of every row of --data/--input (files without a taskname)")
    gen.add_argument("--input", required=True, help=data_help)
    gen.add_argument("--output", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=30)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    ev = sub.choices["evaluate"]
    ev.add_argument("--data", required=True, help=data_help + " (with answers)")
    ev.add_argument("--tasks", help="baselines: a task YAML (default: the tutorial tasks)")
    ev.add_argument("--baseline", choices=["zero-shot", "few-shot"], help="score the frozen model without learned prompts")
    ev.add_argument("--train", help="few-shot: JSONL records to take examples from")
    ev.add_argument("--shots", type=int, default=3)
    ev.add_argument("--max-records", type=int, default=0, help="score at most N records per task (0: all)")
    ev.add_argument("--output", help="write metrics and predictions as JSON")

    s = sub.add_parser("table", help="list, show or remove tasks of a prompt table file; export a task as a "
                                     "PEFT adapter or import one")
    s.add_argument("action", choices=["list", "show", "remove", "export-peft", "import-peft"])
    s.add_argument("path", help="the prompt table file")
    s.add_argument("task", nargs="?")
    s.add_argument("dir", nargs="?", help="export-peft/import-peft: the adapter directory")
    s.add_argument("--model", default="embedded", help="export-peft/import-peft: the base model")
    s.add_argument("--tasks", help="import-peft: a task YAML holding the task's template")
    s.add_argument("--replace", action="store_true", help="import-peft: overwrite a task of that name")
    s.set_defaults(func=_cmd_table)

    s = sub.add_parser("demo", help="the whole story on the embedded model; writes a report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--model", default="embedded")
    s.add_argument("--steps", type=int, default=None, help="training steps per task (default 100)")
    s.add_argument("--quick", action="store_true", help="tiny model, sample data, a few steps (for tests)")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PromptlabError as exc:  # promptlab's own errors name the problem; anything else is a bug: traceback
        print(f"promptlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
