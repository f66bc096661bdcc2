"""PEFT adapters out and in: a task's frozen prompt as a PEFT prompt-learning adapter directory, and back.

An adapter directory is what PEFT's ``save_pretrained`` writes for a prompt-learning method: an
``adapter_config.json`` and an ``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings``.
- PROMPT_TUNING, P_TUNING: (V, D) input vectors, put before the input. A P_TUNING file already holds its
  encoder's output (PEFT computes it when saving and loads it as a plain embedding), so it imports as is.
- PREFIX_TUNING: (P, L*2*KV) keys and values; PEFT views a row as (L*2, H, d) - layer 0 keys, layer 0
  values, layer 1 keys, ... - and gives layer l the (B, H, P, d) keys 2l and values 2l+1. On grouped-query
  models H and H*d are the *key/value* heads and width (PEFT's ``num_attention_heads`` and ``token_dim``
  become them, see peft's ``_prepare_prompt_learning_config``): no head is repeated. That is promptlab's
  (L, 2, P, KV) prefix with KV = kv_heads x head size, head-major, transposed.

PEFT puts virtual tokens only at the very start of the input and numbers real tokens after them, as
promptlab does for a template whose virtual tokens open it in row order, and for every deep prompt (real
tokens at P, P+1, ...). Other templates cannot be expressed: `AdapterError` says why.

PEFT files carry no fingerprint of the base, so an import checks the sizes (hidden size, layers, key/value
width and heads) and ``base_model_name_or_path``; files from `export_peft` also carry the table's embedding
fingerprint (and template) in the safetensors metadata, which PEFT ignores and an import checks.

For the command line, ``promptlab table export-peft TABLE TASK DIR`` and ``... import-peft DIR`` need::

    base = load_base_model(MODEL)    # --model; for export, default PromptTable.load(TABLE).base_model
    table = PromptTable.load(TABLE, base)
    export_peft(table, TASK, DIR, base)   # base: required for a deep prompt (its key/value head count)
    import_peft(DIR, base, table, TASK, template=None, check_name=True, replace=False); table.save(TABLE)

``template``: a TaskTemplate from --tasks YAML, or None (see `import_peft`). Errors are `AdapterError`, a
`PromptTableError`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .deep import prefix_shape
from .errors import AdapterError
from .io import atomic_write_text, load_safetensors, save_safetensors
from .table import DEEP, PromptTable, TableEntry
from .templates import TaskTemplate

CONFIG, WEIGHTS, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
METHODS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": DEEP}



def check_leading(template: TaskTemplate, where: str) -> None:
    """Refuse a template whose virtual tokens are not rows 0..V-1 at the very start of its input."""
    runs = [s for s in template.segments if s.kind == "virtual"]
    at_start = all(s.kind == "virtual" for s in template.segments[: len(runs)])
    if runs and at_start and [s.marker for s in runs] == list(range(len(runs))):
        return  # adjacent in-order markers at the start are one run of positions 0..V-1
    how = ("none" if not runs else f"{len(runs)} runs at the start, out of row order" if at_start
           else "one run after text" if len(runs) == 1 else f"{len(runs)} runs with text before or between them")
    raise AdapterError(f"{where}: PEFT puts virtual tokens only at the very start of the input, as one run; "
                       f"the template {template.prompt_template!r} has {how}, so it cannot be a PEFT adapter")


def export_peft(table: PromptTable, task: str, directory: str | Path, base=None) -> Path:
    """Write ``task``'s prompt from ``table`` as a PEFT adapter directory; returns the directory.

    Prompt tuning and p-tuning -> PROMPT_TUNING; deep prompt tuning -> PREFIX_TUNING (needs ``base``, the
    loaded `BaseModel` of the table, for its key/value heads; with it the table must match it).
    """
    entry, directory = table.entry(task), Path(directory)
    if base is not None and not base.matches(table.fingerprint):
        raise AdapterError(f"the prompt table belongs to {table.base_model!r}, not to the base model {base.name!r}")
    config = {"auto_mapping": None, "base_model_name_or_path": table.base_model, "inference_mode": True,
              "modules_to_save": None, "num_transformer_submodules": 1, "revision": None, "task_type": "CAUSAL_LM",
              "num_virtual_tokens": entry.num_virtual_tokens}
    if entry.method == DEEP:
        if base is None:
            raise AdapterError(f"task {task!r}: exporting a deep prompt needs the base model (the table does not "
                               f"record how its key/value width splits into heads)")
        layers, kv_heads, head_dim = prefix_shape(base.model)
        flat = entry.prompt.permute(2, 0, 1, 3).reshape(entry.num_virtual_tokens, -1)  # (L, 2, P, KV) -> (P, L*2*KV)
        config.update(peft_type="PREFIX_TUNING", num_layers=layers, num_attention_heads=kv_heads,
                      token_dim=kv_heads * head_dim, encoder_hidden_size=kv_heads * head_dim,
                      prefix_projection=False, init_weights=None)
    else:
        check_leading(entry.template, f"task {task!r}")
        flat = entry.prompt  # (V, D)
        text_config = base.model.config.get_text_config() if base is not None else None
        config.update(peft_type="PROMPT_TUNING", token_dim=table.hidden_size,
                      num_layers=table.prefix_shape[0] if table.prefix_shape else None,  # None: PEFT reads the model's
                      num_attention_heads=getattr(text_config, "num_attention_heads", None)
                      or getattr(text_config, "n_head", None),
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None,
                      tokenizer_name_or_path=None)
    meta = {"format": "pt", "promptlab_fingerprint": table.fingerprint, "promptlab_method": entry.method,
            "promptlab_template": json.dumps(entry.template.to_dict(), sort_keys=True)}
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / WEIGHTS, {KEY: flat.detach().float().cpu().contiguous()}, meta)
    # the config last: a write killed halfway leaves a directory that does not read as an adapter
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _read(directory: Path) -> tuple[dict, torch.Tensor, dict]:
    """(config, prompt_embeddings, metadata) of an adapter directory; every problem is an `AdapterError`."""
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{directory / CONFIG}: missing: a PEFT adapter directory holds {CONFIG} and "
                           f"{WEIGHTS}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{directory / CONFIG}: not a readable JSON adapter config: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") not in METHODS:
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{directory / CONFIG}: peft_type {kind!r} is not one promptlab imports ({sorted(METHODS)})")
    if config.get("task_type") not in (None, "CAUSAL_LM") or config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(f"{directory / CONFIG}: made for task_type {config.get('task_type')!r}; promptlab "
                           f"imports adapters of causal LMs (CAUSAL_LM) only")
    n = config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdapterError(f"{directory / CONFIG}: num_virtual_tokens must be a positive integer, got {n!r}")
    if not (directory / WEIGHTS).is_file():
        torch_file = (directory / "adapter_model.bin").is_file()
        raise AdapterError(f"{directory / WEIGHTS}: missing" + (
            "; the adapter is saved as adapter_model.bin (a torch.save file, which can run code and which promptlab never loads): re-save it with "
            "PEFT's save_pretrained(..., safe_serialization=True)" if torch_file else ""))
    tensors, meta = load_safetensors(directory / WEIGHTS, AdapterError)
    if set(tensors) != {KEY}:
        raise AdapterError(f"{directory / WEIGHTS}: expected one tensor {KEY!r}, found {sorted(tensors)}")
    return config, tensors[KEY].float(), meta


def _check_name(directory: Path, config: dict, base, check_name: bool) -> None:
    """PEFT's own files name their base but carry no fingerprint: a different name is refused (or warned of)."""
    name = config.get("base_model_name_or_path")
    if not name:
        warnings.warn(f"{directory}: the adapter does not name its base model; only its sizes were checked "
                      f"against {base.name!r}", stacklevel=3)
    elif str(name).rstrip("/").rsplit("/", 1)[-1].lower() != base.name.rstrip("/").rsplit("/", 1)[-1].lower():
        message = (f"{directory}: adapter made for base model {name!r}, but the base model is {base.name!r}: "
                   f"prompts only work with the model they were trained on")
        if check_name:
            raise AdapterError(message + " (check_name=False accepts it if this is that model under another name)")
        warnings.warn(message, stacklevel=3)


