"""``promptlab prepare``: raw upstream files -> ``train/validation/test.jsonl`` plus ``manifest.json``.

The dataset modules only parse; this module fetches the files, splits the records deterministically from
a seed, and writes the result (each file atomically, the manifest last, so a folder with a manifest is
complete). The split rules follow NeMo's reference recipes:

* ``sentiment``: the sentences of ``Sentences_<agreement>.txt`` shuffled, 80/10/10
  (``int(0.8 n)`` train, ``int(0.1 n)`` validation, the rest test: 1811/226/227 on AllAgree);
* ``intent_and_slot``: every fold-1 trainset record for train; the testset halved into validation/test.
  ``slot_format`` writes every answer's slots in another notation (``SLOT_FORMATS``);
* ``squad``: ``train-v1.1.json`` for train; ``dev-v1.1.json`` halved *by article* into validation/test.
  With ``from_dev=True`` (no train file needed) the dev articles are split 80/10/10 into all three.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DownloadError
from . import assistant, financial_phrasebank, squad
from .download import Fetcher, make_fetcher
from .jsonl import write_json, write_jsonl

DATASETS = ("sentiment", "intent_and_slot", "squad")
SPLITS = ("train", "validation", "test")
DEFAULT_SEED = 1234
# intent_and_slot's answer notations beside the default "list" ("Slots: time(six am), date(tomorrow)"); the metric
# reads each of them, so a prompt trained on one is scored against references in any
SLOT_FORMATS = {
    "list": None,
    "marks": assistant.mark_slots,  # "Slots: wake me up at [time : six am] [date : tomorrow]"
    "words-first": lambda record: assistant.assign_slots(record, words_first=True),  # "Slots: six am -> time; ..."
}


@dataclass
class PreparedDataset:
    """The three splits of a dataset and how they were made (what the manifest records)."""

    name: str
    splits: dict[str, list[dict[str, Any]]]
    files: list[str]  # relative paths of the raw files read, in the datasets layout
    split_rule: str
    options: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {split: len(self.splits[split]) for split in SPLITS}


def split_counts(n: int, train: float = 0.8, validation: float = 0.1) -> tuple[int, int, int]:
    """Sizes of train/validation/test for n items: ``int(train n)``, ``int(validation n)``, the rest.

    On tiny inputs (n >= 3) validation and test get at least one item each, taken from train, so a
    sample-sized dataset still has every split.
    """
    n_train, n_val = int(train * n), int(validation * n)
    n_test = n - n_train - n_val
    if n >= 3:
        if n_val == 0:
            n_val, n_train = 1, n_train - 1
        if n_test == 0:
            n_test, n_train = 1, n_train - 1
    return n_train, n_val, n_test


def _cut(items: list, sizes: tuple[int, ...]) -> list[list]:
    """Consecutive slices of ``items`` with the given sizes."""
    parts, start = [], 0
    for size in sizes:
        parts.append(items[start:start + size])
        start += size
    return parts


# -- one builder per dataset ----------------------------------------------------------------------------


def _build_sentiment(fetcher: Fetcher, seed: int, agreement: str) -> PreparedDataset:
    relpath = financial_phrasebank.relpath_for(agreement)
    records = financial_phrasebank.parse_sentences(fetcher.fetch(relpath))
    random.Random(seed).shuffle(records)
    train, validation, test = _cut(records, split_counts(len(records)))
    rule = (f"the {len(records)} sentences of Sentences_{agreement}.txt shuffled with random.Random(seed); "
            "first int(0.8 n) train, next int(0.1 n) validation, the rest test")
    return PreparedDataset("sentiment", {"train": train, "validation": validation, "test": test},
                           [relpath], rule, {"agreement": agreement})


def _read_intent_folder(fetcher: Fetcher, folder: str) -> tuple[list[str], list[dict[str, Any]]]:
    files = fetcher.registry.files_under(folder)
    files = [f for f in files if f.endswith(".csv") and "/" not in f[len(folder):]]
    if not files:
        raise DownloadError(f"the registry {fetcher.registry.origin} lists no CSV file under {folder}")
    records = []
    for relpath in files:
        records.extend(assistant.parse_intent_file(fetcher.fetch(relpath)))
    return files, records


def _build_intent_and_slot(fetcher: Fetcher, seed: int, slot_format: str) -> PreparedDataset:
    rng = random.Random(seed)
    train_files, train = _read_intent_folder(fetcher, assistant.TRAIN_DIR)
    test_files, held_out = _read_intent_folder(fetcher, assistant.TEST_DIR)
    rng.shuffle(train)
    rng.shuffle(held_out)
    rewrite = SLOT_FORMATS[slot_format]
    if rewrite:
        train, held_out = [rewrite(r) for r in train], [rewrite(r) for r in held_out]
    half = len(held_out) // 2
    rule = ("train: every record of KFold_1/trainset/*.csv, shuffled with random.Random(seed); "
            "KFold_1/testset/csv/*.csv shuffled with the same generator, first n//2 validation, the rest test")
    return PreparedDataset("intent_and_slot",
                           {"train": train, "validation": held_out[:half], "test": held_out[half:]},
                           train_files + test_files, rule,
                           {"slot_format": slot_format} if slot_format != "list" else {})


def _flatten(articles: list[squad.Article]) -> list[dict[str, Any]]:
    return [record for article in articles for record in article.records]


def _build_squad(fetcher: Fetcher, seed: int, from_dev: bool) -> PreparedDataset:
    rng = random.Random(seed)
    if from_dev:
        articles = squad.parse_squad(fetcher.fetch(squad.DEV_FILE))
        rng.shuffle(articles)
        train, validation, test = (_flatten(part) for part in _cut(articles, split_counts(len(articles))))
        rng.shuffle(train)
        rule = (f"--from-dev: the {len(articles)} articles of dev-v1.1.json shuffled with random.Random(seed); "
                "first int(0.8 n) articles train, next int(0.1 n) validation, the rest test "
                "(no article in two splits); train questions shuffled")
        return PreparedDataset("squad", {"train": train, "validation": validation, "test": test},
                               [squad.DEV_FILE], rule, {"from_dev": True})
    try:
        train_path = fetcher.fetch(squad.TRAIN_FILE)
    except DownloadError as exc:
        raise DownloadError(
            f"SQuAD needs {squad.TRAIN_FILE}, which could not be had: {exc}. Pass --from-dev "
            f"(from_dev=True) to split {squad.DEV_FILE} by article into train/validation/test instead"
        ) from exc
    train = _flatten(squad.parse_squad(train_path))
    dev_articles = squad.parse_squad(fetcher.fetch(squad.DEV_FILE))
    rng.shuffle(train)
    rng.shuffle(dev_articles)
    half = len(dev_articles) // 2
    rule = ("train: every question of train-v1.1.json, shuffled with random.Random(seed); the articles of "
            "dev-v1.1.json shuffled with the same generator, first n//2 articles validation, the rest test")
    return PreparedDataset("squad",
                           {"train": train, "validation": _flatten(dev_articles[:half]),
                            "test": _flatten(dev_articles[half:])},
                           [squad.TRAIN_FILE, squad.DEV_FILE], rule, {"from_dev": False})


def build_dataset(
    name: str,
    fetcher: Fetcher,
    seed: int = DEFAULT_SEED,
    from_dev: bool = False,
    agreement: str = "AllAgree",
    slot_format: str = "list",
) -> PreparedDataset:
    """Fetch, parse and split one dataset in memory (what ``prepare_dataset`` writes)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if from_dev and name != "squad":
        raise ConfigError(f"--from-dev applies to squad only, not to {name}")
    if agreement != "AllAgree" and name != "sentiment":
        raise ConfigError(f"--agreement applies to sentiment only, not to {name}")
    if slot_format not in SLOT_FORMATS:
        raise ConfigError(f"unknown slot format {slot_format!r}; choose one of {', '.join(SLOT_FORMATS)}")
    if slot_format != "list" and name != "intent_and_slot":
        raise ConfigError(f"--slot-format applies to intent_and_slot only, not to {name}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if name == "sentiment":
        return _build_sentiment(fetcher, seed, agreement)
    if name == "intent_and_slot":
        return _build_intent_and_slot(fetcher, seed, slot_format)
    return _build_squad(fetcher, seed, from_dev)


def prepare_dataset(
    name: str,
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    from_dev: bool = False,
    agreement: str = "AllAgree",
    source: str = "remote",
    slot_format: str = "list",
    *,
    mirror: str | None = None,
    fetcher: Fetcher | None = None,
    progress: bool = True,
    as_dataset: bool = False,
):
    """Write ``out_dir/{train,validation,test}.jsonl`` and ``out_dir/manifest.json``; return the manifest,
    or with ``as_dataset`` the splits as a `datasets.DatasetDict` (its ``info.description`` names the files).

    Args:
        name: one of ``DATASETS`` ("sentiment", "intent_and_slot", "squad").
        out_dir: output folder (created if needed).
        seed: seeds every shuffle; the same seed and files give byte-identical outputs.
        from_dev: squad only: build all three splits from dev-v1.1.json (by article).
        agreement: sentiment only: "AllAgree", "75Agree", "66Agree" or "50Agree".
        slot_format: intent_and_slot only: how answers write the slots. "list" (the default): "Slots:
            time(six am), date(tomorrow)". "words-first": "Slots: six am -> time; tomorrow -> date"
            (`assistant.assign_slots`), the better of the two for slots (slot F1 0.627 +- 0.013 against the list's
            0.581 +- 0.017 in bench/RESULTS.md, 3 seeds) at some cost in intent accuracy (0.831 against 0.845).
            "marks": the utterance copied with its slots marked, "Slots: wake me up at [time : six am]"
            (`assistant.mark_slots`); longer answers (10 of the 538 test answers need more than the task's 40
            new tokens): generate them with ``max_new_tokens=64``, as ``bench/campaign.py`` does.
        source: "remote" (``mirror``, else ``$PROMPTLAB_DATA_MIRROR``, else the public homes) or
            "samples" (the small files bundled with promptlab).
        mirror: a directory or http(s) URL overriding ``$PROMPTLAB_DATA_MIRROR`` (source "remote").
        fetcher: a ready Fetcher (e.g. with another registry); overrides ``source`` and ``mirror``.
        progress: show download progress bars.
        as_dataset: return the three splits as a `datasets.DatasetDict` instead of the manifest.
    """
    if fetcher is None:
        fetcher = make_fetcher(source, mirror=mirror, progress=progress)
    prepared = build_dataset(name, fetcher, seed=seed, from_dev=from_dev, agreement=agreement,
                             slot_format=slot_format)
    out = Path(out_dir)
    outputs = {}
    for split in SPLITS:
        outputs[split] = f"{split}.jsonl"
        write_jsonl(out / outputs[split], prepared.splits[split])
    from ..version import __version__

    manifest = {
        "dataset": name,
        "source": fetcher.source,
        "origin": fetcher.describe(),
        "seed": seed,
        "options": prepared.options,
        "files": [{"path": rel, "sha256": fetcher.registry.sha256(rel)} for rel in prepared.files],
        "counts": prepared.counts(),
        "split_rule": prepared.split_rule,
        "outputs": outputs,
        "promptlab_version": __version__,
    }
    write_json(out / "manifest.json", manifest)
    if as_dataset:
        from datasets import Dataset, DatasetDict

        return DatasetDict({split: Dataset.from_list(prepared.splits[split]) for split in SPLITS})
    return manifest
