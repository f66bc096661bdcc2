"""Training loop, schedule, exact resume, checkpoint refusal and atomicity, bad inputs, best prompts.

Everything runs on the tiny random models (CPU, one thread, fixed seeds): a handful of steps each.
"""
from __future__ import annotations

import errno
import math
import os
import random
from pathlib import Path

import pytest
import torch

import promptlab as pl
import promptlab.io as pio
from promptlab.checkpoint import load_checkpoint
from promptlab.errors import CheckpointError, ConfigError, DataError
from promptlab.train import TrainConfig, Trainer, lr_multiplier


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models are far faster on one thread


# ------------------------------------------------------------------------------------------- helpers
SUBJECTS = ["The company", "Net sales", "Operating profit", "The share price", "Revenue", "Demand", "The order book",
            "Earnings per share"]


def sentiment_records(n: int, seed: int) -> list[dict]:
    """A toy task: the label is decided by one word of the sentence."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        verb = "rose" if label == "positive" else "fell"
        out.append({"taskname": "sentiment", "sentence": f"{rng.choice(SUBJECTS)} {verb} this quarter",
                    "label": label})
    return out


def intent_records(n: int) -> list[dict]:
    return [{"taskname": "intent_and_slot", "utterance": f"wake me up at {i % 12 + 1} am",
             "label": f"Intent: alarm_set\nSlots: time({i % 12 + 1} am)"} for i in range(n)]


def make_model(base, tasks, p_tuning: bool = False, init_seed: int = 0, dropout: float = 0.1):
    """Prompt tuning of sentiment; with ``p_tuning`` also an LSTM encoder for intent_and_slot (with dropout,
    so the RNG matters for exact resume)."""
    torch.manual_seed(init_seed)
    model = pl.PromptLearningModel(base, tasks)
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment of this financial news")
    if p_tuning:
        model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=16, num_layers=2, dropout=dropout,
                           init="random", generator=torch.Generator().manual_seed(init_seed))
    return model


def config(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, lr=0.1, p_tuning_lr=0.01, eval_every=0, checkpoint_every=0,
                progress=False, mixed_precision="no", seed=3, warmup_steps=1, eval_max_records=4,
                eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def steps_only(history: list[dict]) -> list[dict]:
    """History without wall-clock times (the only entries that may differ between identical runs)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3g})"


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def interrupt_after_checkpoint(trainer: Trainer, at_step: int) -> None:
    real = trainer.save_checkpoint

    def save_then_stop():
        real()
        if trainer.state.step == at_step:
            raise Interrupted(at_step)

    trainer.save_checkpoint = save_then_stop


# ------------------------------------------------------------------------------------------- learning
def test_loss_goes_down_on_a_learnable_toy_task(tiny_base, tasks):
    train, val = sentiment_records(48, seed=1), sentiment_records(24, seed=2)
    model = make_model(tiny_base, tasks)
    trainer = Trainer(model, train, val, config(max_steps=30, batch_size=8, lr=0.1, eval_max_records=0,
                                                keep_best=False))
    before = trainer.validation_loss()
    history = trainer.fit()
    after = trainer.validation_loss()
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 30
    assert all(math.isfinite(x) for x in losses)
    # held-out loss of the answer tokens (" positive"/" negative" + EOS) drops clearly
    assert after < before - 0.15, (before, after)
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.1, losses
    # the final validation entry reports that same held-out loss
    val_entries = [h for h in history if "val_loss" in h]
    assert val_entries and val_entries[-1]["step"] == 30
    assert val_entries[-1]["val_loss"] == pytest.approx(after, rel=1e-6)


def test_only_prompts_are_trained(tiny_base, tasks):
    model = make_model(tiny_base, tasks, p_tuning=True)
    frozen = {k: v.clone() for k, v in model.lm.state_dict().items()}
    start = trainable(model)
    Trainer(model, sentiment_records(8, 0) + intent_records(8), None, config(max_steps=4, lr=0.5,
                                                                            p_tuning_lr=0.1)).fit()
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, frozen[k]), f"base parameter {k} changed"
    assert all(p.grad is None for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.lm.parameters())
    after = trainable(model)
    changed = [k for k in start if not torch.equal(start[k], after[k])]
    assert "prompt_embeddings.sentiment.weight" in changed
    assert "encoders.encoder0.inputs.intent_and_slot" in changed
    assert any(k.startswith("encoders.encoder0.lstm.") for k in changed)


