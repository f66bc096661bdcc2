"""Deep prompt tuning: per-layer key/value prefixes, mixed with the other two methods in one batch.

Everything runs in fp32 on both tiny architectures (Llama-style with grouped KV heads and rotary
positions; GPT-2-style with learned absolute positions), like the equivalence tests of test_model.py.
"""
import hashlib
import json

import pytest
import torch

import promptlab as pl
from promptlab.data.features import collate, encode_records
from promptlab.deep import prefix_from_tokens
from promptlab.io import save_checksummed, tensor_sha256

ATOL = 1e-5  # float32 batch-vs-single noise is ~1e-7; a prompt change moves losses by far more (checked below)

TASKS = {
    "sentiment": pl.TaskTemplate("sentiment", "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", 4,
                                 answer_field="label"),
    "intent": pl.TaskTemplate("intent", "<|VIRTUAL_PROMPT_0|> Predict <|VIRTUAL_PROMPT_1|> :\n{utterance}\n{label}",
                              6, [4, 2], answer_field="label"),
    "qa": pl.TaskTemplate("qa", "Context: {context}\nQuestion: {question}\nAnswer: {answer}", 0, answer_field="answer"),
    "deep_short": pl.TaskTemplate("deep_short", "<|VIRTUAL_PROMPT_0|> {sentence} tone: {label}", 3,
                                  answer_field="label"),
}
RECORDS = [
    {"taskname": "intent", "utterance": "wake me up at six tomorrow", "label": "Intent: alarm_set"},
    {"taskname": "sentiment", "sentence": "Profit rose 12 % in the quarter .", "label": "positive"},
    {"taskname": "qa", "context": "Paris is the capital of France .", "question": "What is Paris ?",
     "answer": "the capital"},
    {"taskname": "deep_short", "sentence": "Sales fell .", "label": "negative"},
    {"taskname": "intent", "utterance": "olly stop", "label": "Intent: general_quirky"},
]


def prompts_only(records):
    answers = {"label", "answer"}
    return [{k: v for k, v in r.items() if k not in answers} for r in records]


def build(base, reparameterize=True):
    """All three methods: prompt tuning (4 tokens), p-tuning (6 tokens in two runs), deep prompts of 8
    and 3 positions, one with and one without the MLP."""
    torch.manual_seed(0)
    model = pl.PromptLearningModel(base, dict(TASKS))
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
    model.add_p_tuning(["intent"], encoder="mlp", hidden_size=16, init_text="Predict the intent")
    model.add_deep_prompt_tuning("qa", num_virtual_tokens=8, reparameterize=reparameterize, hidden_size=16,
                                 init_text="Answer from the context")
    model.add_deep_prompt_tuning("deep_short", reparameterize=False, init="vocab")
    with torch.no_grad():  # move every learned tensor off its init, so a wrong row or layer would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


def loss_batch(model, records):
    examples, _ = encode_records(records, model.tasks, model.tokenizer)
    return collate(examples, model.tokenizer.pad_token_id)


def test_template_markers_leave_the_input_and_set_the_prefix_length(tiny_base):
    model = build(tiny_base)
    assert model.tasks["deep_short"].prompt_template == "{sentence} tone: {label}"
    assert model.tasks["deep_short"].total_virtual_tokens == 0
    assert model.deep_prompts["deep_short"].num_virtual_tokens == 3  # the template's count
    assert model.deep_prompts["qa"].num_virtual_tokens == 8  # given explicitly (no markers)
    layers, width = tiny_base.prefix_shape
    assert model.prefix("qa").shape == (layers, 2, 8, width)
    assert pl.TaskTemplate("t", "<|VIRTUAL_PROMPT_0|> Predict <|VIRTUAL_PROMPT_1|> :\n{x}", 3, [2, 1]) \
        .without_virtual_tokens().prompt_template == "Predict :\n{x}"
    with pytest.raises(pl.ConfigError, match="already being trained"):
        model.add_deep_prompt_tuning("qa", num_virtual_tokens=2)
    with pytest.raises(pl.ConfigError, match="num_virtual_tokens must be a positive integer, got 0"):
        pl.PromptLearningModel(tiny_base, dict(TASKS)).add_deep_prompt_tuning("qa")
    with pytest.raises(pl.ConfigError, match="unknown task 'nope'"):
        model.add_deep_prompt_tuning("nope", num_virtual_tokens=2)


