"""Golden numbers: the first training losses and the first generated token ids, on both tiny architectures.

The tiny models' weights are set by promptlab itself (`promptlab.models._tiny`: one seeded generator, not
transformers' initialisation) and so is their tokenizer (`promptlab.tiny_tokenizer`: merges learnt in plain
Python from the project's own text), so these numbers survive a new transformers or tokenizers version;
if one moves, the maths of training or generation changed. Everything is float32. The values were computed
once by this file: ``python tests/test_golden.py`` prints the current ones (paste them below only after an
intended change).
"""
from __future__ import annotations

import random

import pytest
import torch

import promptlab as pl

pytestmark = pytest.mark.usefixtures("one_thread")  # the goldens were recorded on one thread

# Summing in another order (packing off, or 2 threads) moves these losses by <1e-7 relative; a loss near
# ln(vocab) ~ 7.7 (promptlab's tiny tokenizer: 2,148 tokens) then leaves 8e-5 of room, while a step with a
# wrong update moves it by ~0.1.
RTOL = 1e-5

# first 5 optimizer steps of `golden_run`: prompt tuning (sentiment) + LSTM p-tuning (intent_and_slot)
GOLDEN_LOSSES = {
    "tiny": [7.70673942565918, 7.689732074737549, 7.634243488311768, 7.481912136077881, 7.395925998687744],
    "tiny-gpt2": [7.667015075683594, 7.58840799331665, 7.51646089553833, 7.389122009277344, 7.317471981048584],
}
# greedy token ids of `GEN_RECORDS` (one record per call), from the untrained prompts
GOLDEN_TOKENS = {
    "tiny": [[910, 910, 910, 1301, 1857, 1683], [898, 2091, 116, 999, 1750, 1291],
             [1631, 1028, 910, 968, 1683, 1683]],
    "tiny-gpt2": [[1267, 1273, 1379, 128, 960, 79], [1273, 453, 1964, 1249, 1273, 307],
                  [453, 643, 1933, 1458, 754, 540]],
}
STEPS = 5
NEW_TOKENS = 6
GEN_RECORDS = [
    {"taskname": "sentiment", "sentence": "Net sales rose this quarter"},
    {"taskname": "intent_and_slot", "utterance": "wake me up at 7 am"},
    {"taskname": "sentiment", "sentence": "Operating profit fell"},
]


def golden_records() -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(8):
        label = rng.choice(["positive", "negative"])
        verb = "rose" if label == "positive" else "fell"
        subject = rng.choice(["The company", "Net sales", "Operating profit", "Revenue"])
        out.append({"taskname": "sentiment", "sentence": f"{subject} {verb} this quarter", "label": label})
    out += [{"taskname": "intent_and_slot", "utterance": f"wake me up at {h} am",
             "label": f"Intent: alarm_set\nSlots: time({h} am)"} for h in (5, 6, 7, 8)]
    return out


def golden_model(name: str) -> pl.PromptLearningModel:
    """Both methods, text-initialised prompts; the LSTM's weights from torch's default init under seed 0."""
    base = pl.load_base_model(name, device="cpu", dtype=torch.float32)
    model = pl.PromptLearningModel(base, pl.default_tasks())
    torch.manual_seed(0)
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment of this financial news")
    model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=16, num_layers=1,
                       init_text="Predict the intent and the slots")
    return model


def golden_run(name: str) -> list[float]:
    """The losses of the first ``STEPS`` Trainer steps (batch 4, fp32, one thread)."""
    config = pl.TrainConfig(max_steps=STEPS, batch_size=4, lr=0.1, p_tuning_lr=0.01, warmup_steps=1,
                            eval_every=0, checkpoint_every=0, keep_best=False, progress=False,
                            mixed_precision="no", seed=3)
    history = pl.Trainer(golden_model(name), golden_records(), None, config).fit()
    return [h["loss"] for h in history if "loss" in h]


def golden_tokens(name: str) -> list[list[int]]:
    """Greedy new token ids of each of ``GEN_RECORDS``, generated alone (EOS not included)."""
    model = golden_model(name).eval()
    calls = []
    decode = model.tokenizer.decode

    def spy(ids, *args, **kwargs):  # generation decodes each row's token ids once, at the end
        calls.append(list(ids))
        return decode(ids, *args, **kwargs)

    model.tokenizer.decode = spy
    try:
        out = []
        for record in GEN_RECORDS:
            model.generate([record], max_new_tokens=NEW_TOKENS)
            out.append(calls[-1])
        return out
    finally:
        del model.tokenizer.decode  # back to the class's method


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_golden_first_losses(name):
    losses = golden_run(name)
    assert losses == pytest.approx(GOLDEN_LOSSES[name], rel=RTOL), losses


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_golden_first_generated_tokens(name):
    tokens = golden_tokens(name)
    assert tokens == GOLDEN_TOKENS[name]
    assert all(len(ids) == NEW_TOKENS for ids in tokens)  # random weights, yet no early EOS: a real check


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_tiny_weights_are_promptlabs_own(name):
    """Every parameter comes from `_tiny`'s seeded generator: embedding tables ~ N(0, 0.02), other matrices
    ~ N(0, 1/8), norms 1, biases 0; and loading leaves the caller's random stream alone."""
    state = torch.random.get_rng_state()
    model = pl.load_base_model(name, device="cpu", dtype=torch.float32).model
    assert torch.equal(torch.random.get_rng_state(), state)
    again = pl.load_base_model(name, device="cpu", dtype=torch.float32).model
    for (key, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), key
        if key.endswith("bias"):
            assert not p.any(), key
        elif p.dim() == 1:  # normalisation weights
            assert bool((p == 1).all()), key
        else:
            std = 0.02 if key.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")) else 0.125
            assert abs(p.std().item() / std - 1) < 0.1 and abs(p.mean().item()) < 0.1 * std, key


if __name__ == "__main__":  # print the current values, to paste above after an intended change
    torch.set_num_threads(1)
    for arch in ("tiny", "tiny-gpt2"):
        print(f"{arch!r}: losses {golden_run(arch)!r}")
        print(f"{arch!r}: tokens {golden_tokens(arch)!r}")