# ------------------------------------------------------------------------------------------- schedule
def test_lr_multiplier_warmup_then_cosine():
    m = lambda s: lr_multiplier(s, max_steps=110, warmup_steps=10, min_ratio=0.1)  # noqa: E731
    assert m(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert m(4) == pytest.approx(0.5)
    assert m(9) == pytest.approx(1.0)  # warmup ends at the peak
    assert m(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert m(60) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert m(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert m(110) == pytest.approx(0.1)  # the floor at max_steps
    assert m(500) == pytest.approx(0.1)  # and after it
    after_warmup = [m(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert [m(s) for s in range(12)] == [m(s) for s in range(12)]  # a pure function of the step
    assert lr_multiplier(0, max_steps=10, warmup_steps=0, min_ratio=0.0) == pytest.approx(1.0)
    assert lr_multiplier(10, max_steps=10, warmup_steps=0, min_ratio=0.0) == pytest.approx(0.0)


def test_history_lr_follows_the_schedule(tiny_base, tasks):
    model = make_model(tiny_base, tasks)
    cfg = config(max_steps=5, warmup_steps=2, lr=0.2, min_lr_ratio=0.25)
    history = Trainer(model, sentiment_records(8, 0), None, cfg).fit()
    lrs = [h["lr"] for h in history if "loss" in h]
    assert lrs == pytest.approx([0.2 * lr_multiplier(s, 5, 2, 0.25) for s in range(5)])
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("grad_accum,with_val", [(1, True), (2, False)])
def test_interrupted_run_resumes_exactly(tiny_base, tasks, tmp_path, grad_accum, with_val, capsys):
    train = sentiment_records(10, 0) + intent_records(10)
    val = (sentiment_records(3, 9) + intent_records(2)) if with_val else None
    cfg = dict(max_steps=6, grad_accum=grad_accum, checkpoint_every=2, eval_every=2 if with_val else 0,
               group_by_length=False)

    ref_model = make_model(tiny_base, tasks, p_tuning=True)
    ref = Trainer(ref_model, train, val, config(output_dir=str(tmp_path / "ref"), **cfg))
    ref_history = ref.fit()
    ref_final = trainable(ref_model)

    model = make_model(tiny_base, tasks, p_tuning=True)
    first = Trainer(model, train, val, config(output_dir=str(tmp_path / "run"), **cfg))
    interrupt_after_checkpoint(first, at_step=4)
    with pytest.raises(Interrupted):
        first.fit()
    assert first.state.step == 4
    assert not all(torch.equal(v, ref_final[k]) for k, v in trainable(model).items())

    # a fresh process: new model (other init), new Trainer, resume from the file
    fresh = make_model(tiny_base, tasks, p_tuning=True, init_seed=123)
    torch.manual_seed(999)  # whatever the caller's RNG is, the checkpoint's RNG state is restored
    resumed = Trainer(fresh, train, val, config(output_dir=str(tmp_path / "run"), checkpoint_every=3,
                                                **{k: v for k, v in cfg.items() if k != "checkpoint_every"}))
    history = resumed.fit(resume=True)
    assert "resuming at step 4 of 6" in capsys.readouterr().out
    assert_same_params(trainable(fresh), ref_final)
    assert steps_only(history) == steps_only(ref_history)
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert resumed.state.best_step == ref.state.best_step
    assert resumed.state.best_score == ref.state.best_score
    if with_val:
        assert ref.state.best_step is not None

    # resuming a finished run changes nothing
    again = make_model(tiny_base, tasks, p_tuning=True, init_seed=5)
    done = Trainer(again, train, val, config(output_dir=str(tmp_path / "ref"), **cfg))
    assert steps_only(done.fit(resume=True)) == steps_only(ref_history)
    assert_same_params(trainable(again), ref_final)


def test_checkpoint_restores_optimizer_and_rng_not_just_prompts(tiny_base, tasks, tmp_path):
    """Prompts alone are not enough for an exact resume: the Adam moments and the RNG come back too."""
    train = sentiment_records(8, 0) + intent_records(8)
    model = make_model(tiny_base, tasks, p_tuning=True)
    first = Trainer(model, train, None, config(max_steps=4, checkpoint_every=2, output_dir=str(tmp_path)))
    rng_at_save = []
    real = first.save_checkpoint

    def save_then_stop():
        rng_at_save.append(torch.get_rng_state())
        real()
        raise Interrupted(first.state.step)

    first.save_checkpoint = save_then_stop
    with pytest.raises(Interrupted):
        first.fit()

    fresh = make_model(tiny_base, tasks, p_tuning=True, init_seed=5)
    trainer = Trainer(fresh, train, None, config(max_steps=4, output_dir=str(tmp_path)))
    torch.manual_seed(12345)
    state = load_checkpoint(trainer.checkpoint_path, fresh, trainer.optimizer, trainer.config.resume_key())
    assert state.step == 2 and [h["step"] for h in state.history] == [1, 2]
    assert torch.equal(torch.get_rng_state(), rng_at_save[0])
    assert_same_params(trainable(fresh), trainable(model))
    old = [p for g in first.optimizer.param_groups for p in g["params"]]
    new = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(old) == len(new) and sum(1 for p in old if first.optimizer.state[p]) > 0
    for po, pn in zip(old, new):
        saved, loaded = first.optimizer.state[po], trainer.optimizer.state[pn]
        assert set(saved) == set(loaded)
        for k in saved:
            assert torch.equal(torch.as_tensor(saved[k]), torch.as_tensor(loaded[k])), k
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in first.optimizer.param_groups]


# ------------------------------------------------------------------------------------------- refusal
@pytest.fixture
def checkpoint_dir(tiny_base, tasks, tmp_path):
    model = make_model(tiny_base, tasks)
    Trainer(model, sentiment_records(8, 0), None, config(max_steps=2, output_dir=str(tmp_path))).fit()
    assert (tmp_path / "checkpoint.safetensors").is_file()
    return tmp_path


@pytest.mark.parametrize("change,named", [({"lr": 0.2}, "lr"), ({"seed": 4}, "seed"),
                                          ({"max_steps": 8}, "max_steps"), ({"grad_accum": 2}, "grad_accum")])
def test_resume_refuses_another_config(tiny_base, tasks, checkpoint_dir, change, named):
    model = make_model(tiny_base, tasks)
    before = trainable(model)
    trainer = Trainer(model, sentiment_records(8, 0), None, config(**{"max_steps": 2, **change},
                                                                   output_dir=str(checkpoint_dir)))
    with pytest.raises(CheckpointError, match=rf"other settings \({named}\)"):
        trainer.fit(resume=True)
    assert_same_params(trainable(model), before)  # nothing was half-loaded


def test_resume_accepts_changes_that_do_not_affect_the_result(tiny_base, tasks, checkpoint_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "checkpoint.safetensors").write_bytes((checkpoint_dir / "checkpoint.safetensors").read_bytes())
    model = make_model(tiny_base, tasks, init_seed=77)
    trainer = Trainer(model, sentiment_records(8, 0), None,
                      config(max_steps=2, output_dir=str(moved), checkpoint_every=1, eval_batch_size=3))
    trainer.fit(resume=True)
    assert trainer.state.step == 2


def test_resume_refuses_another_base_model(tiny_gpt2_base, tiny_base, tasks, checkpoint_dir):
    assert tiny_gpt2_base.hidden_size == tiny_base.hidden_size  # same shapes: only the fingerprint differs
    model = make_model(tiny_gpt2_base, tasks)
    trainer = Trainer(model, sentiment_records(8, 0), None, config(max_steps=2, output_dir=str(checkpoint_dir)))
    with pytest.raises(CheckpointError, match="another base model"):
        trainer.fit(resume=True)


def test_resume_refuses_other_trainable_tasks(tiny_base, tasks, checkpoint_dir):
    model = make_model(tiny_base, tasks)
    model.add_prompt_tuning("squad")
    trainer = Trainer(model, sentiment_records(8, 0), None, config(max_steps=2, output_dir=str(checkpoint_dir)))
    with pytest.raises(CheckpointError, match="trainable tasks"):
        trainer.fit(resume=True)


def test_resume_refuses_another_method(tiny_base, tasks, checkpoint_dir):
    model = pl.PromptLearningModel(tiny_base, tasks)
    model.add_p_tuning("sentiment", hidden_size=16)
    trainer = Trainer(model, sentiment_records(8, 0), None, config(max_steps=2, output_dir=str(checkpoint_dir)))
    with pytest.raises(CheckpointError, match="trainable tasks"):
        trainer.fit(resume=True)


def test_resume_without_checkpoint_starts_fresh_and_says_so(tiny_base, tasks, tmp_path, capsys):
    """A preempted job that always passes --resume, killed before its first checkpoint, starts afresh."""
    model = make_model(tiny_base, tasks)
    trainer = Trainer(model, sentiment_records(8, 0), None, config(output_dir=str(tmp_path / "empty")))
    resumed = trainer.fit(resume=True)
    assert "no checkpoint yet, starting a fresh run" in capsys.readouterr().out
    fresh_model = make_model(tiny_base, tasks)
    fresh = Trainer(fresh_model, sentiment_records(8, 0), None, config(output_dir=str(tmp_path / "other"))).fit()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in fresh]
    no_dir = Trainer(make_model(tiny_base, tasks), sentiment_records(8, 0), None, config(output_dir=None))
    with pytest.raises(ConfigError, match="output_dir"):
        no_dir.fit(resume=True)


def test_resume_refuses_a_truncated_checkpoint(tiny_base, tasks, checkpoint_dir):
    path = checkpoint_dir / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = Trainer(make_model(tiny_base, tasks), sentiment_records(8, 0), None,
                      config(max_steps=2, output_dir=str(checkpoint_dir)))
    with pytest.raises(CheckpointError, match="checkpoint.safetensors"):
        trainer.fit(resume=True)


# ------------------------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_checkpoint_write_keeps_the_previous_one(tiny_base, tasks, tmp_path, monkeypatch, failing):
    train = sentiment_records(8, 0) + intent_records(8)
    cfg = dict(max_steps=3, checkpoint_every=1, output_dir=str(tmp_path))
    path = tmp_path / "checkpoint.safetensors"
    calls, snapshot = [], {}
    real_fsync, real_replace = os.fsync, os.replace

    def check(is_checkpoint_write: bool) -> None:
        if not is_checkpoint_write:
            return
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            snapshot["bytes"] = path.read_bytes()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        check(Path(name).name.startswith(".checkpoint.safetensors.") and name.endswith(".tmp"))
        return real_fsync(fd)

    def fake_replace(src, dst, *a, **kw):
        check(Path(dst).name == "checkpoint.safetensors")
        return real_replace(src, dst, *a, **kw)

    if failing == "fsync":
        if not Path("/proc/self/fd").is_dir():  # pragma: no cover
            pytest.skip("needs /proc to name file descriptors")
        monkeypatch.setattr(pio.os, "fsync", fake_fsync)
    else:
        monkeypatch.setattr(pio.os, "replace", fake_replace)

    model = make_model(tiny_base, tasks, p_tuning=True)
    trainer = Trainer(model, train, None, config(**cfg))
    with pytest.raises(OSError) as info:
        trainer.fit()
    assert info.value.errno == errno.ENOSPC
    assert len(calls) == 2 and trainer.state.step == 2
    assert path.read_bytes() == snapshot["bytes"]  # the first checkpoint, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]  # no temp file left
    monkeypatch.undo()

    # the surviving checkpoint resumes, and the run then ends where an uninterrupted one does
    fresh = make_model(tiny_base, tasks, p_tuning=True, init_seed=42)
    resumed = Trainer(fresh, train, None, config(**cfg))
    resumed.fit(resume=True)
    assert resumed.state.step == 3
    assert [h["step"] for h in resumed.state.history if "loss" in h] == [1, 2, 3]
    ref = make_model(tiny_base, tasks, p_tuning=True)
    Trainer(ref, train, None, config(max_steps=3)).fit()
    assert_same_params(trainable(fresh), trainable(ref))


# ------------------------------------------------------------------------------------------- bad inputs
def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"max_steps": 10, "learning_rate": 0.1})
    cfg = TrainConfig.from_dict({"max_steps": 10, "lr": 0.1, "seed": 5})
    assert (cfg.max_steps, cfg.lr, cfg.seed) == (10, 0.1, 5)


@pytest.mark.parametrize("bad,named", [
    ({"max_steps": 0}, "max_steps"), ({"batch_size": -1}, "batch_size"), ({"grad_accum": 1.5}, "grad_accum"),
    ({"max_seq_length": "512"}, "max_seq_length"), ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"lr": 0}, "learning rates"), ({"p_tuning_lr": -1e-3}, "learning rates"),
    ({"lr": "1e-3"}, "lr"),  # what YAML makes of `lr: 1e-3`
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"eval_every": -5}, "eval_every"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"early_stopping_patience": 0}, "early_stopping_patience"),
    ({"eval_loss_records": 0}, "eval_loss_records"),
])
def test_config_rejects_bad_values(bad, named):
    with pytest.raises(ConfigError, match=named):
        TrainConfig.from_dict(bad)


