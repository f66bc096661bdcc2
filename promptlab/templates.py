"""Task templates: `{field}` slots and `<|VIRTUAL_PROMPT_n|>` markers, parsed and validated once.

A template such as ``"<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}"`` becomes a list of segments:
virtual-token runs (marker index n takes ``virtual_token_splits[n]`` positions), literal text, and fields.
The answer field is the last slot; everything before it is the prompt used for generation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, TemplateError

MARKER_RE = re.compile(r"<\|VIRTUAL_PROMPT_(\d+)\|>")
METRICS = ("classification", "squad", "intent_and_slot", "exact_match", "rouge_l")
# The options each training method takes in a run YAML or a task's recipe (besides method and task/tasks).
METHOD_OPTIONS = {
    "prompt_tuning": {"init", "init_text", "num_virtual_tokens"},
    "p_tuning": {"encoder", "hidden_size", "num_layers", "dropout", "residual", "init", "init_text"},
    "deep_prompt_tuning": {"num_virtual_tokens", "reparameterize", "hidden_size", "init", "init_text"},
}


def check_recipe(recipe: Any, error) -> dict[str, Any]:
    """A task's recipe, checked: a known method, that method's options, and ``training`` as a mapping
    (its keys are checked against TrainConfig when it is used). ``error(message)`` makes the exception."""
    if not isinstance(recipe, dict):
        raise error(f"recipe must be a mapping with a 'method', got {recipe!r}")
    method = recipe.get("method")
    if method not in METHOD_OPTIONS:
        raise error(f"recipe method must be one of {sorted(METHOD_OPTIONS)}, got {method!r}")
    unknown = sorted(set(recipe) - METHOD_OPTIONS[method] - {"method", "training"})
    if unknown:
        raise error(f"unknown recipe key(s) {unknown} for {method}; known: "
                    f"{sorted(METHOD_OPTIONS[method] | {'method', 'training'})}")
    if not isinstance(recipe.get("training", {}), dict):
        raise error(f"recipe training must be a mapping of TrainConfig settings, got {recipe['training']!r}")
    return dict(recipe)
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Segment:
    """One piece of a parsed template: kind is "text", "field" or "virtual"."""

    kind: str
    value: str = ""  # literal text, or the field name
    marker: int = -1  # marker index n, for "virtual"
    start: int = 0  # first row of the task's prompt this run takes, for "virtual"
    length: int = 0  # number of virtual positions, for "virtual"


@dataclass
class TaskTemplate:
    """How one task's records become text with virtual-token positions.

    Attributes:
        taskname: the name records carry in their ``taskname`` field.
        prompt_template: text with ``{field}`` slots and ``<|VIRTUAL_PROMPT_n|>`` markers (``{{``/``}}`` escape braces).
        total_virtual_tokens: number of learned prompt vectors of the task.
        virtual_token_splits: positions taken by each marker, in marker order; defaults to ``[total]``.
        truncate_field: field shortened (from its end) when an example is longer than ``max_seq_length``;
            without it such examples are skipped.
        answer_field: the field the model learns to produce; must be the last slot. None: the whole text is
            trained on (language modelling) and generation continues after the full template.
        answer_only_loss: compute the loss on the answer tokens only (otherwise on every real token).

    What the task is scored by and how it is run (everything task-specific lives here, nowhere else):
        metric: "classification" (accuracy and macro-F1 over ``labels``), "squad" (EM/F1 against every
            reference in a record's ``answers``, else its answer field), "intent_and_slot" (intent
            accuracy and slot F1 of "Intent: ...\nSlots: ..." answers), "exact_match", or "rouge_l".
        labels: the label set of a classification task: scored with macro-F1, and ranked by likelihood
            (`evaluate` then reports ``ranked_accuracy``). Only classification has labels: an
            intent-and-slot answer holds slots too, so no closed set of answers can be ranked.
        max_new_tokens: new tokens generated for an answer.
        stop: strings that end an answer (cut from it); [] for none.
        init_text: the text prompt vectors start from (text init), when the call gives none.
        instruction: the instruction that zero-shot and few-shot baselines put before the template.
        recipe: how to train the task: ``method`` (prompt_tuning, p_tuning, deep_prompt_tuning), that
            method's options (as in a run YAML), and ``training``, TrainConfig settings. See
            `PromptLearningModel.add_task` and `TrainConfig.from_recipe`.
    """

    taskname: str
    prompt_template: str
    total_virtual_tokens: int
    virtual_token_splits: list[int] | None = None
    truncate_field: str | None = None
    answer_field: str | None = None
    answer_only_loss: bool = True
    metric: str = "exact_match"
    labels: list[str] | None = None
    max_new_tokens: int = 30
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    init_text: str | None = None
    instruction: str | None = None
    recipe: dict[str, Any] | None = None
    segments: list[Segment] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.taskname, str) or not self.taskname.strip():
            raise TemplateError(f"taskname must be a non-empty string, got {self.taskname!r}")
        if not isinstance(self.prompt_template, str):
            raise self._error(f"prompt_template must be a string, got {type(self.prompt_template).__name__}")
        if (isinstance(self.total_virtual_tokens, bool) or not isinstance(self.total_virtual_tokens, int)
                or self.total_virtual_tokens < 0):
            raise self._error(f"total_virtual_tokens must be an integer >= 0, got {self.total_virtual_tokens!r}")
        for name in ("truncate_field", "answer_field"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise self._error(f"{name} must be a field name or null, got {getattr(self, name)!r}")
        if not isinstance(self.answer_only_loss, bool):
            raise self._error(f"answer_only_loss must be true or false, got {self.answer_only_loss!r}")
        if self.virtual_token_splits is None:
            self.virtual_token_splits = [self.total_virtual_tokens] if self.total_virtual_tokens else []
        if not isinstance(self.virtual_token_splits, (list, tuple)):
            raise self._error(f"virtual_token_splits must be a list of integers, got {self.virtual_token_splits!r}")
        self.virtual_token_splits = list(self.virtual_token_splits)
        self.segments = self._parse()
        self._validate()
        self._validate_task_settings()

    # ----------------------------------------------------------------------------------------- parsing
    def _error(self, message: str) -> TemplateError:
        return TemplateError(f"task {self.taskname!r}: {message}")

    def _parse(self) -> list[Segment]:
        segments: list[Segment] = []
        text = self.prompt_template
        pos, buf = 0, []

        def flush() -> None:
            if buf:
                segments.append(Segment("text", "".join(buf)))
                buf.clear()

        while pos < len(text):
            marker = MARKER_RE.match(text, pos)
            if marker:
                flush()
                segments.append(Segment("virtual", marker=int(marker.group(1))))
                pos = marker.end()
            elif text.startswith("{{", pos) or text.startswith("}}", pos):
                buf.append(text[pos])
                pos += 2
            elif text[pos] == "{":
                end = text.find("}", pos + 1)
                nxt = text.find("{", pos + 1)
                if end < 0 or (0 <= nxt < end):
                    raise self._error(f"unbalanced '{{' at character {pos} of the template")
                name = text[pos + 1 : end].strip()
                if not FIELD_RE.fullmatch(name):
                    raise self._error(f"invalid field name {{{text[pos + 1:end]}}} at character {pos}")
                flush()
                segments.append(Segment("field", name))
                pos = end + 1
            elif text[pos] == "}":
                raise self._error(f"unbalanced '}}' at character {pos} of the template")
            elif text.startswith("<|VIRTUAL_PROMPT", pos):
                raise self._error(f"malformed virtual-token marker at character {pos}: expected <|VIRTUAL_PROMPT_n|>")
            else:
                buf.append(text[pos])
                pos += 1
        flush()
        return segments

    def _validate(self) -> None:
        splits = self.virtual_token_splits
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in splits):
            raise self._error(f"virtual_token_splits must be positive integers, got {splits}")
        if sum(splits) != self.total_virtual_tokens:
            raise self._error(
                f"virtual_token_splits {splits} sum to {sum(splits)}, not total_virtual_tokens={self.total_virtual_tokens}"
            )
        markers = [s.marker for s in self.segments if s.kind == "virtual"]
        if sorted(markers) != list(range(len(splits))) or len(set(markers)) != len(markers):
            raise self._error(
                f"the template's markers {['<|VIRTUAL_PROMPT_%d|>' % m for m in markers]} must be "
                f"<|VIRTUAL_PROMPT_0|> .. <|VIRTUAL_PROMPT_{len(splits) - 1}|>, each once, one per split {splits}"
            )
        starts = [sum(splits[:i]) for i in range(len(splits))]
        self.segments = [
            Segment("virtual", marker=s.marker, start=starts[s.marker], length=splits[s.marker])
            if s.kind == "virtual"
            else s
            for s in self.segments
        ]
        fields = self.fields
        if len(set(fields)) != len(fields):
            raise self._error(f"a field appears twice in the template: {fields}")
        if self.answer_field is not None:
            if self.answer_field not in fields:
                raise self._error(f"answer_field {self.answer_field!r} is not a slot of the template {fields}")
            if fields[-1] != self.answer_field:
                raise self._error(f"answer_field {self.answer_field!r} must be the last slot, but {fields[-1]!r} follows it")
            if self.segments[-1].kind != "field":
                raise self._error(f"the answer field {{{self.answer_field}}} must end the template; "
                                  f"found {self.segments[-1].value!r} after it")
        if self.truncate_field is not None:
            if self.truncate_field not in fields:
                raise self._error(f"truncate_field {self.truncate_field!r} is not a slot of the template {fields}")
            if self.truncate_field == self.answer_field:
                raise self._error("truncate_field may not be the answer field")
        if not fields and not self.total_virtual_tokens:
            raise self._error("the template has neither fields nor virtual tokens")

    def _validate_task_settings(self) -> None:
        if self.metric not in METRICS:
            raise self._error(f"unknown metric {self.metric!r}; choose one of {list(METRICS)}")
        if self.labels is not None:
            if (not isinstance(self.labels, (list, tuple)) or not self.labels
                    or not all(isinstance(x, str) and x.strip() for x in self.labels)
                    or len(set(self.labels)) != len(self.labels)):
                raise self._error(f"labels must be a list of distinct non-empty strings, got {self.labels!r}")
            self.labels = list(self.labels)
            if self.metric != "classification":
                raise self._error(f"labels are the classes of metric 'classification'; metric {self.metric!r} "
                                  f"takes none (remove labels or set metric: classification)")
        if self.metric == "classification" and not self.labels:
            raise self._error("metric 'classification' needs its labels, e.g. labels: [negative, neutral, positive]")
        if self.metric != "exact_match" and self.answer_field is None:
            raise self._error(f"metric {self.metric!r} scores an answer: set answer_field")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise self._error(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x for x in self.stop):
            raise self._error(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        for name in ("init_text", "instruction"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise self._error(f"{name} must be a non-empty string or null, got {value!r}")
        if self.recipe is not None:
            self.recipe = check_recipe(self.recipe, self._error)

    def _answer_index(self) -> int:
        return next(i for i, s in enumerate(self.segments) if s.kind == "field" and s.value == self.answer_field)

    # ------------------------------------------------------------------------------------------- views
    @property
    def recipe_method(self) -> str:
        """The training method of the task's recipe (prompt tuning for a task without one)."""
        return (self.recipe or {}).get("method", "prompt_tuning")

    @property
    def fields(self) -> list[str]:
        """Field names in template order."""
        return [s.value for s in self.segments if s.kind == "field"]

    @property
    def input_fields(self) -> list[str]:
        """Fields a record needs for generation (all but the answer field)."""
        return [f for f in self.fields if f != self.answer_field]

    @property
    def prompt_segments(self) -> list[Segment]:
        """Segments before the answer field: what generation feeds the model."""
        return self.segments[: self._answer_index()] if self.answer_field else list(self.segments)

    def render(self, record: dict[str, Any], with_answer: bool = True) -> str:
        """The record as plain text, virtual runs shown as ``[Vn]`` placeholders (for display only)."""
        out = []
        for seg in self.segments if with_answer else self.prompt_segments:
            if seg.kind == "text":
                out.append(seg.value)
            elif seg.kind == "field":
                out.append(str(record.get(seg.value, "")))
            else:
                out.append("".join(f"[V{seg.start + i}]" for i in range(seg.length)))
        return "".join(out)

    def without_virtual_tokens(self) -> "TaskTemplate":
        """The same task with its ``<|VIRTUAL_PROMPT_n|>`` markers removed (each with one adjacent space,
        the one after it when there is one): the input a deep prompt's task reads, its prefix being in the
        attention cache instead. ``"<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}"`` becomes
        ``"{sentence} sentiment: {label}"``."""
        if not self.total_virtual_tokens:
            return self
        text = self.prompt_template
        while (marker := MARKER_RE.search(text)) is not None:
            start, end = marker.span()
            if text[end : end + 1] == " ":
                end += 1
            elif text[start - 1 : start] == " ":
                start -= 1
            text = text[:start] + text[end:]
        data = {**self.to_dict(), "prompt_template": text, "total_virtual_tokens": 0, "virtual_token_splits": None}
        return TaskTemplate(**data)

    def to_dict(self) -> dict[str, Any]:
        """The template's settings as plain data (YAML/JSON)."""
        data = asdict(self)
        data.pop("segments", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], taskname: str | None = None) -> "TaskTemplate":
        """Build from a mapping; an unknown key is an error naming it."""
        if not isinstance(data, dict):
            raise TemplateError(f"task {taskname!r}: expected a mapping of template settings, got {type(data).__name__}")
        data = dict(data)
        if taskname is not None:
            data.setdefault("taskname", taskname)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        name = data.get("taskname", taskname)
        if unknown:
            raise TemplateError(f"task {name!r}: unknown template key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("taskname", "prompt_template", "total_virtual_tokens") if k not in data]
        if missing:
            raise TemplateError(f"task {name!r}: missing template key(s) {missing}")
        return cls(**data)


def load_tasks(path: str | Path) -> dict[str, TaskTemplate]:
    """Read task templates from YAML: a ``tasks:`` list or mapping (name -> settings), safe loader."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task file: {exc}") from exc
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    return parse_tasks(data, source=str(path))


def parse_tasks(data: Any, source: str = "<tasks>") -> dict[str, TaskTemplate]:
    """Templates from a list of mappings or a mapping name -> settings."""
    try:
        if isinstance(data, dict):
            items = [TaskTemplate.from_dict(v, taskname=k) for k, v in data.items()]
        elif isinstance(data, list):
            items = [TaskTemplate.from_dict(v) for v in data]
        else:
            raise ConfigError(f"{source}: expected a list or mapping of tasks, got {type(data).__name__}")
    except TemplateError as exc:  # name the file as well as the task
        raise TemplateError(f"{source}: {exc}") from None
    tasks: dict[str, TaskTemplate] = {}
    for t in items:
        if t.taskname in tasks:
            raise ConfigError(f"{source}: task {t.taskname!r} is defined twice")
        tasks[t.taskname] = t
    return tasks


def default_tasks() -> dict[str, TaskTemplate]:
    """The templates of the three tutorial tasks (sentiment, intent_and_slot, squad)."""
    return load_tasks(Path(__file__).parent / "configs" / "tasks.yaml")
