"""The decoding loop behind `PromptLearningModel.generate`: left-padded mixed batches with a KV cache.

The loop is ours rather than transformers' `generate` because a batch may mix deep prompts of different
lengths with input-level prompts: each row starts from its own prefix in the cache (`model.backbone_inputs`),
and the prompt pass may be packed (`promptlab.packing`). bench/RESULTS.md compares it with one
`generate(inputs_embeds=...)` call; tests/test_generation_reference.py checks both give the same text.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import inspect

import torch

from .packing import pack_batch, packed_inputs, unpack_cache


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or a sample from the top-p nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def backbone_call(lm, **inputs):
    """One call of the frozen backbone (no LM head), with a KV cache under the name this transformers
    version takes (``cache`` in 5.x, ``past_key_values`` before)."""
    backbone = lm.base_model
    if "cache" in inputs and "cache" not in inspect.signature(backbone.forward).parameters:
        inputs["past_key_values"] = inputs.pop("cache")
    return backbone(**inputs)


def _step(lm, rows: torch.Tensor | None = None, **inputs):
    """A cached backbone call: returns the cache and each row's last hidden state (B, D); with ``rows``,
    the hidden states at those indices of the flattened (R*S) output instead (a packed prompt)."""
    out = backbone_call(lm, use_cache=True, **inputs)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    hidden = out.last_hidden_state
    if rows is None:
        return cache, hidden[:, -1]  # (B, D)
    return cache, hidden.reshape(-1, hidden.shape[-1])[rows]


def _packed_prompt(model, batch: Mapping[str, Any]):
    """The prompt pass over a left-padded batch, packed (no padding, shared prefixes computed once), with
    its KV cache laid out as the padded batch; None when packing would save nothing or cannot be done."""
    if not model.can_pack(batch["tasknames"]):
        return None
    mask = batch["attention_mask"]
    rows, width = mask.shape
    pads = (mask == 0).sum(1)  # (B,) left padding of each row
    steps = torch.arange(width, device=mask.device)[None, :]
    shift = (steps + pads[:, None]) % width  # right-aligned position j holds left position j + pad
    right = {k: batch[k].gather(1, shift) for k in ("input_ids", "virtual_index", "attention_mask")}
    plan = pack_batch(right["input_ids"], right["virtual_index"], right["attention_mask"], batch["tasknames"])
    if plan is None:
        return None
    embeds = model.embed(right["input_ids"], right["virtual_index"], batch["tasknames"])  # (B, T, D)
    packed, attention = packed_inputs(model.lm, embeds, plan)  # (R, S, D), (R, 1, S, S)
    last = plan.target[torch.arange(rows, device=mask.device), width - pads - 1]  # (B,) slot of each last token
    cache, hidden = _step(model.lm, rows=last, inputs_embeds=packed, attention_mask=attention,
                          position_ids=plan.position_ids)
    if not unpack_cache(cache, plan.target.gather(1, (steps - pads[:, None]).clamp(min=0))):
        return None
    return cache, hidden


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate_batch(model, batch: Mapping[str, Any], max_new_tokens: int, do_sample: bool, temperature: float,
                   top_p: float, stop: list[str], generator: torch.Generator | None) -> list[str]:
    """Decode one left-padded batch; returns the new text of each row (EOS and stop strings cut)."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    prompt = _packed_prompt(model, batch) if model.pack_sequences else None
    if prompt is not None:
        cache, last = prompt
        mask = batch["attention_mask"]  # (B, T)
        next_pos = model.position_ids(mask)[:, -1:] + 1  # (B, 1)
    else:
        inputs = model.backbone_inputs(batch)  # a deep prompt's prefix is already in the cache
        cache, last = _step(model.lm, **inputs)
        mask = inputs["attention_mask"]  # (B, Pmax+T)
        next_pos = inputs["position_ids"][:, -1:] + 1  # (B, 1)
    head = model.lm.get_output_embeddings()
    rows = mask.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    alive = list(range(rows))  # the batch row of each row in the batch; finished rows leave it
    done = [False] * rows
    can_drop = hasattr(cache, "batch_select_indices")  # else finished rows ride along, their tokens ignored
    for step in range(max_new_tokens):
        nxt = _pick(head(last), do_sample, temperature, top_p, generator)  # (A,)
        for i, token in zip(alive, nxt.tolist()):
            if done[i]:
                continue
            if token == eos:
                done[i] = True
                continue
            tokens[i].append(token)
            if stop:
                texts[i], done[i] = _cut(tokenizer.decode(tokens[i], skip_special_tokens=True), stop)
        keep = [a for a, i in enumerate(alive) if not done[i]]
        if not keep or step == max_new_tokens - 1:  # no backbone call for a token never picked
            break
        if can_drop and len(keep) < len(alive):  # drop finished rows from the cache, mask and positions
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, next_pos, nxt = mask[index], next_pos[index], nxt[index]
            alive = [alive[a] for a in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (A, T+1)
        cache, last = _step(model.lm, input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, cache=cache)
        next_pos = next_pos + 1
    return [texts[i] if stop else tokenizer.decode(tokens[i], skip_special_tokens=True) for i in range(rows)]