def test_trainer_rejects_bad_inputs(tiny_base, tasks):
    model = make_model(tiny_base, tasks)
    with pytest.raises(DataError, match="empty"):
        Trainer(model, [], None, config())
    with pytest.raises(ConfigError, match="intent_and_slot"):
        Trainer(model, sentiment_records(4, 0) + intent_records(2), None, config())
    with pytest.raises(DataError, match="max_seq_length"):
        Trainer(model, sentiment_records(4, 0), None, config(max_seq_length=5))
    untrained = pl.PromptLearningModel(tiny_base, tasks)
    with pytest.raises(ConfigError, match="no task to train"):
        Trainer(untrained, sentiment_records(4, 0), None, config())


def test_validation_ignores_records_of_tasks_not_being_trained(tiny_base, tasks):
    """A shared validation file may hold every task; only the trained ones count (intent_and_slot has no
    prompt here at all, so scoring it would crash)."""
    val = sentiment_records(4, 1)
    model = make_model(tiny_base, tasks)
    mixed = Trainer(model, sentiment_records(8, 0), val + intent_records(3), config(max_steps=2, eval_every=1))
    only = Trainer(model, sentiment_records(8, 0), val, config(max_steps=2))
    assert mixed.validation_loss() == only.validation_loss()
    history = mixed.fit()
    evals = [h for h in history if "val/score" in h]
    assert [h["step"] for h in evals] == [1, 2]
    assert not any("intent_and_slot" in k for h in evals for k in h)


