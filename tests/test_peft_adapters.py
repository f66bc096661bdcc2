"""PEFT adapters out and in (`promptlab.adapters`), checked against PEFT itself on both tiny architectures.

The reference is PEFT's own `PeftModelForCausalLM.forward` (it splices the prompt rows, or builds the prefix
cache and its mask). PEFT 0.21's `generate` is broken under transformers 5 for prompt methods (for prefix
tuning it passes the prefix as ``past_key_values`` next to a fresh ``cache``, and transformers drops the
prefix; for prompt tuning its cached steps drift from its own forward), so the reference text comes from a
greedy loop written here over PEFT's forward, the whole sequence again at every step (no cache to get wrong).
Everything runs in fp32 on CPU; the Llama-style tiny model has 4 attention heads and 2 key/value heads.
"""
import copy
import json

import pytest
import torch

import promptlab as pl
from promptlab.adapters import AdapterError, export_peft, import_peft
from promptlab.data.features import collate, encode_records

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings(  # PEFT's and transformers' own notices about the tiny models
    "ignore:Could not find a config file", "ignore:`past_key_values` is deprecated",
    "ignore:`is_gradient_checkpointing` is deprecated")

NEW_TOKENS = 8
TASKS = {
    "sentiment": pl.TaskTemplate("sentiment", "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", 4,
                                 answer_field="label"),  # prompt tuning
    "lm": pl.TaskTemplate("lm", "<|VIRTUAL_PROMPT_0|><|VIRTUAL_PROMPT_1|>{text}", 5, [3, 2]),  # p-tuning: adjacent runs
    "qa": pl.TaskTemplate("qa", "<|VIRTUAL_PROMPT_0|> Context: {context}\nQuestion: {question}\nAnswer: {answer}", 6,
                          answer_field="answer"),  # deep prompt tuning: markers dropped, P = 6
    "intent": pl.TaskTemplate("intent", "<|VIRTUAL_PROMPT_0|> Predict <|VIRTUAL_PROMPT_1|> :\n{utterance}\n{label}", 6,
                              [4, 2], answer_field="label"),  # two runs: PEFT cannot express it
    "late": pl.TaskTemplate("late", "Q: <|VIRTUAL_PROMPT_0|> {q}", 3),  # one run after text: neither
}
RECORDS = {
    "sentiment": [{"sentence": "Profit rose 12 % in the quarter ."}, {"sentence": "Sales fell ."}],
    "lm": [{"text": "The weather today"}, {"text": "Stocks fell"}],
    "qa": [{"context": "Paris is the capital of France .", "question": "What is Paris ?"},
           {"context": "The cat sat on the mat .", "question": "Where did the cat sit ?"}],
}
PLAIN = [{"text": "The weather today"}, {"text": "Stocks fell sharply"}, {"text": "Once upon a time"}]


def trained(base) -> pl.PromptLearningModel:
    """All three methods, every learned tensor moved off its init (so a wrong row or layer would show), frozen."""
    torch.manual_seed(0)
    model = pl.PromptLearningModel(base, dict(TASKS))
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
    model.add_p_tuning(["lm"], encoder="mlp", hidden_size=16, init="random")
    model.add_deep_prompt_tuning("qa", reparameterize=False, init="vocab")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.add_prompt_tuning("intent", init="vocab")
    model.add_prompt_tuning("late", init="vocab")
    model.freeze()
    return model.eval()


def real_ids(model, record) -> list[int]:
    """promptlab's token ids for a record (prompt part), without its virtual positions."""
    (example,), _ = encode_records([record], model.tasks, model.tokenizer, with_answer=False)
    n = sum(i >= 0 for i in example.virtual_index)
    assert example.virtual_index[:n] == list(range(n))  # the virtual rows open the input, in order
    return example.input_ids[n:]


