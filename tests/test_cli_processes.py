"""``promptlab train`` under two processes: ``torchrun --nproc_per_node 2 -m promptlab train CONFIG`` on CPU.

Two processes with batch 4 each must end with the prompts of one process with batch 8 (the same global
batch), within 1e-6, and the run's summary must be printed once, by the main process. tests/test_ddp.py
checks the Trainer step by step; this checks the command line as a user launches it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from promptlab.cli import main
from promptlab.table import PromptTable

ROOT = Path(__file__).resolve().parents[1]
# Adam turns a gradient coordinate near zero into a step of about lr whatever its rounding, so the two runs
# (which sum the same terms in another order) differ by a small fraction of lr: kept well under 1e-6.
LR = 1e-3
SUMMARY = "trained ['sentiment', 'intent_and_slot'] for 4 steps"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(folder: Path, data: Path, batch_size: int) -> Path:
    config = {
        "model": "tiny",
        "methods": [{"method": "prompt_tuning", "task": "sentiment", "init_text": "Classify the sentiment"},
                    {"method": "p_tuning", "tasks": ["intent_and_slot"], "encoder": "lstm", "hidden_size": 16,
                     "num_layers": 1}],
        "data": {"train": [str(data / "sentiment/train.jsonl"), str(data / "intent_and_slot/train.jsonl")]},
        "training": {"max_steps": 4, "batch_size": batch_size, "eval_every": 0, "checkpoint_every": 2,
                     "progress": False, "seed": 5, "lr": LR},
        "output_dir": str(folder / "run"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # two fresh interpreters import torch and transformers: ~30 s on a busy 2-core machine
def test_torchrun_two_processes_match_one_process_and_report_once(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    for task in ("sentiment", "intent_and_slot"):
        assert main(["prepare", task, "--out", str(data / task), "--samples"]) == 0
    # fp32 everywhere: the comparison is about the processes, not about a bf16 base's rounding
    env = {**os.environ, "PROMPTLAB_PRECISION": "fp32", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    two = _config(tmp_path / "two", data, batch_size=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "promptlab", "train", str(two)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-process run did not finish in {exc.timeout} s:\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(SUMMARY) == 1, proc.stdout  # the main process reports; the other is quiet

    # the same run in one process, with the global batch (2 x 4) as one batch
    monkeypatch.setenv("PROMPTLAB_PRECISION", "fp32")
    one = _config(tmp_path / "one", data, batch_size=8)
    capsys.readouterr()
    assert main(["train", str(one)]) == 0
    assert capsys.readouterr().out.count(SUMMARY) == 1

    single = PromptTable.load(tmp_path / "one" / "run" / "prompts.safetensors")
    double = PromptTable.load(tmp_path / "two" / "run" / "prompts.safetensors")
    assert sorted(double.tasks()) == sorted(single.tasks()) == ["intent_and_slot", "sentiment"]
    for task in single.tasks():
        torch.testing.assert_close(double[task], single[task], atol=1e-6, rtol=0, msg=lambda m, t=task: f"{t}: {m}")
    steps = [[h for h in json.loads((tmp_path / run / "run" / "history.json").read_text()) if "loss" in h]
             for run in ("one", "two")]
    assert [h["tokens"] for h in steps[0]] == [h["tokens"] for h in steps[1]] and len(steps[0]) == 4
    for a, b in zip(*steps):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), (a, b)