def test_text_init_is_the_models_own_cache_and_real_tokens_continue_after_it(any_base):
    """At step 0 a text-initialised deep prompt is exactly the cache of its text, so the model scores a
    record as if the text stood before it at positions 0..P-1 (the numbering chosen in promptlab.deep)."""
    model = pl.PromptLearningModel(any_base, dict(TASKS))
    text = "Answer from the context"
    ids = any_base.tokenizer(text, add_special_tokens=False)["input_ids"]
    model.add_deep_prompt_tuning("qa", num_virtual_tokens=len(ids), init_text=text)
    torch.testing.assert_close(model.prefix("qa"), prefix_from_tokens(any_base.model, torch.tensor(ids)))
    record = RECORDS[2]
    batch = loss_batch(model, [record])
    labels = batch["labels"][0]
    full = torch.cat([torch.tensor(ids), batch["input_ids"][0]])[None]  # the text, then the record
    with torch.no_grad():
        logits = any_base.model(input_ids=full).logits[0, len(ids):-1]  # predicting the record's tokens
        reference = torch.nn.functional.cross_entropy(logits[labels[1:] != -100], labels[1:][labels[1:] != -100])
        ours = model(batch)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_mixed_batch_of_three_methods_generates_what_each_record_generates_alone(any_base):
    model = build(any_base)
    model.eval()
    records = prompts_only(RECORDS)
    batched = model.generate(records, max_new_tokens=5)
    alone = [model.generate([r], max_new_tokens=5)[0] for r in records]
    assert batched == alone
    assert len(set(batched)) >= 3  # outputs depend on the record
    assert model.generate(records, max_new_tokens=5, batch_size=2) == alone
    model.pack_sequences = False  # the padded prompt pass gives the same text
    assert model.generate(records, max_new_tokens=5) == alone


def test_mixed_batch_per_example_losses_equal_single_runs(any_base):
    model = build(any_base)
    batch = loss_batch(model, RECORDS)
    assert (batch["attention_mask"] == 0).any()
    losses = model(batch, reduction="none")
    alone = torch.stack([model(loss_batch(model, [r]), reduction="none")[0] for r in RECORDS])
    torch.testing.assert_close(losses, alone, atol=ATOL, rtol=1e-5)
    # the tolerance means something: a change of one layer's prefix moves that task's loss beyond it
    with torch.no_grad():
        model.deep_prompts["deep_short"].prefix[-1, 1] += 0.5  # values of the last layer
    changed = model(loss_batch(model, [RECORDS[3]]), reduction="none")[0]
    assert (changed - alone[3]).abs() > 10 * ATOL
    assert torch.equal(model(loss_batch(model, [RECORDS[1]]), reduction="none")[0], alone[1])


def test_gradients_reach_every_deep_parameter_and_nothing_frozen(tiny_base):
    model = build(tiny_base)
    model(loss_batch(model, RECORDS)).backward()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert {k for k in trainable if k.startswith("deep_prompts.")} == {
        "deep_prompts.qa.inputs", "deep_prompts.qa.mlp.0.weight", "deep_prompts.qa.mlp.0.bias",
        "deep_prompts.qa.mlp.2.weight", "deep_prompts.qa.mlp.2.bias", "deep_prompts.deep_short.prefix"}
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, k
        else:
            assert p.grad is None, k
    # the checkpoint filter keeps exactly the learned tensors (and the MLP's fixed starting prefix)
    assert set(model.trainable_state_dict()) == trainable | {"deep_prompts.qa.start"}


