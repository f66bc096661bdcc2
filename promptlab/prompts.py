"""Learned prompts: `PromptEmbedding` (prompt tuning), `PromptEncoder` (p-tuning), and init choices.

The frozen `PromptTable` lives in `promptlab.table`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .errors import ConfigError


class PromptInit(str, Enum):
    """How the first prompt vectors are chosen."""

    TEXT = "text"  # embeddings of a text's tokens, tiled or truncated to the prompt length
    VOCAB = "vocab"  # embeddings of randomly sampled vocabulary tokens
    RANDOM = "random"  # normal noise at the vocabulary's scale


class EncoderType(str, Enum):
    LSTM = "lstm"  # bi-LSTM then a 2-layer MLP head (Liu et al. 2021)
    MLP = "mlp"  # 2 hidden layers


def _enum(kind: type[Enum], value, name: str) -> Enum:
    """``value`` as a member of ``kind``; ConfigError naming the setting ``name`` and the value otherwise."""
    try:
        return kind(value.value if isinstance(value, Enum) else str(value).lower())
    except ValueError:
        raise ConfigError(f"{name}: unknown {kind.__name__} {value!r}; choose one of {[k.value for k in kind]}") from None


def initial_prompt(num_virtual_tokens: int, embeddings: torch.Tensor, tokenizer=None, init: str = "text",
                   init_text: str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """First values of a (V, D) float32 prompt, from the frozen (vocab, D) embedding matrix.

    Text init tokenizes ``init_text`` with the base's own tokenizer (offline, GGUF too), then tiles or
    truncates the token embeddings to V rows. Without text it falls back to vocabulary sampling.
    """
    init = _enum(PromptInit, init, "init")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens must be an integer >= 1, got {num_virtual_tokens!r}")
    vocab, dim = embeddings.shape
    weights = embeddings.detach().float()
    if init is PromptInit.TEXT and init_text:
        if not isinstance(init_text, str):
            raise ConfigError(f"init_text must be a string, got {init_text!r}")
        if tokenizer is None:
            raise ConfigError("init='text' needs the base model's tokenizer to read init_text")
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text {init_text!r} has no tokens")
        ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]  # tile, then truncate
        return weights[torch.tensor(ids, device=weights.device)].clone()
    if init is PromptInit.RANDOM:
        std = weights.std().item()
        return torch.randn(num_virtual_tokens, dim, generator=generator).to(weights.device) * std
    # vocab, and text without a text: rows of ordinary tokens (skip the first ids, often special tokens)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (num_virtual_tokens,), generator=generator).to(weights.device)
    return weights[ids].clone()


class PromptEmbedding(nn.Module):
    """Prompt tuning: the prompt itself is the parameter. ``forward() -> (V, D)`` float32."""

    def __init__(self, init_values: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init_values.detach().float().clone())  # (V, D)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self) -> torch.Tensor:
        return self.weight


@dataclass
class EncoderConfig:
    """Settings of a p-tuning encoder (saved with its checkpoints).

    Attributes:
        encoder: "lstm" or "mlp".
        hidden_size: width of the LSTM / MLP hidden layers.
        num_layers: LSTM layers (the MLP always has two hidden layers).
        dropout: dropout inside the encoder while training.
        residual: output = input + encoder(input), the last layer starting at zero, so training starts
            from the initial prompt (text or vocabulary) instead of from noise; off: the plain encoder.
    """

    encoder: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    residual: bool = True

    def __post_init__(self) -> None:
        self.encoder = _enum(EncoderType, self.encoder, "encoder").value
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"encoder {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"encoder dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.residual, bool):
            raise ConfigError(f"encoder residual must be true or false, got {self.residual!r}")


class PromptEncoder(nn.Module):
    """P-tuning: one encoder shared by several tasks, each with its own input vectors.

    The task conditions the encoder through its inputs: ``forward(task) -> (V_task, D)`` float32, where
    V_task may differ between tasks. The LSTM reads a task's V vectors as one sequence.
    """

    def __init__(self, inputs: dict[str, torch.Tensor], dim: int, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.inputs = nn.ParameterDict({t: nn.Parameter(v.detach().float().clone()) for t, v in inputs.items()})
        h = config.hidden_size
        if config.encoder == EncoderType.LSTM.value:
            self.lstm = nn.LSTM(dim, h, num_layers=config.num_layers, bidirectional=True, batch_first=True,
                                dropout=config.dropout if config.num_layers > 1 else 0.0)
            self.head = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, dim))
        else:
            self.lstm = None
            self.head = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(h, h),
                                      nn.ReLU(), nn.Linear(h, dim))
        if config.residual:
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    @property
    def tasks(self) -> list[str]:
        return list(self.inputs.keys())

    def forward(self, task: str) -> torch.Tensor:
        x = self.inputs[task]  # (V, D)
        h = x
        if self.lstm is not None:
            h, _ = self.lstm(x.unsqueeze(0))  # (1, V, 2H)
            h = h.squeeze(0)  # (V, 2H)
        out = self.head(h)  # (V, D)
        return x + out if self.config.residual else out
