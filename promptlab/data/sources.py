"""Records from anywhere: a Hugging Face `datasets.Dataset`, a CSV / JSON / JSON Lines / Parquet file, or a
list of dicts, with columns renamed to a task's template fields.

``records_from("reviews.csv", "topic", columns={"text": "review", "category": "label"})`` reads the file
with `datasets.load_dataset` and gives records ``{"taskname": "topic", "text": ..., "category": ...}``:
``columns`` maps a template field to the column that holds it; fields it does not name are taken from
the column of the same name. The CLI's ``--data`` takes the same as ``PATH[:field=column,...]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _is_dataset(data: Any) -> bool:
    return type(data).__name__ in ("Dataset", "IterableDataset") and hasattr(data, "column_names")


def load_table(path: str | Path):
    """A local CSV/TSV, JSON, JSON Lines or Parquet file as a `datasets.Dataset` (its format from the suffix)."""
    from datasets import load_dataset

    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets raises many types for a malformed file; say which file
        raise DataError(f"{path}: cannot read it as {kind}: {type(exc).__name__}: {exc}") from exc


def as_records(data: Sequence[Mapping[str, Any]] | Any, where: str = "records") -> list[dict[str, Any]]:
    """A list of dict records from a list of mappings or a `datasets.Dataset` (each row a record)."""
    if _is_dataset(data):
        return [dict(row) for row in data]
    if isinstance(data, (str, Path)):
        raise DataError(f"{where}: got a path ({data}); read it with promptlab.data.records_from(path, task)")
    return list(data)


def records_from(source, taskname: str, columns: Mapping[str, str] | None = None, template=None,
                 with_answer: bool = True) -> list[dict[str, Any]]:
    """Records of ``taskname`` from a `datasets.Dataset`, a data file, or a list of dicts.

    Args:
        source: a `datasets.Dataset`, a path to a .csv/.tsv/.json/.jsonl/.parquet file, or a list of dicts.
        taskname: the task every record belongs to (set as its ``taskname``).
        columns: {template field: source column}; other fields are read from the column of the same name.
        template: the task's `TaskTemplate`, to check up front that every field it needs has a column.
        with_answer: the answer field is needed too (training, scoring); off for generation.
    Raises DataError naming the source and the missing column(s).
    """
    where = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    data = load_table(source) if isinstance(source, (str, Path)) else source
    rows = as_records(data, where)
    available = list(data.column_names) if _is_dataset(data) else sorted({k for r in rows for k in r})
    columns = dict(columns or {})
    missing = sorted(c for c in columns.values() if c not in available)
    if template is not None:
        needed = template.fields if with_answer else template.input_fields
        missing += sorted(f for f in needed if f not in columns and f not in available)
    if missing:
        raise DataError(f"{where}: no column(s) {missing} for task {taskname!r}; the columns are {available}"
                        + ("" if not columns else f" (mapping {columns})"))
    renamed = set(columns.values()) - set(columns)
    out = []
    for i, row in enumerate(rows):
        record = {k: v for k, v in row.items() if k not in renamed}
        for field, column in columns.items():
            if column not in row:
                raise DataError(f"{where}: row {i + 1} has no column {column!r} (for field {field!r})")
            record[field] = row[column]
        record["taskname"] = taskname
        out.append(record)
    return out


def parse_data_argument(text: str) -> tuple[str, dict[str, str]]:
    """``PATH[:field=column,...]`` (the CLI's ``--data``) -> (path, columns)."""
    path, sep, mapping = text.rpartition(":")
    if not sep or "=" not in mapping or Path(text).exists():
        return text, {}
    columns = {}
    for pair in mapping.split(","):
        field, eq, column = (part.strip() for part in pair.partition("="))
        if not eq or not field or not column:
            raise DataError(f"--data {text!r}: expected PATH:field=column[,field=column...], got {pair!r}")
        columns[field] = column
    return path, columns