def test_validation_loss_on_a_seeded_sample(tiny_base, tasks):
    """eval_loss_records: the loss of a seeded sample across the split, the same records as the metrics' sample
    of that size, and a different loss from the whole split's."""
    from promptlab.evaluate import sample_per_task

    val = sentiment_records(30, 1) + [{"taskname": "sentiment", "sentence": f"Sales {i} were flat", "label": "neutral"}
                                      for i in range(10)]
    model = make_model(tiny_base, tasks)
    train = sentiment_records(8, 0)
    sampled = Trainer(model, train, val, config(eval_loss_records=12, seed=7)).validation_loss()
    drawn = sample_per_task(val, 12, seed=7)
    assert sampled == Trainer(model, train, drawn, config(seed=7)).validation_loss()
    whole = Trainer(model, train, val, config(eval_loss_records=len(val), seed=7)).validation_loss()
    assert sampled != whole
    assert sampled != Trainer(model, train, val[:12], config(seed=7)).validation_loss()  # not the first records
    trainer = Trainer(model, train, val, config(eval_loss_records=12, eval_max_records=12, seed=7))
    assert trainer._validation_subset(12) == drawn
    assert whole == Trainer(model, train, val, config(seed=7)).validation_loss()  # None: all of them


def test_validation_computes_the_loss_only_when_asked(tiny_base, tasks):
    """By default validations score the metrics only (the loss costs about as much again); eval_loss_records
    adds the loss without changing what is picked; with no metrics the loss is computed and picks."""
    train, val = sentiment_records(16, 1), sentiment_records(8, 2)
    histories = {}
    for name, settings in (("default", {}), ("loss", {"eval_loss_records": 8}),
                           ("no metrics", {"eval_max_records": 0})):
        torch.manual_seed(0)
        model = make_model(tiny_base, tasks)
        trainer = Trainer(model, train, val, config(max_steps=4, eval_every=2, **settings))
        histories[name] = [h for h in trainer.fit() if "val/score" in h]
        assert [h["step"] for h in histories[name]] == [2, 4]
    assert all("val_loss" not in h for h in histories["default"])
    assert all("val_loss" in h for h in histories["loss"] + histories["no metrics"])
    assert [h["val/score"] for h in histories["default"]] == [h["val/score"] for h in histories["loss"]]
    assert [h["val/score"] for h in histories["no metrics"]] == [-h["val_loss"] for h in histories["no metrics"]]