def test_freeze_drops_the_mlp_and_keeps_the_output(any_base, tmp_path):
    model = build(any_base)
    model.eval()
    records = prompts_only(RECORDS)
    before = model.generate(records, max_new_tokens=5)
    prefix = model.prefix("qa").detach().clone()
    summary = model.parameter_summary()
    assert "deep_prompt_tuning" in summary and "through an MLP" in summary
    model.freeze()
    assert len(model.deep_prompts) == 0 and model.training_tasks() == []
    entry = model.prompt_table.entry("qa")
    assert entry.method == "deep_prompt_tuning" and entry.num_virtual_tokens == 8
    assert torch.equal(entry.prompt, prefix)
    assert model.generate(records, max_new_tokens=5) == before
    path = tmp_path / "table.safetensors"
    model.prompt_table.save(path)
    loaded = pl.PromptLearningModel(any_base, dict(TASKS), prompt_table=pl.PromptTable.load(path, any_base))
    # a deep task's own template (without markers) comes from the table, not the task file
    assert loaded.tasks["deep_short"].total_virtual_tokens == 0
    with pytest.raises(pl.ConfigError, match="'sentiment'.*10 virtual tokens.*the prompt table's has 4"):
        pl.PromptLearningModel(any_base, pl.default_tasks(), prompt_table=pl.PromptTable.load(path, any_base))
    assert loaded.generate(records, max_new_tokens=5) == before
    row = next(r for r in loaded.parameter_counts() if r["task"] == "qa")
    assert row["method"] == "deep_prompt_tuning" and row["virtual_tokens"] == 8 and row["trainable"] == 0


def test_table_refuses_deep_prompts_of_another_shape(tiny_base, tiny_gpt2_base, tmp_path):
    model = build(tiny_base)
    model.freeze()
    path = tmp_path / "table.safetensors"
    model.prompt_table.save(path)
    with pytest.raises(pl.PromptTableError):
        pl.PromptTable.load(path, tiny_gpt2_base)
    table = pl.PromptTable.for_base(tiny_base)
    layers, width = tiny_base.prefix_shape
    template = TASKS["qa"]
    with pytest.raises(pl.PromptTableError, match=rf"must be \({layers}, 2, P, {width}\)"):
        table.add("qa", torch.zeros(layers + 1, 2, 3, width), template, "deep_prompt_tuning")
    with pytest.raises(pl.PromptTableError, match="must have no virtual-token markers"):
        table.add("sentiment", torch.zeros(layers, 2, 3, width), TASKS["sentiment"], "deep_prompt_tuning")


def test_a_table_written_before_deep_prompts_still_loads(tiny_base, tmp_path):
    """Format v1 (promptlab 0.1): no prefix_shape, and the fingerprint hashed the float32 embeddings."""
    weight = tiny_base.embeddings.weight.detach().float().contiguous()
    legacy = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    prompt = torch.randn(4, tiny_base.hidden_size)
    template = TASKS["sentiment"]
    meta = {"format": "promptlab.prompt_table.v1", "library_version": "0.1.0", "base_model": "tiny",
            "hidden_size": tiny_base.hidden_size, "fingerprint": legacy,
            "tasks": {"sentiment": {"method": "prompt_tuning", "num_virtual_tokens": 4,
                                    "template": template.to_dict(), "sha256": tensor_sha256(prompt)}}}
    path = tmp_path / "old.safetensors"
    save_checksummed(path, {"sentiment": prompt}, "promptlab", json.loads(json.dumps(meta)))
    table = pl.PromptTable.load(path, tiny_base)
    assert torch.equal(table["sentiment"], prompt)
    assert table.prefix_shape == tiny_base.prefix_shape and table.fingerprint == tiny_base.fingerprint  # bound to it
    model = pl.PromptLearningModel(tiny_base, dict(TASKS), prompt_table=table)
    assert model.generate([prompts_only(RECORDS)[1]], max_new_tokens=2)
    table.save(path)  # saved again: the current format, with the base's layers recorded
    assert pl.PromptTable.load(path, tiny_base).prefix_shape == tiny_base.prefix_shape


