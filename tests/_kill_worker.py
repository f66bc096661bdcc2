"""Helper of tests/test_reliability_kill.py (not collected by pytest): a fork server for kill tests.

Started once as ``python tests/_kill_worker.py``, it imports torch and promptlab and builds the tiny base
model and the records (the ~4 s that dominate a fresh process), prints ``{"event": "ready"}``, then reads
one JSON command per line from stdin. Each command forks a *child* that does the real work:

* ``{"op": "train", "out": DIR, "resume": bool, "max_steps": N, "pause": PAUSE, "kill_at_call": C,
  "count_calls": bool}``: build the model from scratch (seeded), ``promptlab.Trainer(...).fit(resume=resume)``
  with a checkpoint every step into DIR, then write the final trainable parameters to
  ``DIR/final.safetensors``;
* ``{"op": "table", "path": FILE, "value": X, "pause": PAUSE}``: save a one-task `PromptTable` whose
  prompt is filled with X to FILE.

``PAUSE`` (or null) stops the child at a chosen moment; the fork server (the child's parent) then sends it
SIGKILL. ``{"at": "write", "nth": n, "stage": s, "frac": f}`` pauses inside the n-th
``promptlab.io.atomic_write_bytes`` of this child, at stage ``partial`` (after writing ``f`` of the bytes
to the temporary file), ``before_replace`` (temporary file complete and synced, not yet renamed) or
``after_replace`` (renamed, directory not yet synced). ``{"at": "optimizer_step", "nth": n}`` pauses right
after the n-th optimizer step, before its checkpoint. ``kill_at_call: C`` pauses at the C-th function call
(Python or C, counted by a ``sys.setprofile`` hook) of ``fit``, wherever training is then: in a forward
pass, the optimizer, a checkpoint write. ``count_calls`` reports how many calls a whole ``fit`` made. The
hooks are monkeypatches made inside the child: the library itself is not changed. Every kill happens at a
point the child chose and announced, never after a delay, so where kills land does not depend on how busy
the machine is.

For every command the server answers one JSON line: ``{"status": "killed", "where": ...}``,
``{"status": "ok"}`` (with ``"calls": N`` when counted) or ``{"status": "error", "code": ...}`` (the child's
traceback goes to stderr).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # no OpenMP pool in the server: forked children stay safe (and runs are exact)

import promptlab as pl  # noqa: E402
from promptlab import io as plio  # noqa: E402
from promptlab.data import assistant, financial_phrasebank  # noqa: E402
from promptlab.data.download import SAMPLES_DIR  # noqa: E402

SEED = 11
PAUSE_FOREVER = 120.0  # a paused child that nobody kills gives up after this long


def load_records() -> list[dict]:
    sentiment = financial_phrasebank.parse_sentences(SAMPLES_DIR / "financial_phrasebank" / "Sentences_AllAgree.txt")
    intents = assistant.parse_intent_file(SAMPLES_DIR / "nlu_evaluation_data" / "KFold_1" / "trainset" / "alarm_set.csv")
    return sentiment[:12] + intents[:12]


def build_model(base, tasks):
    torch.manual_seed(SEED)
    model = pl.PromptLearningModel(base, tasks, max_seq_length=96)
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment of this financial news")
    # dropout makes the run depend on the RNG stream, so a resume must restore it exactly
    model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=16, num_layers=2, dropout=0.2, init="vocab")
    return model


def train_config(out: str, max_steps: int) -> pl.TrainConfig:
    return pl.TrainConfig(max_steps=max_steps, batch_size=4, grad_accum=2, lr=5e-2, p_tuning_lr=1e-2,
                          warmup_steps=2, checkpoint_every=1, eval_every=0, output_dir=out, seed=SEED,
                          max_seq_length=96, progress=False, mixed_precision="no")


# ---------------------------------------------------------------------------------------------- child
class Pauser:
    """Reports a pause to the fork server through ``fd`` and waits to be killed."""

    def __init__(self, fd: int, plan: dict | None):
        self.fd, self.plan = fd, plan or {}
        self.writes = 0
        self.steps = 0

    def notify(self, message: str) -> None:
        os.write(self.fd, (message + "\n").encode())

    def pause(self, where: str) -> None:
        self.notify("pause " + where)
        time.sleep(PAUSE_FOREVER)
        os._exit(3)  # never reached when the server does its job

    def install(self, trainer=None) -> None:
        """Hook the writes now (no trainer given) or the trainer's optimizer steps."""
        plan = self.plan
        if plan.get("at") == "write" and trainer is None:
            self._hook_writes(plan["nth"], plan.get("stage", "partial"), float(plan.get("frac", 0.5)))
        elif plan.get("at") == "optimizer_step" and trainer is not None:
            inner = trainer.optimizer.step

            def step(*args, **kwargs):
                out = inner(*args, **kwargs)
                self.steps += 1
                if self.steps == plan["nth"]:
                    self.pause(f"after optimizer step {self.steps}")
                return out

            trainer.optimizer.step = step

    def _hook_writes(self, nth: int, stage: str, frac: float) -> None:
        pauser, real_write, real_os = self, plio.atomic_write_bytes, plio.os

        class PausingFile:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                n = int(len(data) * frac)
                self.handle.write(data[:n])
                self.handle.flush()
                os.fsync(self.handle.fileno())  # the partial temporary file really is on disk
                pauser.pause(f"write {nth}: {n} of {len(data)} bytes")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.handle, name)

        class OsProxy:  # promptlab.io's view of ``os`` while the chosen write runs
            def __getattr__(self, name):
                return getattr(real_os, name)

            def fdopen(self, *args, **kwargs):
                handle = real_os.fdopen(*args, **kwargs)
                return PausingFile(handle) if stage == "partial" else handle

            def replace(self, src, dst):
                if stage == "before_replace":
                    pauser.pause(f"write {nth}: before rename")
                real_os.replace(src, dst)
                if stage == "after_replace":
                    pauser.pause(f"write {nth}: after rename")

        def atomic_write_bytes(path, data):
            pauser.writes += 1
            if pauser.writes != nth:
                return real_write(path, data)
            plio.os = OsProxy()
            try:
                return real_write(path, data)
            finally:
                plio.os = real_os

        plio.atomic_write_bytes = atomic_write_bytes