# ------------------------------------------------------------------------------------------- best prompts
def test_keep_best_restores_the_best_validation(tiny_base, tasks):
    train, val = sentiment_records(16, 1), sentiment_records(8, 2)
    # score = -validation loss (no generation metrics); the losses are scripted so the best is at step 4,
    # and the prompts each validation saw are recorded
    scripted = [5.0, 3.0, 4.0, 2.5, 6.0, 2.6, 7.0, 8.0]

    def run(keep_best: bool):
        model = make_model(tiny_base, tasks)
        trainer = Trainer(model, train, val, config(max_steps=8, eval_every=1, eval_max_records=0, lr=0.5,
                                                    keep_best=keep_best))
        seen = []

        def validation_loss():
            seen.append(trainable(model))
            return scripted[len(seen) - 1]

        trainer.validation_loss = validation_loss
        return model, trainer, trainer.fit(), seen

    model, trainer, history, seen = run(keep_best=True)
    evals = [h for h in history if "val/score" in h]
    assert [(h["step"], h["val/score"]) for h in evals] == [(i + 1, -x) for i, x in enumerate(scripted)]
    assert trainer.state.best_step == 4 and trainer.state.best_score == -2.5
    assert_same_params(trainer.state.best_params, seen[3])
    assert_same_params(trainable(model), seen[3])  # restored: the prompts of step 4, not of step 8
    assert not torch.equal(seen[3]["prompt_embeddings.sentiment.weight"], seen[7]["prompt_embeddings.sentiment.weight"])

    # the same run without keep_best ends on the last prompts
    other, last, _, other_seen = run(keep_best=False)
    assert last.state.best_step == 4
    assert_same_params(trainable(other), other_seen[7])
    assert_same_params(other_seen[3], seen[3])


