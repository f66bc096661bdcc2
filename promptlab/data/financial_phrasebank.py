"""Financial PhraseBank v1.0 (Malo et al. 2014): ``Sentences_<agreement>.txt`` -> sentiment records.

Each line is ``sentence@label`` with label in {positive, neutral, negative}, encoded latin-1 with CRLF line
ends. A sentence may itself contain '@', so a line is split on its *last* '@'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

TASKNAME = "sentiment"
LABELS = ("positive", "neutral", "negative")
AGREEMENTS = ("AllAgree", "75Agree", "66Agree", "50Agree")


def relpath_for(agreement: str = "AllAgree") -> str:
    """The file's path in the datasets layout, e.g. ``financial_phrasebank/Sentences_AllAgree.txt``."""
    if agreement not in AGREEMENTS:
        raise ConfigError(f"unknown Financial PhraseBank agreement level {agreement!r}; choose one of {', '.join(AGREEMENTS)}")
    return f"financial_phrasebank/Sentences_{agreement}.txt"


def parse_sentences(path: str | Path) -> list[dict[str, Any]]:
    """Parse one ``Sentences_*.txt`` file into ``{"taskname", "sentence", "label"}`` records, in file order.

    Raises DataError naming the file and line for a line without '@', with an empty sentence, or with a
    label outside {positive, neutral, negative}.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("latin-1")  # latin-1 maps every byte: decoding cannot fail
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    # Split on "\n" only: str.splitlines would also break on U+0085, which latin-1 decodes from byte 0x85.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end
    records = []
    for lineno, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        sentence, sep, label = line.rpartition("@")
        sentence, label = sentence.strip(), label.strip()
        if not sep:
            raise DataError(f"{path}:{lineno}: expected 'sentence@label', found no '@' in {line[:60]!r}")
        if not sentence:
            raise DataError(f"{path}:{lineno}: empty sentence before '@{label}'")
        if label not in LABELS:
            raise DataError(f"{path}:{lineno}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
        records.append({"taskname": TASKNAME, "sentence": sentence, "label": label})
    if not records:
        raise DataError(f"{path}: no sentences found")
    return records
