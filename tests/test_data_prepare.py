"""`prepare_dataset`: split sizes and rules, determinism, manifests, squad by article, clear errors.

Runs on the bundled samples. The last test checks the real datasets when ``PROMPTLAB_DATA_MIRROR`` names a
directory laid out like ../shared/datasets (skipped otherwise).
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from promptlab.data import DATASETS, prepare_dataset, read_jsonl
from promptlab.data.download import SAMPLES_DIR, make_fetcher, samples_registry, sha256_file
from promptlab.data.prepare import SPLITS, build_dataset, split_counts
from promptlab.errors import ConfigError, DownloadError
from promptlab.metrics import parse_intent_slot


def _splits(out: Path) -> dict[str, list[dict]]:
    return {split: read_jsonl(out / f"{split}.jsonl") for split in SPLITS}


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch):
    """Tests choose their source explicitly; a mirror in the environment must not leak in."""
    monkeypatch.delenv("PROMPTLAB_DATA_MIRROR", raising=False)


def test_split_counts():
    assert split_counts(2264) == (1811, 226, 227)  # Financial PhraseBank AllAgree
    assert split_counts(48) == (38, 4, 6)  # SQuAD dev articles with --from-dev
    assert split_counts(60) == (48, 6, 6)
    assert split_counts(4) == (2, 1, 1)  # tiny inputs still get every split
    assert split_counts(3) == (1, 1, 1)
    assert split_counts(0) == (0, 0, 0)


def test_datasets_names():
    assert DATASETS == ("sentiment", "intent_and_slot", "squad")


@pytest.mark.parametrize("name, counts", [
    ("sentiment", {"train": 48, "validation": 6, "test": 6}),
    ("intent_and_slot", {"train": 40, "validation": 8, "test": 8}),
])
def test_prepare_samples_counts_and_manifest(tmp_path, name, counts):
    manifest = prepare_dataset(name, tmp_path / name, source="samples")
    assert manifest["counts"] == counts
    splits = _splits(tmp_path / name)
    assert {split: len(records) for split, records in splits.items()} == counts
    assert all(r["taskname"] == name for records in splits.values() for r in records)
    on_disk = json.loads((tmp_path / name / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["dataset"] == name and manifest["seed"] == 1234 and manifest["source"] == "samples"
    assert manifest["split_rule"]
    for entry in manifest["files"]:
        assert sha256_file(SAMPLES_DIR / entry["path"]) == entry["sha256"]


def test_sentiment_splits_partition_the_file(tmp_path):
    prepare_dataset("sentiment", tmp_path, source="samples", agreement="75Agree")
    sentences = [r["sentence"] for records in _splits(tmp_path).values() for r in records]
    assert len(sentences) == len(set(sentences)) == 66
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["options"] == {"agreement": "75Agree"}
    assert [f["path"] for f in manifest["files"]] == ["financial_phrasebank/Sentences_75Agree.txt"]


def test_intent_splits_use_fold_files(tmp_path):
    manifest = prepare_dataset("intent_and_slot", tmp_path, source="samples")
    paths = [f["path"] for f in manifest["files"]]
    assert len(paths) == 14 and sum("/trainset/" in p for p in paths) == 7
    labels = [r["label"] for r in _splits(tmp_path)["train"]]
    assert "Intent: alarm_set\nSlots: time(six thirty am)" in labels
    held_out = _splits(tmp_path)["validation"] + _splits(tmp_path)["test"]
    assert len({r["utterance"] for r in held_out}) == 16


@pytest.mark.parametrize("slot_format, example", [
    # two adjacent marks of one type in the annotation, "[time : six] [time : thirty am]", are one slot
    ("marks", "Intent: alarm_set\nSlots: set an alarm for [time : six thirty am]"),
    ("words-first", "Intent: alarm_set\nSlots: six thirty am -> time"),
])
def test_intent_slot_formats(tmp_path, slot_format, example):
    plain, other = _prepared(tmp_path / "plain"), _prepared(tmp_path / "other", slot_format=slot_format)
    assert example in [r["label"] for r in other["train"]]
    for split in plain:  # the same records in the same order, the same intent and slots in the other notation
        assert [r["utterance"] for r in plain[split]] == [r["utterance"] for r in other[split]]
        assert ([parse_intent_slot(r["label"]) for r in plain[split]]
                == [parse_intent_slot(r["label"]) for r in other[split]])
        assert all("[" not in r["label"] and "->" not in r["label"] for r in plain[split])
        assert any(r["label"] != o["label"] for r, o in zip(plain[split], other[split]))
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["options"] == {"slot_format": slot_format}
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["options"] == {}


def _prepared(out: Path, **options) -> dict[str, list[dict]]:
    prepare_dataset("intent_and_slot", out, source="samples", **options)
    return _splits(out)


@pytest.mark.parametrize("name, options", [
    ("sentiment", {}), ("intent_and_slot", {}), ("intent_and_slot", {"slot_format": "marks"}),
    ("intent_and_slot", {"slot_format": "words-first"}), ("squad", {}),
    ("squad", {"from_dev": True}),
])
def test_same_seed_same_bytes_other_seed_other_order(tmp_path, name, options):
    outs = []
    for run, seed in enumerate([7, 7, 8]):
        out = tmp_path / f"run{run}"
        prepare_dataset(name, out, seed=seed, source="samples", **options)
        outs.append({f: (out / f).read_bytes() for f in ["train.jsonl", "validation.jsonl", "test.jsonl"]})
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_squad_train_file_and_dev_halves_by_article(tmp_path):
    manifest = prepare_dataset("squad", tmp_path, source="samples")
    splits = _splits(tmp_path)
    assert manifest["counts"]["train"] == 24
    assert manifest["counts"]["validation"] + manifest["counts"]["test"] == 22
    val_titles = {r["title"] for r in splits["validation"]}
    test_titles = {r["title"] for r in splits["test"]}
    assert len(val_titles) == len(test_titles) == 2 and val_titles.isdisjoint(test_titles)
    record = splits["validation"][0]
    assert set(record) == {"taskname", "context", "question", "answer", "answers", "id", "title"}
    assert len(record["answers"]) == 3


def test_squad_from_dev_is_disjoint_by_article(tmp_path):
    manifest = prepare_dataset("squad", tmp_path, source="samples", from_dev=True)
    splits = _splits(tmp_path)
    titles = {split: {r["title"] for r in records} for split, records in splits.items()}
    assert titles["train"].isdisjoint(titles["validation"])
    assert titles["train"].isdisjoint(titles["test"])
    assert titles["validation"].isdisjoint(titles["test"])
    assert [len(titles[s]) for s in SPLITS] == [2, 1, 1]  # 4 articles
    assert sum(manifest["counts"].values()) == 22
    assert len({r["id"] for records in splits.values() for r in records}) == 22
    assert [f["path"] for f in manifest["files"]] == ["squad/dev-v1.1.json"]


def test_squad_without_train_file_asks_for_from_dev(tmp_path):
    mirror = Path(shutil.copytree(SAMPLES_DIR, tmp_path / "mirror"))
    (mirror / "squad" / "train-v1.1.json").unlink()
    fetcher = make_fetcher("remote", mirror=str(mirror), registry=samples_registry())
    with pytest.raises(DownloadError) as info:
        prepare_dataset("squad", tmp_path / "out", fetcher=fetcher)
    assert "squad/train-v1.1.json" in str(info.value) and "--from-dev" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    manifest = prepare_dataset("squad", tmp_path / "out", fetcher=fetcher, from_dev=True)
    assert sum(manifest["counts"].values()) == 22


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_prepare_through_an_http_mirror(tmp_path):
    """The whole pipeline through a local HTTP server serving the samples (with the samples' registry)."""
    handler = partial(_QuietHandler, directory=str(SAMPLES_DIR))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        try:
            fetcher = make_fetcher("remote", mirror=url, registry=samples_registry(),
                                   cache_dir=tmp_path / "cache", progress=False, retries=0, timeout=5)
            manifest = prepare_dataset("intent_and_slot", tmp_path / "out", fetcher=fetcher)
        finally:
            httpd.shutdown()
    assert manifest["counts"] == {"train": 40, "validation": 8, "test": 8}
    assert manifest["origin"] == f"mirror {url}"
    assert len(list((tmp_path / "cache" / "data").rglob("*.csv"))) == 14


@pytest.mark.parametrize("kwargs, problem", [
    ({"name": "imdb"}, "unknown dataset 'imdb'"),
    ({"name": "sentiment", "from_dev": True}, "squad only"),
    ({"name": "squad", "agreement": "50Agree"}, "sentiment only"),
    ({"name": "squad", "slot_format": "marks"}, "intent_and_slot only"),
    ({"name": "intent_and_slot", "slot_format": "bio"}, "unknown slot format 'bio'; choose one of list, marks"),
    ({"name": "sentiment", "agreement": "90Agree"}, "90Agree"),
    ({"name": "sentiment", "seed": "12"}, "seed must be an integer"),
])
def test_bad_arguments(kwargs, problem):
    with pytest.raises(ConfigError, match=problem):
        build_dataset(fetcher=make_fetcher("samples"), **kwargs)


def _real_mirror() -> str | None:
    mirror = os.environ.get("PROMPTLAB_DATA_MIRROR")
    return mirror if mirror and Path(mirror).is_dir() else None


REAL_MIRROR = _real_mirror()  # read at import, before the autouse fixture clears the variable


@pytest.mark.slow
@pytest.mark.skipif(REAL_MIRROR is None, reason="PROMPTLAB_DATA_MIRROR does not name a directory of real data")
def test_real_data_counts(tmp_path):
    fetcher = make_fetcher("remote", mirror=REAL_MIRROR, progress=False)
    counts = {
        "sentiment": prepare_dataset("sentiment", tmp_path / "s", fetcher=fetcher)["counts"],
        "intent_and_slot": prepare_dataset("intent_and_slot", tmp_path / "i", fetcher=fetcher)["counts"],
    }
    assert counts["sentiment"] == {"train": 1811, "validation": 226, "test": 227}
    assert counts["intent_and_slot"] == {"train": 9960, "validation": 538, "test": 538}
    manifest = prepare_dataset("squad", tmp_path / "q", fetcher=fetcher, from_dev=True)
    assert sum(manifest["counts"].values()) == 10570
    titles = {s: {r["title"] for r in read_jsonl(tmp_path / "q" / f"{s}.jsonl")} for s in SPLITS}
    assert [len(titles[s]) for s in SPLITS] == [38, 4, 6]
    assert titles["train"].isdisjoint(titles["validation"] | titles["test"])
    assert titles["validation"].isdisjoint(titles["test"])
    if not (Path(REAL_MIRROR) / "squad" / "train-v1.1.json").exists():
        with pytest.raises(DownloadError, match="--from-dev"):
            prepare_dataset("squad", tmp_path / "q2", fetcher=fetcher)
