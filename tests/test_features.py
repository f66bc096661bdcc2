"""Records -> token ids, virtual positions and labels; truncation; collation; length-grouped batches."""
import random

import pytest
import torch

import promptlab as pl
from promptlab.data.features import (IGNORE_INDEX, REAL, collate, encode, encode_records, iter_batches,
                                     length_grouped_batches)
from promptlab.errors import DataError

SENT = {"taskname": "sentiment", "sentence": "Profits rose sharply.", "label": "positive"}
INTENT = {"taskname": "intent_and_slot", "utterance": "wake me up at seven",
          "label": "Intent: alarm_set\nSlots: time(seven)"}
SQUAD = {"taskname": "squad", "context": "Paris is the capital of France.", "question": "What is the capital?",
         "answer": "Paris"}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def tok(tiny_base):
    return tiny_base.tokenizer


# ------------------------------------------------------------------------------------------ encode
def test_sentiment_layout_labels_and_eos(tok, tasks):
    ex = encode(SENT, tasks["sentiment"], tok, 512)
    eos = tok.eos_token_id
    assert ex.virtual_index[:10] == list(range(10)) and set(ex.virtual_index[10:]) == {REAL}
    answer = ids(tok, " positive") + [eos]  # the space before {label} moves onto the answer
    assert ex.input_ids[-len(answer):] == answer and ex.input_ids[-1] == eos
    assert ex.labels[-len(answer):] == answer  # answer-only loss: answer tokens plus EOS ...
    assert set(ex.labels[:-len(answer)]) == {IGNORE_INDEX}  # ... and nothing else
    body = ids(tok, " Profits rose sharply.") + ids(tok, " sentiment:")  # " {sentence}": the space moves too
    assert ex.input_ids[10:-len(answer)] == body
    assert len(ex.input_ids) == len(ex.virtual_index) == len(ex.labels) == 10 + len(body) + len(answer)


def test_split_template_puts_virtual_runs_around_the_text(tok, tasks):
    ex = encode(INTENT, tasks["intent_and_slot"], tok, 512)
    between = ids(tok, " Predict intent and slot ")
    assert ex.virtual_index[:7] == list(range(7))
    assert ex.virtual_index[7:7 + len(between)] == [REAL] * len(between)
    assert ex.input_ids[7:7 + len(between)] == between
    second = 7 + len(between)
    assert ex.virtual_index[second:second + 3] == [7, 8, 9]
    assert sum(v != REAL for v in ex.virtual_index) == 10
    answer = ids(tok, INTENT["label"]) + [tok.eos_token_id]
    assert ex.labels[-len(answer):] == answer and set(ex.labels[:-len(answer)]) == {IGNORE_INDEX}


def test_full_loss_labels_every_real_token(tok):
    t = pl.TaskTemplate("all", "<|VIRTUAL_PROMPT_0|> Q: {q} A: {a}", 3, answer_field="a", answer_only_loss=False)
    ex = encode({"taskname": "all", "q": "why", "a": "because"}, t, tok, 512)
    for i, v, label in zip(ex.input_ids, ex.virtual_index, ex.labels):
        assert label == (IGNORE_INDEX if v != REAL else i)
    assert ex.labels[-1] == tok.eos_token_id


def test_language_modelling_template_without_answer_field(tok):
    t = pl.TaskTemplate("lm", "<|VIRTUAL_PROMPT_0|>{text}", 2)
    ex = encode({"taskname": "lm", "text": "hello world"}, t, tok, 512)
    assert ex.labels == [IGNORE_INDEX] * 2 + ids(tok, "hello world") + [tok.eos_token_id]
    gen = encode({"taskname": "lm", "text": "hello world"}, t, tok, 512, with_answer=False)
    assert gen.input_ids == ex.input_ids[:-1]  # generation continues after the whole text


@pytest.mark.parametrize("record", [SENT, INTENT, SQUAD], ids=lambda r: r["taskname"])
def test_prompt_part_is_tokenized_identically_with_and_without_answer(tok, tasks, record):
    full = encode(record, tasks[record["taskname"]], tok, 512)
    without_answer = {k: v for k, v in record.items() if k not in ("label", "answer")}
    prompt = encode(without_answer, tasks[record["taskname"]], tok, 512, with_answer=False)
    assert full.input_ids[:len(prompt)] == prompt.input_ids
    assert full.virtual_index[:len(prompt)] == prompt.virtual_index
    # the prompt ends exactly where the labelled answer starts: what training saw is what generation feeds
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert len(prompt) == first_label
    assert set(prompt.labels) == {IGNORE_INDEX}


