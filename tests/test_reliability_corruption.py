"""Corrupt prompt tables and checkpoints: every seeded corruption is refused with promptlab's own error.

Each file gets well over 100 corruptions: truncations at random lengths, random bytes XOR-ed into the
header (length prefix and JSON) and into the tensor data, and hand-made ones (wrong shapes and dtypes,
extra and missing keys, metadata of another base model, garbage or mistyped JSON metadata). Loading runs
in this process, so a crash would take pytest down; a load that succeeds would hand back tensors that
differ from what was saved, so none may succeed. A refused checkpoint must leave the model and its
optimizer exactly as they were.
"""
from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest
import torch

import promptlab as pl
from promptlab.checkpoint import load_checkpoint
from promptlab.errors import CheckpointError, PromptTableError
from promptlab.io import load_safetensors, save_safetensors, tensor_sha256

SEED = 1729
N_RANDOM = 40  # of each random kind (truncation, header byte, data byte) per file


# --------------------------------------------------------------------------------------------- helpers
def split(raw: bytes) -> tuple[int, int]:
    """(end of the meaningful header JSON, start of the data): the header's trailing padding excluded."""
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + len(raw[8 : 8 + n].rstrip(b" ")), 8 + n


def xor_at(raw: bytes, index: int, value: int) -> bytes:
    data = bytearray(raw)
    data[index] ^= value
    return bytes(data)