def test_training_resumes_exactly_with_deep_prompts(tiny_base, tmp_path):
    records = [dict(r) for r in RECORDS for _ in range(3)]
    settings = dict(max_steps=4, batch_size=4, lr=0.05, deep_prompt_lr=0.01, eval_every=0, checkpoint_every=2,
                    progress=False, seed=5, warmup_steps=1)

    def trainer(out):
        return pl.Trainer(build(tiny_base), records, None, pl.TrainConfig(**{**settings, "output_dir": str(out)}))

    straight = trainer(tmp_path / "a")
    straight.fit()

    class Killed(Exception):
        pass

    killed = trainer(tmp_path / "b")
    step = killed.train_step
    killed.train_step = lambda s: (_ for _ in ()).throw(Killed()) if s == 2 else step(s)  # after the step-2 checkpoint
    with pytest.raises(Killed):
        killed.fit()
    resumed = trainer(tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.state.step == 4
    want, got = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(want["deep_prompts.deep_short.prefix"], build(tiny_base).deep_prompts["deep_short"].prefix)


def test_deep_prompts_learn_with_their_own_learning_rate(tiny_base):
    model = build(tiny_base)
    records = [r for r in RECORDS if r["taskname"] in ("qa", "deep_short")] * 4
    trainer = pl.Trainer(model, records, None, pl.TrainConfig(max_steps=12, batch_size=4, eval_every=0,
                                                              deep_prompt_lr=0.3, progress=False))
    assert [g["base_lr"] for g in trainer.optimizer.param_groups] == [pl.TrainConfig().lr, pl.TrainConfig().p_tuning_lr, 0.3]
    history = [h["loss"] for h in trainer.fit() if "loss" in h]
    assert history[-1] < history[0] - 0.3  # 10.83 -> 10.33 on this random model (-0.14 at lr 0.05)


def test_run_yaml_trains_a_deep_prompt(tiny_base, tmp_path):
    from promptlab.pipeline import build_model, load_run_config

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS if r["taskname"] == "qa") + "\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(json.dumps({"tasks": {k: v.to_dict() for k, v in TASKS.items()}}))
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({"model": "tiny", "tasks": "tasks.yaml", "output_dir": "out",
                               "methods": [{"method": "deep_prompt_tuning", "task": "qa", "num_virtual_tokens": 5,
                                            "reparameterize": False}],
                               "data": {"train": ["train.jsonl"]}, "training": {"max_steps": 1}}))
    config = load_run_config(run)
    model = build_model(config, base=tiny_base)
    assert model.method_of("qa") == "deep_prompt_tuning" and model.deep_prompts["qa"].num_virtual_tokens == 5
    bad = json.loads(run.read_text())
    bad["methods"][0]["encoder"] = "lstm"
    run.write_text(json.dumps(bad))
    with pytest.raises(pl.ConfigError, match=r"unknown key\(s\) \['encoder'\] for deep_prompt_tuning"):
        load_run_config(run)


def test_prefix_norms_per_layer_are_plotted(tiny_base):
    from promptlab.viz import plot_prefix_norms, prefix_norms

    model = build(tiny_base)
    prefix = model.prefix("qa").detach()
    norms = prefix_norms(prefix)
    assert norms.shape == (tiny_base.prefix_shape[0], 2)
    torch.testing.assert_close(norms[1, 0], prefix[1, 0].norm(dim=-1).mean())
    fig = plot_prefix_norms({"qa": prefix, "deep_short": model.prefix("deep_short")}, reference={"qa": prefix * 0.5})
    keys_ax, values_ax = fig.axes
    assert len(keys_ax.lines) == 3 and keys_ax.get_title() == "keys" and values_ax.get_title() == "values"
    assert list(keys_ax.lines[0].get_ydata()) == pytest.approx(norms[:, 0].tolist())
    with pytest.raises(ValueError, match=r"\(layers, 2, P, width\)"):
        prefix_norms(torch.zeros(3, 4))
