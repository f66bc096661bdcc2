"""Two processes (torchrun, CPU, gloo) with batch 4 each take the same steps as one process with batch 8.

The worker (tests/_ddp_worker.py) trains prompt tuning and LSTM p-tuning together; this test runs the same
setup in-process with the doubled batch and compares step losses and final prompts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ddp_worker.py"
STEPS = 5


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records() -> list[dict]:
    """16 short sentiment records, 16 long intent records and 16 squad records (a deep prompt): with length-grouped batching every global
    batch of 8 holds one task only, so in each step the other task's prompt gets no gradient at all (one
    process leaves it untouched; two processes must agree on that too)."""
    words = ["rose", "fell", "held steady"]
    labels = ["positive", "negative", "neutral"]
    recs = [{"taskname": "sentiment", "sentence": f"Quarterly profit {words[i % 3]}", "label": labels[i % 3]}
            for i in range(16)]
    recs += [{"taskname": "intent_and_slot",
              "utterance": f"please wake me up at {i % 12 + 1} am tomorrow morning, I have an early meeting",
              "label": f"Intent: alarm_set\nSlots: time({i % 12 + 1} am), date(tomorrow)"} for i in range(16)]
    recs += [{"taskname": "squad", "context": f"The meeting is at {i % 12 + 1} pm in room {i}.",
              "question": "When is the meeting?", "answer": f"{i % 12 + 1} pm"} for i in range(16)]
    return recs


def _spec(batch_size: int) -> dict:
    return {"records": _records(), "init_seed": 11,
            "config": {"max_steps": STEPS, "batch_size": batch_size, "eval_every": 0, "checkpoint_every": 0,
                       "progress": False, "lr": 0.1, "p_tuning_lr": 0.01, "warmup_steps": 1, "seed": 7,
                       "mixed_precision": "no"}}


@pytest.mark.slow  # ~35 s on a busy 2-core machine: two fresh interpreters import torch and transformers
def test_two_processes_match_one_process(tmp_path, one_thread, tiny_base):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(_spec(batch_size=4)))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(spec_file), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-process run did not finish in {exc.timeout} s:\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    infos = [json.loads((out / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["num_processes"] for i in infos] == [2, 2]
    assert [i["rank"] for i in infos] == [0, 1]
    assert "gloo" in infos[0]["backend"]

    # the same setup in this process, with the global batch (2 x 4) as one batch
    trainer = _worker_module().build(_spec(batch_size=8), init_seed=11, base=tiny_base)
    assert trainer.accelerator.num_processes == 1
    single_initial = {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}
    history = trainer.fit()
    single = {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}

    steps = [h for h in history if "loss" in h]
    assert len(steps) == STEPS
    for info in infos:  # every rank logs the global loss of each step
        ddp_steps = [h for h in info["history"] if "loss" in h]
        assert [h["step"] for h in ddp_steps] == list(range(1, STEPS + 1))
        assert [h["tokens"] for h in ddp_steps] == [h["tokens"] for h in steps]
        for a, b in zip(ddp_steps, steps):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5), (a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-5), (a, b)
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    # the test is only meaningful if some step trains one task alone (the other's prompt gets no gradient)
    step_tasks = [{trainer.examples[i].taskname for b in trainer._step_batches(s) for i in b} for s in range(STEPS)]
    assert {"sentiment"} in step_tasks and {"intent_and_slot"} in step_tasks, step_tasks

    final = load_file(str(out / "final.safetensors"))
    rank1 = load_file(str(out / "final_rank1.safetensors"))
    assert set(final) == set(single) and set(rank1) == set(single)
    initial = load_file(str(out / "initial_rank0.safetensors"))
    initial1 = load_file(str(out / "initial_rank1.safetensors"))
    # the ranks really started from different encoders (else the broadcast would go untested)
    assert not torch.equal(initial["encoders.encoder0.head.0.weight"], initial1["encoders.encoder0.head.0.weight"])
    for k, v in single.items():
        assert torch.equal(final[k], rank1[k]), f"{k}: the two ranks disagree"
        torch.testing.assert_close(final[k], v, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert all(torch.equal(single_initial[k], initial[k]) for k in initial)  # rank 0 = the single process's init
    moved = [k for k in single if not torch.equal(single[k], initial[k])]
    assert "prompt_embeddings.sentiment.weight" in moved and "encoders.encoder0.inputs.intent_and_slot" in moved
    assert "deep_prompts.squad.mlp.2.weight" in moved
