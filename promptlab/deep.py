"""Deep prompt tuning (P-tuning v2; prefix tuning): learned key/value prefixes at every attention layer.

Prompt tuning and p-tuning change only the input embeddings; on a small model that is too weak for hard
tasks (Lester et al. 2021, Fig. 1). Here each task learns, for every layer, the keys and values of
``P`` extra positions that every real token attends to, as if a prompt had been run through the model and
its KV cache kept - but the cache itself is the parameter (Li and Liang 2021; Liu et al. 2022).

Choices, and why:
- **The prefix length is the task's virtual-token count.** ``add_deep_prompt_tuning(task)`` takes the
  template's ``total_virtual_tokens`` (or ``num_virtual_tokens``). The prefix lives in the KV cache, not in
  the input, so the template's ``<|VIRTUAL_PROMPT_n|>`` markers hold no input positions for a deep task:
  they are removed (with one adjacent space each) by `TaskTemplate.without_virtual_tokens`, which lets one
  task file serve all three methods. A template written without markers works the same.
- **Real tokens are numbered after the prefix**: positions P, P+1, ... (left padding still never shifts
  them). This is how a model numbers tokens that follow a cached prompt, so a prefix taken from the model's
  own cache (text init below) continues exactly, and it is PEFT's prefix-tuning layout, so prompts move
  between the two unchanged. The learned keys carry their rotary position inside them (they are cache
  entries), so the prefix itself needs no position ids.
- **Initialised from text**: the model's own keys and values for the init text (tiled to P tokens at
  positions 0..P-1), so training starts from a prompt the model understands, as text init does for the
  other methods; ``init="vocab"`` runs random vocabulary tokens instead, ``"random"`` draws noise at the
  scale of those keys and values.
- **Reparameterized through an MLP** while training (``reparameterize=True``, Li and Liang's remedy for
  unstable prefix training): P input vectors, initialised from the text's embeddings, pass through
  Linear-Tanh-Linear to all layers' keys and values, added to the initial prefix (last layer starting at
  zero, so step 0 is the text prefix). `PromptLearningModel.freeze` stores only the resulting prefix.

Tensors: a prefix is (L, 2, P, KV) float32, L layers, keys then values, KV = key/value heads x head size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


@dataclass
class DeepPromptConfig:
    """Settings of one task's deep prompt (saved with checkpoints).

    Attributes:
        num_virtual_tokens: prefix length P.
        reparameterize: train through an MLP that `freeze` drops (else the prefix is the parameter).
        hidden_size: width of that MLP's hidden layer.
    """

    num_virtual_tokens: int
    reparameterize: bool = True
    hidden_size: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 1:
            raise ConfigError(f"deep prompt num_virtual_tokens must be a positive integer, got "
                              f"{self.num_virtual_tokens!r}")
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ConfigError(f"deep prompt hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not isinstance(self.reparameterize, bool):
            raise ConfigError(f"deep prompt reparameterize must be true or false, got {self.reparameterize!r}")


class DeepPrompt(nn.Module):
    """One task's per-layer prefix. ``forward() -> (L, 2, P, KV)`` float32.

    Args:
        init_prefix: (L, 2, P, KV) starting keys and values.
        init_inputs: (P, D) starting MLP inputs (used when reparameterized).
    """

    def __init__(self, init_prefix: torch.Tensor, init_inputs: torch.Tensor, config: DeepPromptConfig):
        super().__init__()
        self.config = config
        self.shape = tuple(init_prefix.shape)  # (L, 2, P, KV)
        layers, _, length, kv = self.shape
        if config.reparameterize:
            self.register_buffer("start", init_prefix.detach().float().clone())  # (L, 2, P, KV), not trained
            self.inputs = nn.Parameter(init_inputs.detach().float().clone())  # (P, D)
            h = config.hidden_size
            self.mlp = nn.Sequential(nn.Linear(init_inputs.shape[1], h), nn.Tanh(), nn.Linear(h, layers * 2 * kv))
            nn.init.zeros_(self.mlp[-1].weight)  # step 0 gives the initial prefix exactly
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.prefix = nn.Parameter(init_prefix.detach().float().clone())  # (L, 2, P, KV)

    @property
    def num_virtual_tokens(self) -> int:
        return self.shape[2]

    def forward(self) -> torch.Tensor:
        if not self.config.reparameterize:
            return self.prefix
        layers, _, length, kv = self.shape
        delta = self.mlp(self.inputs)  # (P, L*2*KV)
        return self.start + delta.view(length, layers, 2, kv).permute(1, 2, 0, 3)  # (L, 2, P, KV)


def prefix_shape(lm: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a causal LM's attention, from its config."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


@torch.no_grad()
def prefix_from_tokens(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's own keys and values for token ids (P,) at positions 0..P-1: (L, 2, P, KV) float32."""
    out = lm.base_model(input_ids=ids[None], use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    layers = []
    for i in range(prefix_shape(lm)[0]):
        if hasattr(cache, "layers"):
            k, v = cache.layers[i].keys, cache.layers[i].values
        else:
            k, v = cache.key_cache[i], cache.value_cache[i]
        # (1, H, P, d) -> (P, H*d)
        layers.append(torch.stack([x[0].transpose(0, 1).reshape(x.shape[2], -1) for x in (k, v)]))
    return torch.stack(layers).float()  # (L, 2, P, KV)


def build_prefix_cache(lm: nn.Module, prefixes: list[torch.Tensor | None], dtype: torch.dtype):
    """A KV cache holding each row's prefix, left-padded to the longest: (cache, mask (B, Pmax)).

    ``prefixes``: per row, an (L, 2, P_row, KV) tensor or None (a row without a deep prompt). Padding slots
    hold zeros and are masked out, so a row sees exactly its own prefix, whatever else is in the batch.
    """
    from transformers import DynamicCache

    layers, kv_heads, head_dim = prefix_shape(lm)
    rows = len(prefixes)
    width = max(p.shape[2] for p in prefixes if p is not None)
    device = next(p for p in prefixes if p is not None).device
    keys_values = torch.zeros(layers, 2, rows, width, kv_heads * head_dim, device=device, dtype=dtype)
    mask = torch.zeros(rows, width, dtype=torch.long, device=device)
    for b, p in enumerate(prefixes):
        if p is not None:
            keys_values[:, :, b, width - p.shape[2]:] = p.to(dtype)  # (L, 2, P, KV) into the right end
            mask[b, width - p.shape[2]:] = 1
    # (L, 2, B, Pmax, H*d) -> per layer (B, H, Pmax, d)
    split = keys_values.view(layers, 2, rows, width, kv_heads, head_dim).transpose(3, 4)
    cache = DynamicCache()
    for i in range(layers):
        cache.update(split[i, 0], split[i, 1], i)
    return cache, mask
