"""Packing: the packed loss and the packed generation prompt compute exactly what the padded rows compute.

`PromptLearningModel.pack_sequences` (on by default) repacks each batch without padding, storing the
prefixes that rows of one task share only once. These tests switch it off and on for the same batches.
"""
import pytest
import torch

from promptlab import generation
from promptlab.data.features import collate, encode_records
from promptlab.packing import pack_batch
from promptlab.evaluate import rank_labels
from test_model import RECORDS, build, training_records

ATOL = 1e-5


def loss_batch(model, records):
    examples, _ = encode_records(records, model.tasks, model.tokenizer, 512)
    return collate(examples, model.tokenizer.pad_token_id, padding_side="right")


def shared_prefix_records():
    """The same sentence with each label (as in label ranking), plus other tasks and lengths."""
    sentence = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007."
    rows = [{"taskname": "sentiment", "sentence": sentence, "label": label} for label in ("positive", "neutral", "negative")]
    return rows + training_records()


def grads(model, batch):
    model.zero_grad()
    model(batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plan_stores_shared_prefixes_once_and_maps_every_token_back(tiny_base):
    model = build(tiny_base)
    batch = loss_batch(model, shared_prefix_records())
    plan = pack_batch(batch["input_ids"], batch["virtual_index"], batch["attention_mask"], batch["tasknames"])
    assert plan is not None
    real = int(batch["attention_mask"].sum())
    assert plan.num_slots < real < batch["attention_mask"].numel()  # less than the padded and the real tokens
    # every real position reads, through its packed slot, its own token (or an identical one of a shared prefix)
    flat_ids = batch["input_ids"].reshape(-1)
    mask = batch["attention_mask"].bool()
    b, t = mask.nonzero(as_tuple=True)
    slot = plan.target[b, t]
    source = plan.source.reshape(-1)[slot]
    assert torch.equal(flat_ids[source], batch["input_ids"][b, t])
    assert torch.equal(plan.position_ids.reshape(-1)[slot], t)
    # a slot attends only to earlier slots: the mask is causal inside each packed row
    assert not (plan.attention[:, 0] & ~torch.tril(torch.ones_like(plan.attention[0, 0]))).any()


def test_left_padded_or_single_rows_are_not_packed(tiny_base):
    model = build(tiny_base)
    examples, _ = encode_records(RECORDS, model.tasks, model.tokenizer, 512, with_answer=False)
    left = collate(examples, model.tokenizer.pad_token_id, padding_side="left")
    assert pack_batch(left["input_ids"], left["virtual_index"], left["attention_mask"], left["tasknames"]) is None
    one = loss_batch(model, training_records()[:1])
    assert pack_batch(one["input_ids"], one["virtual_index"], one["attention_mask"], one["tasknames"]) is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_packed_loss_and_gradients_equal_padded_rows(any_base, reduction):
    model = build(any_base)
    batch = loss_batch(model, shared_prefix_records())
    model.pack_sequences = True
    packed = model(batch, reduction=reduction)
    packed_grads = grads(model, batch)
    model.pack_sequences = False
    padded = model(batch, reduction=reduction)
    padded_grads = grads(model, batch)
    torch.testing.assert_close(packed, padded, atol=ATOL, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads  # the training prompts get gradients
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-4)


def test_label_ranking_is_the_same_packed_or_not(tiny_base):
    model = build(tiny_base)
    records = [{"taskname": "sentiment", "sentence": s} for s in
               ("Sales fell.", "The board met on Tuesday.", "Profit doubled, beating forecasts by far.")]
    labels = ["positive", "neutral", "negative"]
    model.pack_sequences = True
    packed = rank_labels(model, records, labels)
    model.pack_sequences = False
    assert rank_labels(model, records, labels) == packed


def test_packed_generation_prompt_gives_the_same_tokens(any_base):
    """Generation's prompt pass packs too; the greedy tokens of a mixed batch equal the padded pass's."""
    model = build(any_base)
    model.eval()
    records = RECORDS + [dict(RECORDS[0]), {"taskname": "lm", "text": "The weather today is"}]  # shared prefixes
    model.pack_sequences = True
    packed = model.generate(records, max_new_tokens=5)
    model.pack_sequences = False
    padded = model.generate(records, max_new_tokens=5)
    assert packed == padded
    assert len(set(packed)) >= 3


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_gpt2_base):
    """Finished rows are dropped from the batch and its cache: the rest decode exactly as they would alone."""
    model = build(tiny_gpt2_base)
    model.eval()
    alone = [model.generate([r], max_new_tokens=8)[0] for r in RECORDS]
    stops = sorted({text[1:3] for text in alone if len(text) > 3})  # strings that end some rows early
    assert stops
    cut = [model.generate([r], max_new_tokens=8, stop=stops)[0] for r in RECORDS]
    assert model.generate(RECORDS, max_new_tokens=8, stop=stops) == cut
    assert cut != alone  # some rows really stopped early


def test_caches_that_cannot_drop_rows_keep_them_and_ignore_their_tokens(tiny_gpt2_base, monkeypatch):
    model = build(tiny_gpt2_base)
    model.eval()
    alone = [model.generate([r], max_new_tokens=8)[0] for r in RECORDS]
    stops = sorted({text[1:3] for text in alone if len(text) > 3})
    expected = model.generate(RECORDS, max_new_tokens=8, stop=stops)
    original = generation._step

    class NoSelect:  # a cache without batch_select_indices: only forwards the backbone's own cache
        def __init__(self, cache):
            self.cache = cache

    def step(lm, rows=None, **inputs):
        if isinstance(inputs.get("cache"), NoSelect):
            inputs["cache"] = inputs["cache"].cache
        new, hidden = original(lm, rows=rows, **inputs)
        return NoSelect(new), hidden

    monkeypatch.setattr(generation, "_step", step)
    monkeypatch.setattr(generation, "_packed_prompt", lambda *a: None)
    assert model.generate(RECORDS, max_new_tokens=8, stop=stops) == expected