def test_truncate_field_is_cut_from_its_end(tok, tasks):
    context = " ".join(f"word{i}" for i in range(200))
    record = dict(SQUAD, context=context)
    full = encode(record, tasks["squad"], tok, 10_000)
    ex = encode(record, tasks["squad"], tok, 120)
    assert len(ex) == 120 and ex.truncated == len(full) - 120 > 0
    context_ids = ids(tok, " " + context)  # the space before {context} moves onto it
    start = 15 + len(ids(tok, " Context:"))
    kept = len(context_ids) - ex.truncated
    assert ex.input_ids[start:start + kept] == context_ids[:kept]  # the beginning of the context survives
    assert ex.input_ids[start + kept:] == full.input_ids[start + len(context_ids):]  # question and answer intact
    assert ex.labels[start + kept:] == full.labels[start + len(context_ids):]


def test_too_long_without_truncate_field_is_skipped_and_counted(tok, tasks):
    long = dict(SENT, sentence="very " * 200)
    examples, stats = encode_records([SENT, long, INTENT], tasks, tok, max_length=64)
    assert [e.index for e in examples] == [0, 2]
    assert stats.skipped == {"sentiment": 1}
    assert stats.kept == {"sentiment": 1, "intent_and_slot": 1}
    assert stats.truncated == {}
    with pytest.raises(DataError, match=r"records, line 2: task 'sentiment'.*longer than max_length=64"):
        encode_records([SENT, long], tasks, tok, max_length=64, strict=True)


def test_truncation_is_counted(tok, tasks):
    record = dict(SQUAD, context="long " * 300)
    examples, stats = encode_records([record], tasks, tok, max_length=100)
    assert stats.truncated == {"squad": 1} and len(examples[0]) == 100


def test_missing_field_error_names_line_and_field(tok, tasks):
    broken = {"taskname": "sentiment", "sentence": "no label here"}
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: task 'sentiment' needs field 'label'"):
        encode_records([SENT, INTENT, broken], tasks, tok, source="train.jsonl")
    # for generation the answer is not needed
    examples, _ = encode_records([broken], tasks, tok, with_answer=False)
    assert examples[0].labels == [IGNORE_INDEX] * len(examples[0])


def test_unknown_task_error_names_known_tasks(tok, tasks):
    with pytest.raises(DataError) as info:
        encode_records([SENT, {"taskname": "sentimnet", "sentence": "x"}], tasks, tok)
    message = str(info.value)
    assert "line 2" in message and "'sentimnet'" in message
    assert "['intent_and_slot', 'sentiment', 'squad']" in message
    with pytest.raises(DataError, match="no 'taskname'"):
        encode_records([{"sentence": "x"}], tasks, tok)


# ----------------------------------------------------------------------------------------- collate
def examples3(tok, tasks):
    examples, _ = encode_records([SENT, INTENT, SQUAD], tasks, tok)
    return examples


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_with_the_right_values(tok, tasks, side):
    examples = examples3(tok, tasks)
    batch = collate(examples, pad_token_id=tok.pad_token_id, padding_side=side)
    width = max(len(e) for e in examples)
    assert batch["tasknames"] == ["sentiment", "intent_and_slot", "squad"]
    for key in ("input_ids", "attention_mask", "virtual_index", "labels"):
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for row, e in enumerate(examples):
        pad = width - len(e)
        real = slice(0, len(e)) if side == "right" else slice(pad, width)
        pads = slice(len(e), width) if side == "right" else slice(0, pad)
        assert batch["input_ids"][row, real].tolist() == e.input_ids
        assert batch["virtual_index"][row, real].tolist() == e.virtual_index
        assert batch["labels"][row, real].tolist() == e.labels
        assert batch["attention_mask"][row, real].tolist() == [1] * len(e)
        assert batch["attention_mask"][row, pads].tolist() == [0] * pad
        assert batch["input_ids"][row, pads].tolist() == [tok.pad_token_id] * pad
        assert batch["labels"][row, pads].tolist() == [IGNORE_INDEX] * pad
        assert batch["virtual_index"][row, pads].tolist() == [REAL] * pad
    assert (batch["attention_mask"].sum(1) == torch.tensor([len(e) for e in examples])).all()


def test_collate_rejects_a_bad_side(tok, tasks):
    with pytest.raises(ValueError, match="padding_side"):
        collate(examples3(tok, tasks), 0, padding_side="middle")


# -------------------------------------------------------------------------------- batching by length
def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_every_index_once_and_are_seeded():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1003)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=1, group_factor=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=1, group_factor=10)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=2, group_factor=10)
    # far less padding than batching in random order
    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert padding(batches, lengths) < 0.2 * padding(random_batches, lengths)


def test_unshuffled_batches_are_sorted_longest_first():
    lengths = [3, 9, 1, 7, 5]
    assert length_grouped_batches(lengths, batch_size=2, shuffle=False) == [[1, 3], [4, 0], [2]]


def test_iter_batches_yields_indices_with_their_batch(tok, tasks):
    examples = examples3(tok, tasks)
    seen = []
    for idx, batch in iter_batches(examples, batch_size=2, pad_token_id=tok.pad_token_id):
        assert batch["tasknames"] == [examples[i].taskname for i in idx]
        assert batch["attention_mask"].sum(1).tolist() == [len(examples[i]) for i in idx]
        seen += idx
    assert sorted(seen) == [0, 1, 2]
