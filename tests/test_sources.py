"""Hugging Face `datasets` in: a Dataset or a CSV / JSON / JSON Lines / Parquet file becomes records."""
import json

import pytest
import torch

import promptlab as pl
from promptlab.data import prepare_dataset, records_from
from promptlab.data.sources import parse_data_argument
from promptlab.evaluate import evaluate

import datasets

ROWS = [{"review": "wake me up at seven", "scenario": "alarm", "id": 1},
        {"review": "play some jazz", "scenario": "music", "id": 2},
        {"review": "will it rain today", "scenario": "weather", "id": 3}]
TOPIC = pl.TaskTemplate("topic", "<|VIRTUAL_PROMPT_0|> {text} => {category}", 3, answer_field="category",
                        metric="classification", labels=["alarm", "music", "weather"], max_new_tokens=2)
COLUMNS = {"text": "review", "category": "scenario"}


def write(path, rows):
    kind = path.suffix
    if kind == ".csv":
        path.write_text("review,scenario,id\n" + "".join(f"{r['review']},{r['scenario']},{r['id']}\n" for r in rows))
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_files_of_each_format_map_columns_to_fields(tmp_path, suffix):
    path = write(tmp_path / f"data{suffix}", ROWS)
    records = records_from(path, "topic", columns=COLUMNS, template=TOPIC)
    assert [(r["taskname"], r["text"], r["category"]) for r in records] == [
        ("topic", r["review"], r["scenario"]) for r in ROWS]
    assert all("review" not in r and r["id"] in (1, 2, 3) for r in records)  # renamed away; others kept


def test_missing_columns_are_named(tmp_path):
    path = write(tmp_path / "data.csv", ROWS)
    with pytest.raises(pl.DataError, match=r"data.csv: no column\(s\) \['label'\] for task 'topic'; the columns are"):
        records_from(path, "topic", columns={"category": "label", "text": "review"})
    with pytest.raises(pl.DataError, match=r"no column\(s\) \['category', 'text'\]"):
        records_from(path, "topic", template=TOPIC)  # without a mapping the fields must be columns
    with pytest.raises(pl.DataError, match="unknown data format '.xml'"):
        records_from(tmp_path / "data.xml", "topic")
    with pytest.raises(pl.DataError, match="no such data file"):
        records_from(tmp_path / "missing.csv", "topic")


def test_data_argument_syntax(tmp_path):
    assert parse_data_argument("train.csv:text=review,category=scenario") == (
        "train.csv", {"text": "review", "category": "scenario"})
    assert parse_data_argument("data/train.jsonl") == ("data/train.jsonl", {})
    with pytest.raises(pl.DataError, match="expected PATH:field=column"):
        parse_data_argument("train.csv:text=review,oops")


def test_trainer_evaluate_and_generate_take_a_dataset(tiny_base):
    data = datasets.Dataset.from_list(records_from(ROWS, "topic", columns=COLUMNS))
    torch.manual_seed(0)
    model = pl.PromptLearningModel(tiny_base, {"topic": TOPIC})
    model.add_prompt_tuning("topic")
    history = pl.Trainer(model, data, data, pl.TrainConfig(max_steps=2, batch_size=2, eval_every=0,
                                                           progress=False)).fit()
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    as_list = [dict(r) for r in data]
    assert model.generate(data, max_new_tokens=2) == model.generate(as_list, max_new_tokens=2)
    scored = evaluate(model, data)["topic"]
    assert scored["n"] == 3 and "ranked_accuracy" in scored


def test_prepare_dataset_returns_a_dataset_dict(tmp_path):
    splits = prepare_dataset("sentiment", tmp_path / "s", source="samples", progress=False, as_dataset=True)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].column_names == ["taskname", "sentence", "label"]
    on_disk = [json.loads(line) for line in (tmp_path / "s" / "train.jsonl").read_text().splitlines()]
    assert [dict(r) for r in splits["train"]] == on_disk
