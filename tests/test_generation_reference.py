"""promptlab's generation against an outside reference: transformers' own `generate`.

For both tiny architectures (Llama-style and GPT-2), a mixed batch (prompt tuning and p-tuning, training
and frozen prompts, 4 to 15 virtual tokens, the split template ``intent_and_slot`` [7, 3]) is embedded the
way promptlab feeds its backbone (`PromptLearningModel.embed` on the left-padded batch) and decoded greedily
by `model.lm.generate(inputs_embeds=..., attention_mask=...)`. promptlab's own loop (packed prompt pass, KV
cache, finished rows dropped) must give the same tokens for every row.

Position ids: promptlab counts positions over real tokens (`PromptLearningModel.position_ids`: cumsum of the
mask - 1, pads at 0). transformers (5.x) `generate` derives them from the 2-D attention mask the same way
(cumsum - 1, pads filled with 0; then +1 per new token) for every model whose forward takes
``position_ids`` - LlamaForCausalLM and GPT2LMHeadModel both do - so the reference is given NO position ids:
the test checks transformers' own handling. GPT-2's absolute position embeddings make a shifted position
change the text, so a disagreement would show.
"""
import pytest
import torch

import promptlab as pl
from promptlab.data.features import collate, encode_records
from test_model import RECORDS  # the mixed records of the equivalence tests

NEW_TOKENS = 10


def mixed_model(base) -> pl.PromptLearningModel:
    """sentiment (10 tokens): prompt tuning, training; intent_and_slot ([7, 3]) + short (4): one LSTM encoder,
    training; squad (15): prompt tuning and lm (3): MLP p-tuning, both frozen into the table."""
    tasks = pl.default_tasks()
    tasks["short"] = pl.TaskTemplate("short", "<|VIRTUAL_PROMPT_0|>Q: {q}\nA: {a}", 4, answer_field="a")
    tasks["lm"] = pl.TaskTemplate("lm", "<|VIRTUAL_PROMPT_0|>{text}", 3)
    torch.manual_seed(0)  # the encoders' weights
    g = torch.Generator().manual_seed(1)
    model = pl.PromptLearningModel(base, tasks)
    model.add_prompt_tuning("sentiment", init="random", generator=g)
    model.add_p_tuning(["intent_and_slot", "short"], encoder="lstm", hidden_size=16, num_layers=1, residual=False,
                       init="random", generator=g)
    model.add_prompt_tuning("squad", init="vocab", generator=g)
    model.add_p_tuning(["lm"], encoder="mlp", hidden_size=16, residual=False, init="random", generator=g)
    model.freeze(["squad", "lm"])
    return model.eval()


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2"])
def fp32_model(request):
    base = pl.load_base_model(request.param, device="cpu", dtype=torch.float32)
    return mixed_model(base)


def reference_tokens(model, records, max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of each record from transformers' `generate` on promptlab's embeddings, cut at EOS."""
    tok = model.tokenizer
    examples, _ = encode_records(records, model.tasks, tok, model.max_seq_length - max_new_tokens,
                                 with_answer=False)
    batch = collate(examples, tok.pad_token_id, padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded: positions matter
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
        # no position_ids: transformers derives them from the mask (see the module docstring)
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # (B, <=N)
    rows = []
    for ids in out.tolist():  # with inputs_embeds only, generate returns the new tokens alone
        rows.append(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids)
    return rows


def promptlab_tokens(model, records, max_new_tokens: int, monkeypatch) -> tuple[list[str], list[list[int]]]:
    """promptlab's texts and, per record, the token ids it decoded (one record per call, so the order is known)."""
    calls = []
    decode = model.tokenizer.decode

    def spy(token_ids, *args, **kwargs):
        calls.append(list(token_ids))
        return decode(token_ids, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(model.tokenizer, "decode", spy)
        texts = model.generate(records, max_new_tokens=max_new_tokens)
        ids = []
        for r in records:
            calls.clear()
            model.generate([r], max_new_tokens=max_new_tokens)
            ids.append(calls[-1])
    return texts, ids


@pytest.mark.parametrize("pack", [True, False], ids=["packed-prompt-pass", "padded-prompt-pass"])
def test_greedy_generation_equals_transformers_generate(fp32_model, pack, monkeypatch):
    model = fp32_model
    model.pack_sequences = pack
    try:
        texts, ours = promptlab_tokens(model, RECORDS, NEW_TOKENS, monkeypatch)
    finally:
        model.pack_sequences = True
    reference = reference_tokens(model, RECORDS, NEW_TOKENS)
    assert ours == reference  # token for token, every row
    assert texts == [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]
    # random weights still give real outputs: no row stops at once, and the rows differ
    assert all(len(ids) > 0 for ids in reference), reference
    assert sum(len(ids) for ids in reference) > len(RECORDS) * NEW_TOKENS // 2
    assert len({tuple(ids) for ids in reference}) >= 4


def test_reference_sees_a_prompt_change(fp32_model):
    """The comparison is not vacuous: the reference's text moves with a task's prompt."""
    model = fp32_model
    before = reference_tokens(model, RECORDS, 4)
    with torch.no_grad():
        model.prompt_embeddings["sentiment"].weight.mul_(-1.0)
    try:
        after = reference_tokens(model, RECORDS, 4)
    finally:
        with torch.no_grad():
            model.prompt_embeddings["sentiment"].weight.mul_(-1.0)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert changed and all(RECORDS[i]["taskname"] == "sentiment" for i in changed), changed
