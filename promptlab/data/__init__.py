"""Datasets: checksummed downloads, one parser per dataset, deterministic splits, JSON Lines files.

``prepare_dataset("sentiment", "data/sentiment")`` writes ``train/validation/test.jsonl`` and a
``manifest.json``; ``read_jsonl`` reads them back; ``records_from`` takes a `datasets.Dataset` or a
CSV/JSON/JSON Lines/Parquet file instead. ``features`` turns records into model inputs.
"""
from .download import Fetcher, Registry, fetch_file, make_fetcher
from .jsonl import read_jsonl, write_jsonl
from .prepare import DATASETS, build_dataset, prepare_dataset
from .sources import as_records, records_from

__all__ = ["DATASETS", "Fetcher", "Registry", "as_records", "build_dataset", "fetch_file", "make_fetcher",
           "prepare_dataset", "read_jsonl", "records_from", "write_jsonl"]