class CallCounter:
    """A ``sys.setprofile`` hook: counts function calls (Python and C) and pauses at call ``stop_at``."""

    def __init__(self, pauser: Pauser, stop_at: int | None):
        self.pauser, self.stop_at, self.calls = pauser, stop_at, 0

    def __call__(self, frame, event, arg) -> None:
        if event in ("call", "c_call"):
            self.calls += 1
            if self.calls == self.stop_at:
                self.pauser.pause(f"call {self.calls}")


def child_train(cmd: dict, base, tasks, records, fd: int) -> None:
    pauser = Pauser(fd, cmd.get("pause"))
    pauser.install()
    model = build_model(base, tasks)
    trainer = pl.Trainer(model, records, None, train_config(cmd["out"], cmd["max_steps"]))
    pauser.install(trainer)
    counter = CallCounter(pauser, cmd.get("kill_at_call"))
    counting = cmd.get("count_calls") or cmd.get("kill_at_call") is not None
    if counting:
        sys.setprofile(counter)
    try:
        trainer.fit(resume=cmd["resume"])
    finally:
        sys.setprofile(None)
    if counting:
        pauser.notify(f"calls {counter.calls}")
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in trainer.state.history]
    final = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    plio.save_safetensors(Path(cmd["out"]) / "final.safetensors", final,
                          {"step": str(trainer.state.step), "history": json.dumps(history)})


def child_table(cmd: dict, base, tasks, fd: int) -> None:
    pauser = Pauser(fd, cmd.get("pause"))
    pauser.install()
    table = pl.PromptTable.for_base(base)
    template = tasks["sentiment"]
    table.add("sentiment", torch.full((template.total_virtual_tokens, base.hidden_size), float(cmd["value"])),
              template, "prompt_tuning")
    table.save(cmd["path"])


# --------------------------------------------------------------------------------------------- server
def serve() -> None:
    # the answers go to the original stdout; anything promptlab prints (here or in a child) goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    base = pl.load_base_model("tiny", device="cpu")
    tasks = pl.default_tasks()
    records = load_records()
    _ = base.fingerprint  # computed once, inherited by every child
    print(json.dumps({"event": "ready"}), file=answers, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: do the work, never return into the server loop
            os.close(read_fd)
            code = 0
            try:
                if cmd["op"] == "train":
                    child_train(cmd, base, tasks, records, write_fd)
                else:
                    child_table(cmd, base, tasks, write_fd)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        os.close(write_fd)
        print(json.dumps(supervise(pid, read_fd)), file=answers, flush=True)


def supervise(pid: int, fd: int) -> dict:
    """Wait for the child; SIGKILL it as soon as it says it paused (reaped at once, so its pid is gone)."""
    buffer, where, calls = b"", None, None
    while where is None:
        chunk = os.read(fd, 4096)
        if not chunk:  # the child closed the pipe: it exited by itself
            break
        buffer += chunk
        lines = buffer.split(b"\n")
        buffer = lines.pop()
        for message in (m.decode() for m in lines):
            if message.startswith("pause "):
                where = message[len("pause "):]
            elif message.startswith("calls "):
                calls = int(message[len("calls "):])
    if where is not None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"status": "killed", "where": where or "?"}
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if code != 0:
        return {"status": "error", "code": code}
    return {"status": "ok"} if calls is None else {"status": "ok", "calls": calls}


if __name__ == "__main__":
    serve()
    sys.stdout.flush()
    os._exit(0)  # skip the slow interpreter teardown of torch