def test_early_stopping_stops_when_validation_cannot_improve(tiny_base, tasks, tmp_path):
    train, val = sentiment_records(16, 1), sentiment_records(4, 2)
    model = make_model(tiny_base, tasks)
    # a vanishing lr: the generated answers (and their accuracy) never change
    trainer = Trainer(model, train, val, config(max_steps=20, eval_every=1, lr=1e-12, early_stopping_patience=2,
                                                checkpoint_every=0, output_dir=str(tmp_path)))
    history = trainer.fit()
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3]  # best at 1, then 2 validations without improvement
    assert trainer.state.best_step == 1 and trainer.state.evals_without_improvement == 2
    assert any("val/sentiment/accuracy" in h for h in history)
    # the stop wrote a checkpoint of where it stopped
    state = load_checkpoint(trainer.checkpoint_path, make_model(tiny_base, tasks), trainer.optimizer,
                            trainer.config.resume_key())
    assert state.step == 3

    # resuming the stopped run does not train on: it stopped for good, like a run that reached max_steps
    fresh = make_model(tiny_base, tasks, init_seed=8)
    again = Trainer(fresh, train, val, config(max_steps=20, eval_every=1, lr=1e-12, early_stopping_patience=2,
                                              checkpoint_every=0, output_dir=str(tmp_path)))
    assert steps_only(again.fit(resume=True)) == steps_only(history)
    assert_same_params(trainable(fresh), trainable(model))

    # without patience the same run goes on to max_steps
    endless = Trainer(make_model(tiny_base, tasks), train, val, config(max_steps=5, eval_every=1, lr=1e-12))
    assert [h["step"] for h in endless.fit() if "loss" in h] == [1, 2, 3, 4, 5]