def _expect(directory: Path, config: dict, key: str, value: int, base) -> None:
    if config.get(key) is not None and config[key] != value:
        raise AdapterError(f"{directory / CONFIG}: {key}={config[key]}, but the base model {base.name!r} has "
                           f"{value}: the adapter was made for another model")


def import_peft(directory: str | Path, base, table: PromptTable, taskname: str, template: TaskTemplate | None = None,
                check_name: bool = True, replace: bool = False) -> TableEntry:
    """Add a PEFT PROMPT_TUNING, P_TUNING or PREFIX_TUNING adapter to ``table`` as the frozen task ``taskname``.

    ``base``: the loaded `BaseModel` (the table's). ``template``: the task's template; for prompt tuning and
    p-tuning its V virtual tokens must open it, for prefix tuning its markers are dropped
    (`TaskTemplate.without_virtual_tokens`); None: the one `export_peft` stored, else plain continuation
    (``<|VIRTUAL_PROMPT_0|>{text}`` or ``{text}``). ``check_name``: refuse an adapter naming another base
    (otherwise warn). ``replace``: overwrite an existing task. Returns the new entry; the table is not saved.
    """
    directory = Path(directory)
    config, flat, meta = _read(directory)
    if not base.matches(table.fingerprint):
        raise AdapterError(f"the prompt table belongs to {table.base_model!r}, not to the base model {base.name!r}")
    fingerprint = meta.get("promptlab_fingerprint")  # in files from export_peft: the embeddings decide
    if fingerprint is not None and not base.matches(fingerprint):
        raise AdapterError(f"{directory}: exported from a prompt table of base model "
                           f"{config.get('base_model_name_or_path')!r} whose embedding fingerprint differs from "
                           f"{base.name!r}: prompts only work with the model they were trained on")
    method, n = METHODS[config["peft_type"]], config["num_virtual_tokens"]
    deep = method == DEEP
    layers, kv_heads, head_dim = prefix_shape(base.model)
    width = kv_heads * head_dim if deep else base.hidden_size  # what PEFT calls token_dim
    _expect(directory, config, "num_layers", layers, base)
    _expect(directory, config, "token_dim", width, base)
    if deep:
        _expect(directory, config, "num_attention_heads", kv_heads, base)
    expected = (n, layers * 2 * width) if deep else (n, width)
    if tuple(flat.shape) != expected:
        raise AdapterError(f"{directory / WEIGHTS}: {KEY} has shape {tuple(flat.shape)}, expected {expected} for "
                           f"{n} virtual tokens on {base.name!r}: corrupt, or made for another model")
    if fingerprint is None:
        _check_name(directory, config, base, check_name)
    if template is None and "promptlab_template" in meta:
        try:
            template = TaskTemplate.from_dict(json.loads(meta["promptlab_template"]))
        except (ValueError, TypeError) as exc:  # TemplateError is a ValueError
            raise AdapterError(f"{directory / WEIGHTS}: its promptlab template is invalid: {exc}") from exc
    if deep:
        prompt = flat.view(n, layers, 2, width).permute(1, 2, 0, 3)  # (P, L*2*KV) -> (L, 2, P, KV)
        template = (template or TaskTemplate(taskname, "{text}", 0)).without_virtual_tokens()
    else:
        prompt = flat  # (V, D)
        template = template or TaskTemplate(taskname, "<|VIRTUAL_PROMPT_0|>{text}", n)
        if template.total_virtual_tokens != n:
            raise AdapterError(f"task {taskname!r}: the adapter has {n} virtual tokens, the template "
                               f"{template.prompt_template!r} has {template.total_virtual_tokens}")
        check_leading(template, f"task {taskname!r}")
        if method == "prompt_tuning" and meta.get("promptlab_method") == "p_tuning":
            method = "p_tuning"  # exported from a p-tuned task: keep saying how it was learned
    if template.taskname != taskname:
        template = TaskTemplate.from_dict({**template.to_dict(), "taskname": taskname})
    (table.replace if replace else table.add)(taskname, prompt.to(base.device), template, method)
    return table.entry(taskname)
