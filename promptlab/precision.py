"""The precision policy, decided here and nowhere else: which dtype holds the frozen base model.

- **bf16** where the hardware computes it natively: a CUDA GPU of compute capability 8.0 or newer (A100,
  L4, H100, RTX 30xx+), or a CPU with AVX512-BF16 or AMX-BF16 instructions (Intel Cooper Lake, Sapphire
  Rapids and newer; AMD Zen 4 and newer). On this project's CPU a training step of the embedded model
  takes 0.62-0.66x the fp32 CPU time, at losses within 0.07 of fp32's (bench/RESULTS.md, speed-precision).
- **fp16 with loss scaling** on an older CUDA GPU (a T4, which free Colab gives, or a V100): they report bf16
  support, but only through slow emulation.
- **fp32** everywhere else (other CPUs, Apple's mps).

How the CPU case is detected: on Linux, the ``flags`` line of ``/proc/cpuinfo`` lists ``avx512_bf16`` or
``amx_bf16`` when the processor has them (the kernel reports what the CPU's CPUID says); elsewhere the
answer is no, so fp32. ``PROMPTLAB_PRECISION=fp32|bf16|fp16`` overrides the choice for a whole process.

What bf16 gives up: exact reproducibility across batch layouts. A token whose two best logits are within
bf16's rounding can flip with the batch it is generated in (or with packing): on the speed benchmark's
mixed batch of the embedded model, 15 of 24 greedy rows equal transformers' padded generation with packing
and 24 of 24 without. Load the base in fp32 (``dtype="fp32"``) when bit-exact results matter; every
"mixed batch == alone" guarantee of promptlab is stated, and tested, in fp32.

Only the frozen base is held in the low precision. Learned prompts, encoders, deep prefixes and the
optimizer's state stay fp32; prompts are cast to the base's dtype where they enter it. The dtype is chosen
once, when `load_base_model` loads the model, so every `PromptLearningModel` sharing that base agrees, and
the trainer follows the base: a base held in fp16 trains with loss scaling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENV = "PROMPTLAB_PRECISION"


@dataclass(frozen=True)
class Precision:
    """A precision choice: its name, the base's dtype, whether training scales the loss, and why."""

    name: str
    dtype: torch.dtype
    reason: str

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    @classmethod
    def of(cls, dtype: torch.dtype, reason: str = "") -> "Precision":
        name = next((n for n, d in NAMES.items() if d == dtype), None)
        if name is None:
            raise ConfigError(f"unsupported dtype {dtype} for the base model; use one of {list(NAMES)}")
        return cls(name, dtype, reason)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU lists avx512_bf16 or amx_bf16 among its flags (Linux); False when unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor's model name (Linux), else what the platform module knows: for reports of where a
    number was measured."""
    import platform

    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_precision(device: str | torch.device, requested: str | torch.dtype | None = None) -> Precision:
    """The precision for a base model on ``device``: ``requested`` ("auto", a name or a dtype) if given,
    else ``PROMPTLAB_PRECISION``, else the policy above."""
    device = torch.device(device)
    if isinstance(requested, torch.dtype):
        return Precision.of(requested, "asked for")
    choice = (requested or os.environ.get(ENV) or "auto").lower()
    if choice != "auto":
        if choice not in NAMES:
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {choice!r}"
                              + (f" (from {ENV})" if not requested else ""))
        return Precision(choice, NAMES[choice], "asked for" if requested else f"set by {ENV}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision("bf16", torch.bfloat16, f"GPU of compute capability {major}.{minor} computes bf16 natively")
        return Precision("fp16", torch.float16, f"GPU of compute capability {major}.{minor} has no native bf16; "
                                                f"fp16 with loss scaling")
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return Precision("bf16", torch.bfloat16, "CPU has AVX512-BF16/AMX-BF16")
        return Precision("fp32", torch.float32, "CPU without native bf16")
    return Precision("fp32", torch.float32, f"{device.type} device")


def default_device() -> torch.device:
    """CUDA, then Apple's mps, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