def test_time_budget_sets_the_steps_after_measuring_and_resumes_with_them(tiny_base, tasks, tmp_path, capsys,
                                                                         monkeypatch):
    """max_time: after 3 timed steps the run takes the steps that fit (at most max_steps), the schedule ends
    with them, and a resumed run keeps the budget. Step times are pinned to 1 s to make the test exact."""
    timed = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, step: {**timed(self, step), "seconds": 1.0})
    records = sentiment_records(16, 0)

    def run(out, max_time=6.5):
        return Trainer(make_model(tiny_base, tasks), records, None,
                       config(max_steps=40, max_time=max_time, output_dir=str(tmp_path / out), checkpoint_every=1))

    budgeted = run("a")
    history = [h for h in budgeted.fit() if "loss" in h]
    assert budgeted.state.total_steps == 6 and len(history) == 6
    assert "time budget 6 s at 1.00 s per step: 6 of 40 steps" in capsys.readouterr().out
    # after the budget is known the cosine runs to it: step 5 of 6 is its last point
    assert history[-1]["lr"] == pytest.approx(0.1 * lr_multiplier(5, 6, 1, 0.1))
    resumed = run("a")
    resumed.fit(resume=True)
    assert resumed.state.total_steps == 6 and resumed.state.step == 6  # the budget came back from the checkpoint
    assert [h for h in run("b", max_time=1e-3).fit() if "loss" in h][-1]["step"] == 3  # never fewer than were timed
    long = Trainer(make_model(tiny_base, tasks), records, None, config(max_steps=5, max_time=1e6))
    assert len([h for h in long.fit() if "loss" in h]) == 5 and long.state.total_steps == 5
    with pytest.raises(ConfigError, match="max_time must be a positive number"):
        config(max_time=0)


def test_each_step_records_every_tasks_own_loss(tiny_base, tasks):
    """Tasks trained together get their own loss curves: per step, each task's mean loss per labelled token;
    weighted by their tokens they give the step's loss."""
    model = make_model(tiny_base, tasks, p_tuning=True)
    records = sentiment_records(8, 0) + [
        {"taskname": "intent_and_slot", "utterance": f"wake me at {i}", "label": f"Intent: alarm_set\nSlots: time({i})"}
        for i in range(8)]
    trainer = Trainer(model, records, None, config(max_steps=4, batch_size=8, group_by_length=False))
    for step in [h for h in trainer.fit() if "loss" in h]:
        per_task = step["task_loss"]
        assert set(per_task) <= {"sentiment", "intent_and_slot"} and per_task
        counts = {t: sum(trainer._label_count([i]) for b in trainer._step_batches(step["step"] - 1) for i in b
                         if trainer.examples[i].taskname == t) for t in per_task}
        assert sum(per_task[t] * counts[t] for t in per_task) / sum(counts.values()) == pytest.approx(step["loss"], rel=1e-5)