@torch.no_grad()
def peft_greedy(peft_model, ids: list[int], tokenizer) -> str:
    """Greedy text from PEFT's forward pass (see the module docstring for why not its `generate`)."""
    new: list[int] = []
    for _ in range(NEW_TOKENS):
        x = torch.tensor([ids + new])
        token = int(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def promptlab_logits(model, record) -> torch.Tensor:
    """promptlab's logits over the record's real tokens, (T, vocab)."""
    (example,), _ = encode_records([record], model.tasks, model.tokenizer, with_answer=False)
    batch = model.to_device(collate([example], model.tokenizer.pad_token_id, padding_side="left"))
    real = batch["virtual_index"][0] < 0
    return model.lm.get_output_embeddings()(model.hidden_states(batch))[0, real]


def peft_model_of(base, config):
    """A PEFT model with random prompt weights on a private copy of the base (PEFT wraps the module it gets)."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base.model), config)
    model.peft_config["default"].base_model_name_or_path = base.name  # get_peft_model resets it from the module
    return model.eval()


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("task", ["sentiment", "lm", "qa"])
def test_exported_adapter_gives_peft_the_same_logits_and_text(any_base, task, tmp_path):
    model = trained(any_base)
    export_peft(model.prompt_table, task, tmp_path / task, any_base)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(any_base.model), str(tmp_path / task)).eval()
    records = [{"taskname": task, **r} for r in RECORDS[task]]
    ours = model.generate(records, max_new_tokens=NEW_TOKENS)
    assert ours == [peft_greedy(loaded, real_ids(model, r), model.tokenizer) for r in records]
    v = 0 if task == "qa" else TASKS[task].total_virtual_tokens  # PEFT's prompt-tuning logits include the V rows
    for record in records:
        ids = torch.tensor([real_ids(model, record)])
        with torch.no_grad():
            theirs = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, v:]
            bare = any_base.model(input_ids=ids).logits[0]
        torch.testing.assert_close(promptlab_logits(model, record), theirs, atol=1e-4, rtol=1e-4)
        assert (theirs - bare).abs().max() > 0.1  # the prompt matters, so a misplaced one would show


def test_export_writes_what_peft_save_pretrained_writes(any_base, tmp_path):
    """The same files, tensor key, config keys and sizes as PEFT's own save of the same method (GQA: the tiny
    Llama's prefix has 2 key/value heads of 16, token_dim 32)."""
    model = trained(any_base)
    for task, config in (("sentiment", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
                         ("qa", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))):
        peft_model_of(any_base, config).save_pretrained(tmp_path / f"peft_{task}")
        reference = json.loads((tmp_path / f"peft_{task}" / "adapter_config.json").read_text())
        export_peft(model.prompt_table, task, tmp_path / task, any_base)
        assert {p.name for p in (tmp_path / task).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        ours = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert set(ours) == set(reference) - {"peft_version"}  # PEFT fills in its own version when it loads
        for key in ("peft_type", "task_type", "num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim",
                    "num_transformer_submodules", "inference_mode"):
            assert ours[key] == reference[key], key
        assert ours["base_model_name_or_path"] == any_base.name
        tensors = peft.utils.load_peft_weights(str(tmp_path / task))
        assert set(tensors) == {"prompt_embeddings"}
        assert tensors["prompt_embeddings"].shape == (
            peft.utils.load_peft_weights(str(tmp_path / f"peft_{task}"))["prompt_embeddings"].shape)
        assert type(peft.PeftConfig.from_pretrained(str(tmp_path / task))) is type(config)
    width = any_base.prefix_shape[1]
    assert ours["num_attention_heads"] * 16 == ours["token_dim"] == width  # head size 16 on both tiny models


def test_prefix_layout_is_pefts_per_layer_keys_and_values(any_base, tmp_path):
    """Layer l's keys and values in PEFT's cache are promptlab's prefix[l, 0] and prefix[l, 1], head by head."""
    model = trained(any_base)
    export_peft(model.prompt_table, "qa", tmp_path, any_base)
    cache = peft.PeftModel.from_pretrained(copy.deepcopy(any_base.model), str(tmp_path)).get_prompt(1)
    prefix = model.prompt_table["qa"]  # (L, 2, P, KV)
    layers, kv = any_base.prefix_shape
    for layer in range(layers):
        for kind, got in enumerate((cache.layers[layer].keys, cache.layers[layer].values)):  # (1, H_kv, P, d)
            heads = got.shape[1]
            want = prefix[layer, kind].view(6, heads, kv // heads).transpose(0, 1)  # (P, KV) -> (H_kv, P, d)
            assert torch.equal(got[0], want)


def test_export_then_import_restores_the_entry(any_base, tmp_path):
    model = trained(any_base)
    table = pl.PromptTable.for_base(any_base)
    for task in ("sentiment", "lm", "qa"):
        export_peft(model.prompt_table, task, tmp_path / task, any_base)
        entry = import_peft(tmp_path / task, any_base, table, task)  # template: the one stored in the file
        original = model.prompt_table.entry(task)
        assert torch.equal(entry.prompt, original.prompt)
        assert (entry.method, entry.template) == (original.method, original.template)


@pytest.mark.parametrize("task,why", [("intent", "has 2 runs"), ("late", "one run after text")])
def test_a_template_peft_cannot_express_is_refused(tiny_base, task, why, tmp_path):
    model = trained(tiny_base)
    with pytest.raises(AdapterError, match=f"only at the very start.*{why}"):
        export_peft(model.prompt_table, task, tmp_path, tiny_base)
    assert not (tmp_path / "adapter_config.json").exists()


def test_deep_export_needs_the_base_and_its_table(tiny_base, tiny_gpt2_base, tmp_path):
    model = trained(tiny_base)
    with pytest.raises(AdapterError, match="needs the base model"):
        export_peft(model.prompt_table, "qa", tmp_path)
    with pytest.raises(AdapterError, match="not to the base model 'tiny-gpt2'"):
        export_peft(model.prompt_table, "qa", tmp_path, tiny_gpt2_base)
    export_peft(model.prompt_table, "sentiment", tmp_path)  # an input prompt needs no base
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(tmp_path))
    assert loaded.get_prompt(1).shape == (1, 4, 64)


# ------------------------------------------------------------------------------------------------ import
PEFT_CONFIGS = {
    "prompt_tuning": ("prompt_tuning", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    "p_tuning_mlp": ("p_tuning", lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type="MLP", encoder_hidden_size=16)),
    "p_tuning_lstm": ("p_tuning", lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=16)),
    "prefix": ("deep_prompt_tuning", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    "prefix_projection": ("deep_prompt_tuning", lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16)),
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_imports_and_generates_what_peft_generates(any_base, kind, tmp_path):
    method, make = PEFT_CONFIGS[kind]
    reference = peft_model_of(any_base, make())  # in memory: p-tuning's encoder, prefix tuning's MLP still there
    reference.save_pretrained(tmp_path)
    table = pl.PromptTable.for_base(any_base)
    template = pl.TaskTemplate("x", "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}", 5, answer_field="label")
    entry = import_peft(tmp_path, any_base, table, "imported", template)
    assert entry.method == method
    if method == "deep_prompt_tuning":
        assert entry.template.prompt_template == "{sentence} sentiment: {label}"
    else:  # p-tuning: the encoder's output, computed once
        assert torch.equal(entry.prompt, reference.get_prompt(1)[0])
    model = pl.PromptLearningModel(any_base, {}, prompt_table=table).eval()
    records = [{"taskname": "imported", "sentence": r["sentence"]} for r in RECORDS["sentiment"]] + \
              [{"taskname": "imported", "sentence": r["text"]} for r in PLAIN]
    ours = model.generate(records, max_new_tokens=NEW_TOKENS)
    assert ours == [peft_greedy(reference, real_ids(model, r), model.tokenizer) for r in records]
    assert len(set(ours)) >= 3  # the text depends on the record


def test_default_template_is_plain_continuation(tiny_base, tmp_path):
    peft_model_of(tiny_base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path / "prefix")
    peft_model_of(tiny_base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path / "prompt")
    table = pl.PromptTable.for_base(tiny_base)
    assert import_peft(tmp_path / "prefix", tiny_base, table, "a").template.prompt_template == "{text}"
    entry = import_peft(tmp_path / "prompt", tiny_base, table, "b")
    assert entry.template.prompt_template == "<|VIRTUAL_PROMPT_0|>{text}"
    with pytest.raises(pl.PromptTableError, match="already in the prompt table"):
        import_peft(tmp_path / "prompt", tiny_base, table, "b")
    import_peft(tmp_path / "prompt", tiny_base, table, "b", replace=True)


def test_import_refuses_a_template_peft_cannot_express(tiny_base, tmp_path):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft_model_of(tiny_base, config).save_pretrained(tmp_path)
    table = pl.PromptTable.for_base(tiny_base)
    with pytest.raises(AdapterError, match="one run after text"):
        import_peft(tmp_path, tiny_base, table, "t", pl.TaskTemplate("t", "Q: <|VIRTUAL_PROMPT_0|> {q}", 3))
    with pytest.raises(AdapterError, match="has 3 virtual tokens, the template .* has 4"):
        import_peft(tmp_path, tiny_base, table, "t", pl.TaskTemplate("t", "<|VIRTUAL_PROMPT_0|> {q}", 4))
    assert len(table) == 0


# ------------------------------------------------------------------------------------ another base model
def test_adapter_of_another_base_is_refused(tiny_base, tiny_gpt2_base, tmp_path):
    model = trained(tiny_base)
    gpt2_table = pl.PromptTable.for_base(tiny_gpt2_base)
    for task in ("sentiment", "qa"):  # ours carry the fingerprint: same sizes or not, the embeddings decide
        export_peft(model.prompt_table, task, tmp_path / task, tiny_base)
        with pytest.raises(AdapterError, match="fingerprint differs from 'tiny-gpt2'"):
            import_peft(tmp_path / task, tiny_gpt2_base, gpt2_table, task)
    # PEFT's own files: a prefix of the wrong key/value width ...
    peft_model_of(tiny_base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path / "prefix")
    with pytest.raises(AdapterError, match="token_dim=32, but the base model 'tiny-gpt2' has 64"):
        import_peft(tmp_path / "prefix", tiny_gpt2_base, gpt2_table, "p")
    # ... and input vectors of the same size, told apart by the base model's name only
    peft_model_of(tiny_base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(
        tmp_path / "prompt")
    with pytest.raises(AdapterError, match="made for base model 'tiny', but the base model is 'tiny-gpt2'.*check_name"):
        import_peft(tmp_path / "prompt", tiny_gpt2_base, gpt2_table, "p")
    assert len(gpt2_table) == 0
    with pytest.warns(UserWarning, match="made for base model 'tiny'"):
        import_peft(tmp_path / "prompt", tiny_gpt2_base, gpt2_table, "p", check_name=False)
    with pytest.raises(AdapterError, match="the prompt table belongs to 'tiny-gpt2', not to the base model 'tiny'"):
        import_peft(tmp_path / "prompt", tiny_base, gpt2_table, "q")


def test_an_adapter_without_a_base_name_warns(tiny_base, tmp_path):
    model = peft_model_of(tiny_base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.peft_config["default"].base_model_name_or_path = None
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="does not name its base model; only its sizes were checked"):
        import_peft(tmp_path, tiny_base, pl.PromptTable.for_base(tiny_base), "t")


# ------------------------------------------------------------------------------------ missing and corrupt
def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not a readable JSON adapter config"),
    (lambda d: _edit_config(d, peft_type="LORA"), "peft_type 'LORA' is not one promptlab imports"),
    (lambda d: _edit_config(d, task_type="SEQ_2_SEQ_LM"), "causal LMs"),
    (lambda d: _edit_config(d, num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (lambda d: _edit_config(d, num_virtual_tokens=5), r"shape \(4, 64\), expected \(5, 64\)"),
    (lambda d: _edit_config(d, num_layers=3), "num_layers=3, but the base model 'tiny' has 2"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing$"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "torch.save file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-9]),
     "truncated or corrupt"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 4), "truncated"),
])
def test_missing_or_corrupt_adapter_is_a_clear_error(tiny_base, damage, message, tmp_path):
    export_peft(trained(tiny_base).prompt_table, "sentiment", tmp_path, tiny_base)
    damage(tmp_path)
    table = pl.PromptTable.for_base(tiny_base)
    with pytest.raises(pl.PromptlabError, match=message):
        import_peft(tmp_path, tiny_base, table, "sentiment")
    assert len(table) == 0


def test_wrong_tensor_key_and_missing_directory(tiny_base, tmp_path):
    from safetensors.torch import save_file

    export_peft(trained(tiny_base).prompt_table, "sentiment", tmp_path, tiny_base)
    save_file({"embedding.weight": torch.zeros(4, 64)}, str(tmp_path / "adapter_model.safetensors"))
    table = pl.PromptTable.for_base(tiny_base)
    with pytest.raises(AdapterError, match=r"expected one tensor 'prompt_embeddings', found \['embedding.weight'\]"):
        import_peft(tmp_path, tiny_base, table, "sentiment")
    with pytest.raises(AdapterError, match="no such adapter directory"):
        import_peft(tmp_path / "nope", tiny_base, table, "sentiment")
