"""Kills and full disks: training killed with SIGKILL at many seeded points resumes to bit-identical prompts.

One helper process (tests/_kill_worker.py) imports torch and promptlab once and forks a child per run; the
child trains the tiny model with a checkpoint every step, and the helper SIGKILLs it at the chosen moment:
in the middle of a checkpoint write (part of the temporary file written), with the temporary file complete
but not renamed, right after the rename, between an optimizer step and its checkpoint, or at a seeded
random function call of the run, wherever training is. The child stops itself at the chosen point and says
so before it is killed, so no kill depends on timing or on how busy the machine is. Every run after a kill
resumes from what is on disk; the run that finally completes must end with exactly (torch.equal) the
prompts, encoder and history of an uninterrupted run.
"""
from __future__ import annotations

import errno
import json
import os
import random
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import promptlab as pl
from promptlab import io as plio
from promptlab.errors import CheckpointError

WORKER = Path(__file__).with_name("_kill_worker.py")
MAX_STEPS = 5
PAUSE_KILLS = 16  # kills at chosen points (checkpoint writes, optimizer steps)
CALL_KILLS = 8  # kills at seeded random function calls
TABLE_KILLS = 3  # kills while saving a prompt table

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork (POSIX only)")


class Worker:
    """The fork server: one command in, one JSON result out."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        assert self.read(timeout=180) == {"event": "ready"}, self.failure()

    def read(self, timeout: float = 120) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the kill worker did not answer in {timeout} s{self.failure()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the kill worker died{self.failure()}")
        return json.loads(line)

    def failure(self) -> str:
        self.stderr.seek(0)
        return "\n" + self.stderr.read()[-4000:]

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory):
    """The uninterrupted run: final parameters, history, and how many function calls its fit made."""
    out = tmp_path_factory.mktemp("reference")
    result = worker.run(op="train", out=str(out), resume=False, max_steps=MAX_STEPS, count_calls=True)
    assert result["status"] == "ok" and result["calls"] > 1000, result
    params, history = read_final(out)
    assert len(params) > 3 and any(".lstm." in k for k in params)  # prompt tuning and an LSTM encoder
    assert [h["step"] for h in history] == list(range(1, MAX_STEPS + 1))
    return params, history, result["calls"]


def read_final(out: Path):
    tensors, meta = plio.load_safetensors(out / "final.safetensors", AssertionError)
    assert int(meta["step"]) == MAX_STEPS
    return tensors, json.loads(meta["history"])


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint on disk (0: none); it must always be complete and readable."""
    path = out / "checkpoint.safetensors"
    if not path.exists():
        return 0
    _, meta = plio.load_safetensors(path, CheckpointError)  # raises on a torn or partial file
    return json.loads(meta["promptlab_checkpoint"])["step"]


def assert_same_as_reference(out: Path, reference) -> None:
    params, history, _ = reference
    got, got_history = read_final(out)
    assert sorted(got) == sorted(params)
    for name in params:
        assert torch.equal(got[name], params[name]), f"{name} differs from the uninterrupted run"
    assert got_history == history


def expected_step(start: int, plan: dict) -> int:
    """Where the checkpoint must be after a kill at ``plan`` in a run that started from ``start``."""
    if plan["at"] == "optimizer_step":
        return start + plan["nth"] - 1  # the step was taken, its checkpoint not written
    return start + plan["nth"] - (0 if plan["stage"] == "after_replace" else 1)


