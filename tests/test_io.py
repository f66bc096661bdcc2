"""promptlab.io: byte-identical safetensors saves, and the temporary files that killed writers leave behind."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import promptlab as pl
from promptlab import io as plio

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a writer to kill (POSIX only)")


def _tensors(order: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    every = {"prompt": torch.randn(4, 6, generator=g), "steps": torch.arange(5), "half": torch.randn(3, generator=g).half(),
             "bf16": torch.randn(2, 2, generator=g).bfloat16(), "mask": torch.tensor([True, False, True]),
             "empty": torch.zeros(0, 6), "scalar": torch.tensor(2.5)}
    return {k: every[k] for k in order}


# ------------------------------------------------------------------------------------ deterministic saves
def test_two_saves_of_the_same_content_are_byte_identical(tmp_path):
    names = ["prompt", "steps", "half", "bf16", "mask", "empty", "scalar"]
    meta = {f"key{i}": f"value {i}" for i in range(40)}  # enough keys that a hash order would show
    plio.save_safetensors(tmp_path / "a.safetensors", _tensors(names), meta)
    plio.save_safetensors(tmp_path / "b.safetensors", _tensors(names[::-1]), dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_saved_file_reads_back_with_safetensors_itself(tmp_path):
    """safetensors' own reader (the outside reference) and promptlab's strict one see what was saved."""
    tensors, meta = _tensors(["prompt", "steps", "half", "bf16", "mask", "empty", "scalar"]), {"a": "1", "ü": "ß"}
    path = tmp_path / "x.safetensors"
    plio.save_safetensors(path, tensors, meta)
    theirs = load_file(str(path))
    ours, our_meta = plio.load_safetensors(path, AssertionError)
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape
        assert torch.equal(theirs[k], v) and torch.equal(ours[k], v)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == meta == our_meta


def test_prompt_table_saves_are_byte_identical(tiny_base, tmp_path):
    template = pl.default_tasks()["sentiment"]
    table = pl.PromptTable.for_base(tiny_base)
    table.add("sentiment", torch.randn(template.total_virtual_tokens, tiny_base.hidden_size), template, "prompt_tuning")
    table.save(tmp_path / "a.safetensors")
    table.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_unsupported_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        plio.save_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)}, {})


# ---------------------------------------------------------------------------------- stale temporary files
class PausedWriter:
    """A forked process inside ``atomic_write_bytes(target, ...)``: its temporary file is written and it
    waits (at the fsync) until it is killed. Load-independent: it says when it is there."""

    def __init__(self, target: Path):
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child
            try:
                os.close(read_fd)

                def pause(fd):
                    os.write(write_fd, b"ready\n")
                    time.sleep(120)

                plio.os.fsync = pause  # the child's own copy of the os module
                plio.atomic_write_bytes(target, b"x" * 1000)
            finally:
                os._exit(1)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            assert pipe.readline() == b"ready\n"

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)  # reaped: the pid is gone


def _temps(folder: Path, target: str) -> list[Path]:
    return sorted(folder.glob(f".{target}.*.tmp"))


@needs_fork
def test_next_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "prompts.safetensors"
    writer = PausedWriter(target)
    writer.kill()
    [left] = _temps(tmp_path, target.name)
    assert f".{plio._host_tag()}.{writer.pid}." in left.name and left.stat().st_size == 1000
    plio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _temps(tmp_path, target.name) == []


@needs_fork
def test_a_live_writers_file_and_other_files_are_kept(tmp_path):
    target = tmp_path / "prompts.safetensors"
    live = PausedWriter(target)  # another process saving the same file right now
    dead = PausedWriter(target)
    dead.kill()
    host = plio._host_tag()
    others = [tmp_path / f".other.safetensors.{host}.{dead.pid}.abc.tmp",  # another target
              tmp_path / f".{target.name}.otherhost.{dead.pid}.abc.tmp",  # another machine's writer
              tmp_path / f".{target.name}.abc123.tmp"]  # not named by promptlab's writer
    for path in others:
        path.write_bytes(b"keep")
    try:
        [live_temp] = [p for p in _temps(tmp_path, target.name) if f".{host}.{live.pid}." in p.name]
        plio.atomic_write_bytes(target, b"new")
        assert live_temp.exists()  # never touched while its writer lives
        assert not [p for p in _temps(tmp_path, target.name) if f".{host}.{dead.pid}." in p.name]
        assert all(p.exists() for p in others)
    finally:
        live.kill()
    plio.atomic_write_bytes(target, b"newer")  # now the other writer is gone too
    assert not live_temp.exists()
