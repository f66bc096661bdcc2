"""The playground: an ipywidgets app to type a task's inputs and see the answer and where the learned
prompt goes (`playground`), and the function behind it (`playground_answer`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import ConfigError, DataError



def playground_tasks(model) -> list[str]:
    """Tasks the model can answer: those with a prompt (training or frozen), or with no virtual token."""
    ready = set(model.training_tasks()) | set(model.prompt_table.tasks())
    return [name for name, t in model.tasks.items() if name in ready or t.total_virtual_tokens == 0]


def _prompt_of(model, task: str) -> tuple[str, int]:
    """(method, virtual tokens) of a task's prompt: input positions, or a deep prompt's prefix length."""
    if task not in set(model.training_tasks()) | set(model.prompt_table.tasks()):
        return "none", 0
    prefix = model.prefix(task)
    return model.method_of(task), (prefix.shape[2] if prefix is not None else model.tasks[task].total_virtual_tokens)


def playground_answer(model, task: str, fields: Mapping[str, str], max_new_tokens: int | None = None) -> dict:
    """Generate one answer for ``task`` from its input ``fields`` and describe the virtual tokens used.

    fields: {input field: text}, exactly the template's input fields (the answer field is generated).
    Decoding is the one `promptlab.evaluate.predict` uses (greedy, the task's token budget, stripped).
    Returns {"task", "record", "answer", "rendered" (the prompt text with [V0]..[Vn-1] where the learned
    vectors go), "method", "virtual_tokens", "splits", "max_new_tokens"}.
    """
    from .evaluate import predict

    if task not in playground_tasks(model):
        raise ConfigError(f"task {task!r} has no prompt in this model; choose one of {playground_tasks(model)}")
    template = model.tasks[task]
    unknown = sorted(set(fields) - set(template.input_fields))
    missing = [f for f in template.input_fields if f not in fields]
    if unknown or missing:
        raise DataError(f"task {task!r} takes the input fields {template.input_fields}; "
                         f"unknown {unknown}, missing {missing}")
    record = {"taskname": task, **{f: str(fields[f]) for f in template.input_fields}}
    budget = max_new_tokens or template.max_new_tokens
    answer = predict(model, [record], budget, batch_size=1)[0]
    return {"task": task, "record": record, "answer": answer,
            "rendered": template.render(record, with_answer=False),
            "method": _prompt_of(model, task)[0], "virtual_tokens": _prompt_of(model, task)[1],
            "splits": list(template.virtual_token_splits), "max_new_tokens": budget}


def _playground_html(result: dict, reference: str | None) -> str:
    """The widget's result panel: answer, reference, and the prompt with its virtual tokens highlighted."""
    import html
    import re

    shown = re.sub(r"((?:\[V\d+\])+)", r'<span style="background:#ffe08a">\1</span>',
                   html.escape(result["rendered"]))
    lines = [f"<b>answer:</b> <code>{html.escape(result['answer']) or '(empty)'}</code>"]
    if reference is not None:
        lines.append(f"<b>reference:</b> <code>{html.escape(reference)}</code>")
    lines.append(f"<b>virtual tokens:</b> {result['virtual_tokens']} ({result['method']}, "
                 f"splits {result['splits']}); highlighted below where the model reads them")
    lines.append(f'<pre style="white-space:pre-wrap">{shown}</pre>')
    return "<br>".join(lines)


def playground(model, records_by_task: Mapping[str, Sequence[Mapping]] | None = None):
    """An ipywidgets app: choose a task, type its inputs, press Generate; see the answer and virtual tokens.

    records_by_task: optional {task: records}; the inputs start with the task's first record, "Next
    example" steps through them, and the reference answer is shown while the inputs are unchanged.
    Returns a VBox whose children are: (task Dropdown + "Next example" Button), task info HTML, the
    input fields (VBox of Text/Textarea named like the template fields), the Generate Button, result HTML.
    `playground_answer` does the work.
    """
    import html

    import ipywidgets as widgets

    names = playground_tasks(model)
    if not names:
        raise ConfigError("the model has no task with a prompt: train one or load a prompt table first")
    examples = {t: list((records_by_task or {}).get(t, [])) for t in names}
    chooser = widgets.Dropdown(options=names, value=names[0], description="task")
    next_button = widgets.Button(description="Next example", icon="forward")
    info, result = widgets.HTML(), widgets.HTML()
    inputs_box = widgets.VBox()
    generate = widgets.Button(description="Generate", button_style="primary", icon="play")
    state = {"example": {}, "position": {t: -1 for t in names}}

    def inputs() -> dict[str, str]:
        return {box.description: box.value for box in inputs_box.children}

    def show_task(change=None) -> None:
        task = chooser.value
        template = model.tasks[task]
        boxes = []
        for name in template.input_fields:
            long = name == template.truncate_field  # the field that may be long gets a multi-line box
            cls = widgets.Textarea if long else widgets.Text
            boxes.append(cls(description=name, layout=widgets.Layout(width="95%", height="9em" if long else None)))
        inputs_box.children = boxes
        state["example"] = {}
        method, count = _prompt_of(model, task)
        info.value = (f"<code>{html.escape(template.prompt_template)}</code><br>{method}, "
                      f"{count} virtual tokens, splits {template.virtual_token_splits}")
        result.value = ""
        next_button.disabled = not examples[task]
        if examples[task]:
            show_example()

    def show_example(button=None) -> None:
        task = chooser.value
        state["position"][task] = (state["position"][task] + 1) % len(examples[task])
        record = examples[task][state["position"][task]]
        for box in inputs_box.children:
            box.value = str(record.get(box.description, ""))
        state["example"] = {"inputs": inputs(), "record": record}
        result.value = ""

    def run(button=None) -> None:
        task = chooser.value
        try:
            answer = playground_answer(model, task, inputs())
        except Exception as exc:  # shown in the widget: a callback's exception would vanish into the log
            result.value = f'<span style="color:#b00">{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</span>'
            return
        reference = None
        answer_field = model.tasks[task].answer_field
        if state["example"].get("inputs") == inputs() and answer_field:
            reference = state["example"]["record"].get(answer_field)
        result.value = _playground_html(answer, None if reference is None else str(reference))

    chooser.observe(show_task, names="value")
    next_button.on_click(show_example)
    generate.on_click(run)
    show_task()
    return widgets.VBox([widgets.HBox([chooser, next_button]), info, inputs_box, generate, result])