def test_kills_at_chosen_points_then_resume_bit_identical(worker, reference, tmp_path):
    """Seeded kills inside checkpoint writes and between steps, resumed again and again."""
    rng = random.Random(20240611)
    kills, outcomes, campaigns = 0, [], 0
    out = tmp_path / "run0"
    while kills < PAUSE_KILLS:
        start = checkpoint_step(out)
        remaining = MAX_STEPS - start
        if remaining == 0:  # killed after its last checkpoint: the resume only restores it
            assert worker.run(op="train", out=str(out), resume=True, max_steps=MAX_STEPS) == {"status": "ok"}
            assert_same_as_reference(out, reference)
            campaigns += 1
            out = tmp_path / f"run{campaigns}"
            continue
        nth = rng.randint(1, min(2, remaining))
        kind = rng.choice(["partial", "partial", "before_replace", "after_replace", "optimizer_step"])
        if kind == "optimizer_step":
            plan = {"at": "optimizer_step", "nth": nth}
        else:
            plan = {"at": "write", "nth": nth, "stage": kind, "frac": round(rng.uniform(0.01, 0.99), 3)}
        result = worker.run(op="train", out=str(out), resume=start > 0, max_steps=MAX_STEPS, pause=plan)
        assert result["status"] == "killed", (plan, result, worker.failure())
        kills += 1
        outcomes.append((start, plan, result["where"]))
        assert checkpoint_step(out) == expected_step(start, plan), (start, plan)
        if kind == "partial":  # the kill really landed mid-write: the partial temporary file is there
            written = int(result["where"].split(": ")[1].split(" of ")[0])
            assert written in [p.stat().st_size for p in out.glob(".checkpoint.safetensors.*.tmp")]
    # finish the last campaign with a run that nobody kills
    result = worker.run(op="train", out=str(out), resume=checkpoint_step(out) > 0, max_steps=MAX_STEPS)
    assert result == {"status": "ok"}
    assert_same_as_reference(out, reference)
    assert kills == PAUSE_KILLS
    assert sum(1 for _, plan, _ in outcomes if plan.get("stage") == "partial") >= 4
    assert {plan.get("stage", plan["at"]) for _, plan, _ in outcomes} == {
        "partial", "before_replace", "after_replace", "optimizer_step"}
    print(f"\n{kills} chosen kill points survived in {campaigns + 1} resumed runs")


def test_kills_at_seeded_random_calls_then_resume_bit_identical(worker, reference, tmp_path):
    """SIGKILL at a seeded random function call of the run, wherever training is then (a forward pass, the
    optimizer, a checkpoint write); each kill must leave a checkpoint that resumes exactly."""
    rng = random.Random(7)
    run_calls = reference[2]
    kills, completed, attempts = 0, 0, 0
    out = tmp_path / "calls0"
    while kills < CALL_KILLS:
        attempts += 1
        assert attempts < 4 * CALL_KILLS, "the runs finish before the chosen calls: cannot place the kills"
        before = checkpoint_step(out)
        call = rng.randint(1, int(0.8 * run_calls))
        result = worker.run(op="train", out=str(out), resume=before > 0, max_steps=MAX_STEPS, kill_at_call=call)
        if result["status"] == "killed":
            assert result["where"] == f"call {call}", result
            kills += 1
            assert checkpoint_step(out) >= before  # never goes back, always readable
            continue
        assert result["status"] == "ok" and result["calls"] < call, result  # a resumed run is shorter
        assert_same_as_reference(out, reference)
        completed += 1
        out = tmp_path / f"calls{completed}"
    if checkpoint_step(out) or out.exists():
        assert worker.run(op="train", out=str(out), resume=checkpoint_step(out) > 0,
                          max_steps=MAX_STEPS) == {"status": "ok"}
        assert_same_as_reference(out, reference)
    print(f"\n{kills} kills at random calls survived ({attempts} runs)")


