"""Golden numbers: the first training losses and the first generated token ids, on both tiny architectures.

The tiny models' weights are set by promptlab itself (`promptlab.models._tiny`: one seeded generator, not
transformers' initialisation), so these numbers survive a new transformers version; if one moves, the
maths of training or generation changed. Everything is float32. The values were computed once by this
file: ``python tests/test_golden.py`` prints the current ones (paste them below only after an intended change).
"""
from __future__ import annotations

import random

import pytest
import torch

import promptlab as pl

# Summing in another order (packing off, or 2 threads) moves these losses by <1e-7 relative; a loss near
# ln(vocab) ~ 10.8 then leaves 1e-4 of room, while a step with a wrong update moves it by ~0.1.
RTOL = 1e-5

# first 5 optimizer steps of `golden_run`: prompt tuning (sentiment) + LSTM p-tuning (intent_and_slot)
GOLDEN_LOSSES = {
    "tiny": [10.784672737121582, 10.855565071105957, 10.69058609008789, 10.546092987060547, 10.468003273010254],
    "tiny-gpt2": [10.784597396850586, 11.006300926208496, 10.579670906066895, 10.412518501281738,
                  10.523751258850098],
}
# greedy token ids of `GEN_RECORDS` (one record per call), from the untrained prompts
GOLDEN_TOKENS = {
    "tiny": [[30601, 3180, 29829, 12351, 29451, 12411], [10016, 35638, 21213, 45215, 10199, 29504],
             [33515, 8456, 42500, 34634, 2973, 45976]],
    "tiny-gpt2": [[28769, 9045, 42881, 8172, 45057, 22988], [45324, 18607, 37171, 16883, 20590, 34424],
                  [39276, 42040, 48604, 15705, 45057, 48604]],
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


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