def random_corruptions(raw: bytes, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    header_end, data_start = split(raw)
    out = []
    for _ in range(N_RANDOM):
        cut = rng.randrange(0, len(raw))
        out.append((f"truncated to {cut} of {len(raw)} bytes", raw[:cut]))
    for _ in range(N_RANDOM):
        at, value = rng.randrange(0, header_end), rng.randrange(1, 256)
        out.append((f"header byte {at} ^ {value:#04x}", xor_at(raw, at, value)))
    for _ in range(N_RANDOM):
        at, value = rng.randrange(data_start, len(raw)), rng.randrange(1, 256)
        out.append((f"data byte {at} ^ {value:#04x}", xor_at(raw, at, value)))
    out.append(("appended garbage", raw + b"\x00garbage"))
    out.append(("empty file", b""))
    return out


def raw_safetensors(header: object, data: bytes = b"") -> bytes:
    """A file with any header at all, built by hand (not via safetensors, which would refuse it)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def assert_refused(load, error, path, cases, expect_words=None) -> int:
    """Load every case; each must raise ``error`` naming the file. Returns how many were refused."""
    refused = 0
    for label, raw in cases:
        path.write_bytes(raw)
        with pytest.raises(error) as info:
            load(path)
        message = str(info.value)
        assert str(path) in message, (label, message)
        assert len(message) > len(str(path)) + 15, (label, message)  # says what is wrong, not just where
        if expect_words and label in expect_words:
            assert expect_words[label] in message, (label, message)
        refused += 1
    return refused


# ----------------------------------------------------------------------------------------- prompt table
@pytest.fixture(scope="module")
def table_file(tiny_base, tmp_path_factory):
    tasks = pl.default_tasks()
    gen = torch.Generator().manual_seed(SEED)
    table = pl.PromptTable.for_base(tiny_base)
    table.add("sentiment", torch.randn(10, tiny_base.hidden_size, generator=gen), tasks["sentiment"], "prompt_tuning")
    table.add("intent_and_slot", torch.randn(10, tiny_base.hidden_size, generator=gen), tasks["intent_and_slot"],
              "p_tuning")
    path = tmp_path_factory.mktemp("table") / "prompts.safetensors"
    table.save(path)
    return path, table


def table_variants(path, table, tiny_base, tiny_gpt2_base) -> list[tuple[str, bytes]]:
    """Hand-made bad tables: valid safetensors whose content is wrong, checksums recomputed where needed."""
    tensors, raw_meta = load_safetensors(path, PromptTableError)
    meta = json.loads(raw_meta["promptlab"])
    scratch = path.with_name("scratch.safetensors")

    def build(change_tensors=None, change_meta=None, resum=True, meta_text=None) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        m = json.loads(json.dumps(meta))
        if change_tensors:
            change_tensors(t)
        if change_meta:
            change_meta(m)
        if resum and isinstance(m.get("tasks"), dict):  # a careful forger: sha256 match the changed tensors
            for name, info in m["tasks"].items():
                if name in t and isinstance(info, dict):
                    info["sha256"] = tensor_sha256(t[name])
        text = meta_text if meta_text is not None else json.dumps(m, sort_keys=True)
        save_safetensors(scratch, t, {"promptlab": text, "promptlab_sha256": sha(text)})
        return scratch.read_bytes()

    def setitem(key, value):
        return lambda t: t.__setitem__(key, value)

    def task_meta(key, value):
        return lambda m: m["tasks"]["sentiment"].__setitem__(key, value)

    good = tensors["sentiment"]
    other_fp = tiny_gpt2_base.fingerprint
    return [
        ("shape: one more row", build(setitem("sentiment", torch.zeros(11, 64)))),
        ("shape: narrower", build(setitem("sentiment", torch.zeros(10, 32)))),
        ("shape: 1-D", build(setitem("sentiment", torch.zeros(640)))),
        ("shape: 3-D", build(setitem("sentiment", torch.zeros(1, 10, 64)))),
        ("dtype float16", build(setitem("sentiment", good.half()))),
        ("dtype float64", build(setitem("sentiment", good.double()))),
        ("dtype bfloat16", build(setitem("sentiment", good.bfloat16()))),
        ("dtype int32", build(setitem("sentiment", good.int()))),
        ("changed data, sha256 kept", build(setitem("sentiment", good + 1e-6), resum=False)),
        ("extra tensor", build(setitem("stray", torch.zeros(10, 64)))),
        ("missing tensor", build(lambda t: t.pop("intent_and_slot"))),
        ("missing task metadata", build(change_meta=lambda m: m["tasks"].pop("intent_and_slot"))),
        ("another base model", build(change_meta=lambda m: m.update(base_model="tiny-gpt2", fingerprint=other_fp))),
        ("another hidden size", build(change_meta=lambda m: m.update(hidden_size=32))),
        ("garbage JSON metadata", build(meta_text="{'not': json,")),
        ("JSON metadata not an object", build(meta_text="[1, 2, 3]")),
        ("wrong format", build(change_meta=lambda m: m.update(format="promptlab.prompt_table.v0"))),
        ("hidden size as text", build(change_meta=lambda m: m.update(hidden_size="64"))),
        ("tasks as a list", build(change_meta=lambda m: m.update(tasks=list(m["tasks"].values())))),
        ("task entry not a mapping", build(change_meta=lambda m: m["tasks"].update(sentiment="prompt_tuning"))),
        ("template garbage", build(change_meta=task_meta("template", {"prompt_template": "{oops"}))),
        ("template with unbalanced brace", build(change_meta=lambda m: m["tasks"]["sentiment"]["template"].update(
            prompt_template="<|VIRTUAL_PROMPT_0|> {sentence sentiment: {label}"))),
        ("template for another task", build(change_meta=lambda m: m["tasks"]["sentiment"].update(
            template=m["tasks"]["intent_and_slot"]["template"]))),
        ("unknown method", build(change_meta=task_meta("method", "lora"))),
        ("sha256 missing", build(change_meta=lambda m: m["tasks"]["sentiment"].pop("sha256"), resum=False)),
        ("metadata sha256 missing", _without_meta_key(scratch, tensors, raw_meta, "promptlab_sha256")),
        ("no promptlab metadata", _without_meta_key(scratch, tensors, raw_meta, "promptlab")),
        ("metadata value not a string", raw_safetensors({"__metadata__": {"promptlab": 5}})),
        ("header a JSON list", raw_safetensors([1, 2])),
        ("header length past the end", struct.pack("<Q", 10**6) + b"{}"),
        ("header length huge", struct.pack("<Q", 2**63) + b"{}"),
        ("unknown dtype", raw_safetensors({"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16))),
        ("negative shape", raw_safetensors({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))),
        ("overlapping tensors", raw_safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                 "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                                bytes(12))),
    ]


def _without_meta_key(scratch, tensors, raw_meta, key) -> bytes:
    save_safetensors(scratch, tensors, {k: v for k, v in raw_meta.items() if k != key})
    return scratch.read_bytes()


TABLE_WORDS = {
    "dtype float16": "expected float32",
    "changed data, sha256 kept": "sha256",
    "extra tensor": "unknown keys ['stray']",
    "missing tensor": "missing ['intent_and_slot']",
    "another base model": "fingerprint differs",
    "another hidden size": "hidden size 32",
    "garbage JSON metadata": "not valid JSON",
    "unknown method": "method",
    "no promptlab metadata": "not a prompt table",
    "metadata sha256 missing": "sha256",
}


def test_corrupt_prompt_tables_are_all_refused(table_file, tiny_base, tiny_gpt2_base, tmp_path):
    path, table = table_file
    raw = path.read_bytes()
    loaded = pl.PromptTable.load(path, base=tiny_base)  # the pristine file loads, bit for bit
    assert all(torch.equal(loaded[t], table[t]) for t in table)

    bad = tmp_path / "bad.safetensors"
    cases = random_corruptions(raw, SEED) + table_variants(path, table, tiny_base, tiny_gpt2_base)
    refused = assert_refused(lambda p: pl.PromptTable.load(p, base=tiny_base), PromptTableError, bad, cases,
                             TABLE_WORDS)
    assert refused == len(cases) >= 150
    print(f"\n{refused} prompt-table corruptions refused")


# ------------------------------------------------------------------------------------------ checkpoints
RECORDS = ([{"taskname": "sentiment", "sentence": f"Operating profit rose {i} percent.", "label": "positive"}
            for i in range(6)]
           + [{"taskname": "intent_and_slot", "utterance": f"wake me up at {i} am",
               "label": f"Intent: alarm_set\nSlots: time({i} am)"} for i in range(6)])


def make_trainer(base, out):
    torch.manual_seed(SEED)
    model = pl.PromptLearningModel(base, pl.default_tasks(), max_seq_length=64)
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
    model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=8, num_layers=1, init="vocab")
    config = pl.TrainConfig(max_steps=2, batch_size=4, checkpoint_every=1, eval_every=0, output_dir=str(out),
                            progress=False, seed=SEED, max_seq_length=64)
    return pl.Trainer(model, RECORDS, None, config)


@pytest.fixture(scope="module")
def checkpoint_file(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    trainer = make_trainer(tiny_base, out)
    trainer.fit()
    # best prompts are part of a checkpoint too
    trainer.state.best_params = {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}
    trainer.state.best_step, trainer.state.best_score = 2, -1.25
    trainer.save_checkpoint()
    return trainer.checkpoint_path, trainer


def snapshot(trainer):
    params = {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}
    optim = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in trainer.optimizer.state_dict()["state"].items()}
    return params, optim


def assert_unchanged(trainer, before) -> None:
    params, optim = snapshot(trainer)
    assert params.keys() == before[0].keys() and all(torch.equal(params[k], before[0][k]) for k in params)
    assert optim.keys() == before[1].keys()
    for i in optim:
        assert optim[i].keys() == before[1][i].keys()
        assert all(torch.equal(optim[i][k], before[1][i][k]) for k in optim[i])


def checkpoint_variants(path, tiny_gpt2_base) -> list[tuple[str, bytes]]:
    tensors, raw_meta = load_safetensors(path, CheckpointError)
    key = "promptlab_checkpoint"
    meta = json.loads(raw_meta[key])
    scratch = path.with_name("scratch.safetensors")
    param = next(k for k in tensors if k.startswith("model/prompt_embeddings."))
    slot = next(k for k in tensors if k.startswith("optim/") and k.endswith("/exp_avg"))

    def build(change_tensors=None, change_meta=None, resum=True, meta_text=None) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        m = json.loads(json.dumps(meta))
        if change_tensors:
            change_tensors(t)
        if change_meta:
            change_meta(m)
        if resum and isinstance(m.get("sha256"), dict):  # a careful forger keeps the checksums consistent
            m["sha256"] = {k: tensor_sha256(v) for k, v in t.items()}
        text = meta_text if meta_text is not None else json.dumps(m)
        extra = {k: v for k, v in raw_meta.items() if k != key}
        if f"{key}_sha256" in extra:
            extra[f"{key}_sha256"] = sha(text)
        save_safetensors(scratch, t, {key: text, **extra})
        return scratch.read_bytes()

    def setitem(name, value):
        return lambda t: t.__setitem__(name, value)

    def pop(name):
        return lambda t: t.pop(name)

    def update(**kw):
        return lambda m: m.update(kw)

    p, s = tensors[param], tensors[slot]
    return [
        ("parameter shape", build(setitem(param, torch.zeros(p.shape[0] + 1, p.shape[1])))),
        ("parameter dtype", build(setitem(param, p.double()))),
        ("parameter changed, sha256 kept", build(setitem(param, p + 1e-3), resum=False)),
        ("optimizer slot shape", build(setitem(slot, torch.zeros(3)))),
        ("optimizer slot dtype", build(setitem(slot, s.half()))),
        ("optimizer state of no parameter", build(setitem("optim/99/exp_avg", torch.zeros(2)))),
        ("optimizer slot missing", build(pop(slot), resum=False)),
        ("parameter missing", build(pop(param), resum=False)),
        ("extra tensor", build(setitem("model/stray", torch.zeros(2)), resum=False)),
        ("rng state dtype", build(setitem("rng/torch", torch.zeros(10)))),
        ("rng state size", build(setitem("rng/torch", torch.zeros(10, dtype=torch.uint8)))),
        ("another base model", build(change_meta=lambda m: m["spec"].update(
            base_fingerprint=tiny_gpt2_base.fingerprint))),
        ("another config", build(change_meta=lambda m: m["config"].update(lr=1.0))),
        ("other trainable tasks", build(change_meta=lambda m: m["spec"].update(prompt_tuning=["squad"]))),
        ("garbage JSON metadata", build(meta_text="{garbage")),
        ("JSON metadata not an object", build(meta_text='"checkpoint"')),
        ("wrong format", build(change_meta=update(format="promptlab.checkpoint.v0"))),
        ("step as text", build(change_meta=update(step="2"))),
        ("negative step", build(change_meta=update(step=-1))),
        ("history not a list", build(change_meta=update(history={"step": 1}))),
        ("best score as text", build(change_meta=update(best_score="high"))),
        ("param groups garbage", build(change_meta=update(param_groups="adam"))),
        ("param groups wrong count", build(change_meta=lambda m: m.update(param_groups=m["param_groups"][:1]))),
        ("checksums missing", build(change_meta=lambda m: m.pop("sha256", None), resum=False)),
        ("metadata changed, its sha256 kept", _meta_edited(scratch, tensors, raw_meta, key)),
        ("no checkpoint metadata", _only_tensors(scratch, tensors)),
        ("a prompt table instead", b""),  # filled in by the test (needs a table file)
    ]


def _meta_edited(scratch, tensors, raw_meta, key) -> bytes:
    text = raw_meta[key].replace('"step": 2', '"step": 1')
    assert text != raw_meta[key]
    save_safetensors(scratch, tensors, {**raw_meta, key: text})
    return scratch.read_bytes()


def _only_tensors(scratch, tensors) -> bytes:
    save_safetensors(scratch, tensors, {})
    return scratch.read_bytes()


CHECKPOINT_WORDS = {
    "parameter shape": "expected",
    "another base model": "another base model",
    "another config": "other settings (lr)",
    "garbage JSON metadata": "not a promptlab training checkpoint",
    "optimizer state of no parameter": "optimizer state",
    "rng state dtype": "RNG",
    "rng state size": "RNG",
}


def test_corrupt_checkpoints_are_all_refused(checkpoint_file, table_file, tiny_base, tiny_gpt2_base, tmp_path):
    path, saved = checkpoint_file
    raw = path.read_bytes()
    target = make_trainer(tiny_base, tmp_path)
    key = target.config.resume_key()

    sanity = make_trainer(tiny_base, tmp_path)  # the pristine file restores exactly
    state = load_checkpoint(path, sanity.model, sanity.optimizer, key)
    assert state.step == 2 and state.best_step == 2 and state.best_params is not None
    assert snapshot(sanity)[0].keys() == snapshot(saved)[0].keys()
    assert_unchanged(sanity, snapshot(saved))

    before = snapshot(target)
    rng_before = torch.get_rng_state()
    cases = random_corruptions(raw, SEED + 1) + checkpoint_variants(path, tiny_gpt2_base)
    cases[-1] = ("a prompt table instead", table_file[0].read_bytes())
    bad = tmp_path / "bad.safetensors"

    def load(p):
        try:
            load_checkpoint(p, target.model, target.optimizer, key)
        finally:
            assert_unchanged(target, before)  # refused means untouched: no half-restored model
            assert torch.equal(torch.get_rng_state(), rng_before)

    refused = assert_refused(load, CheckpointError, bad, cases, CHECKPOINT_WORDS)
    assert refused == len(cases) >= 140
    print(f"\n{refused} checkpoint corruptions refused")


def test_a_refused_checkpoint_does_not_stop_a_fresh_start(checkpoint_file, tiny_base, tmp_path):
    """Resuming from a corrupt checkpoint is an error (never silent); training afresh still works."""
    path, _ = checkpoint_file
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # a flipped bit in the last tensor's data
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(bytes(raw))
    trainer = make_trainer(tiny_base, out)
    with pytest.raises(CheckpointError, match="sha256"):
        trainer.fit(resume=True)
    fresh = make_trainer(tiny_base, out)
    fresh.fit(resume=False)
    assert fresh.state.step == 2
    check = make_trainer(tiny_base, out)
    assert load_checkpoint(out / "checkpoint.safetensors", check.model, check.optimizer,
                           check.config.resume_key()).step == 2