def test_table_save_killed_midway_leaves_the_previous_file(worker, tiny_base, tmp_path):
    path = tmp_path / "prompts.safetensors"
    assert worker.run(op="table", path=str(path), value=1.5) == {"status": "ok"}
    old = pl.PromptTable.load(path, base=tiny_base)["sentiment"]
    assert torch.equal(old, torch.full_like(old, 1.5))
    for stage, frac in (("partial", 0.3), ("partial", 0.97), ("before_replace", 1.0)):
        result = worker.run(op="table", path=str(path), value=2.5,
                            pause={"at": "write", "nth": 1, "stage": stage, "frac": frac})
        assert result["status"] == "killed", result
        assert torch.equal(pl.PromptTable.load(path, base=tiny_base)["sentiment"], old)  # previous, intact
        assert len(list(tmp_path.glob(".prompts.safetensors.*.tmp"))) == 1  # this kill's; the last one's is gone
    result = worker.run(op="table", path=str(path), value=3.5,
                        pause={"at": "write", "nth": 1, "stage": "after_replace"})
    assert result["status"] == "killed"
    new = pl.PromptTable.load(path, base=tiny_base)["sentiment"]  # renamed: the complete new file
    assert torch.equal(new, torch.full_like(new, 3.5))
    # the killed writers' temporary files were removed by the next write of the table (their pids are gone)
    assert list(tmp_path.glob(".prompts.safetensors.*.tmp")) == []
    print(f"\n{TABLE_KILLS + 1} table-save kill points survived")


# ------------------------------------------------------------------------------------------ full disk
def full_disk_after(monkeypatch, fraction: float, from_write: int = 1) -> list:
    """From the ``from_write``-th file on, promptlab.io's writes fail with ENOSPC after ``fraction`` of the bytes."""
    real_os, failures, opened = plio.os, [], []

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: int(len(data) * fraction)])
            failures.append(len(data))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    class OsProxy:
        def __getattr__(self, name):
            return getattr(real_os, name)

        def fdopen(self, *args, **kwargs):
            opened.append(1)
            handle = real_os.fdopen(*args, **kwargs)
            return Full(handle) if len(opened) >= from_write else handle

    monkeypatch.setattr(plio, "os", OsProxy())
    return failures


def test_full_disk_during_table_save(tiny_base, tmp_path, monkeypatch):
    path = tmp_path / "prompts.safetensors"
    template = pl.default_tasks()["sentiment"]
    table = pl.PromptTable.for_base(tiny_base)
    table.add("sentiment", torch.ones(10, tiny_base.hidden_size), template, "prompt_tuning")
    table.save(path)
    good = path.read_bytes()
    table.replace("sentiment", torch.zeros(10, tiny_base.hidden_size), template, "prompt_tuning")
    with monkeypatch.context() as mp:
        failures = full_disk_after(mp, 0.5)
        with pytest.raises(OSError) as info:
            table.save(path)
    assert failures and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)  # says what and where
    assert path.read_bytes() == good and os.listdir(tmp_path) == [path.name]  # old file, no temporary left
    assert torch.equal(pl.PromptTable.load(path, base=tiny_base)["sentiment"], torch.ones(10, tiny_base.hidden_size))


def test_full_disk_during_checkpoint_save(tiny_base, tmp_path, monkeypatch):
    records = [{"taskname": "sentiment", "sentence": f"Sales rose {i} percent.", "label": "positive"}
               for i in range(8)]
    config = pl.TrainConfig(max_steps=2, batch_size=4, checkpoint_every=1, eval_every=0, output_dir=str(tmp_path),
                            progress=False, seed=3)

    def trainer():
        torch.manual_seed(3)
        model = pl.PromptLearningModel(tiny_base, pl.default_tasks())
        model.add_prompt_tuning("sentiment", init_text="Classify the sentiment")
        return pl.Trainer(model, records, None, config)

    path = tmp_path / "checkpoint.safetensors"
    reference = trainer()
    reference.fit()
    expected = {k: v.clone() for k, v in reference.model.trainable_state_dict().items()}
    path.unlink()
    first = trainer()
    with monkeypatch.context() as mp:
        failures = full_disk_after(mp, 0.3, from_write=2)
        with pytest.raises(OSError) as info:
            first.fit()  # step 1 is saved; step 2 trains, then its checkpoint hits the full disk
    assert len(failures) == 1 and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    assert checkpoint_step(tmp_path) == 1  # the previous checkpoint, intact
    second = trainer()  # and it still resumes, to the same result
    second.fit(resume=True)
    assert second.state.step == 2
    got = second.model.trainable_state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
