"""JSON Lines files: strict reading (errors name file and line) and atomic writing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError
from ..io import atomic_write_text


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read one JSON object per line; blank lines are skipped.

    Raises DataError naming the file and line for a line that is not UTF-8, not JSON, or not an object,
    and for a file that cannot be read.
    """
    path = Path(path)
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot read JSONL file ({exc.strerror or exc})") from exc
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1})") from exc
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError:
            raise DataError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(value).__name__}")
        records.append(value)
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON Lines (UTF-8, one object per line) atomically; returns the record count."""
    lines = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, not a dict")
        try:
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: record {index} cannot be written as JSON ({exc})") from exc
    atomic_write_text(path, "".join(lines))
    return len(lines)


def write_json(path: str | Path, value: Any) -> None:
    """Write one JSON document (indented, sorted keys) atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
