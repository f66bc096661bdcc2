"""The decoding loop behind `PromptLearningModel.generate`: left-padded mixed batches with a KV cache."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import inspect

import torch


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


def _backbone_step(model, cache, **inputs):
    """One backbone call with the KV cache, across transformers versions (``cache`` in 5.x)."""
    backbone = model.lm.base_model
    key = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    if cache is not None:
        inputs[key] = cache
    out = backbone(use_cache=True, **inputs)
    new_cache = out["cache"] if "cache" in out else out["past_key_values"]
    return new_cache, out.last_hidden_state[:, -1]  # (B, D)


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate_batch(model, batch: Mapping[str, Any], max_new_tokens: int, do_sample: bool, temperature: float,
                   top_p: float, stop: list[str], generator: torch.Generator | None) -> list[str]:
    """Decode one left-padded batch; returns the new text of each row (EOS and stop strings cut)."""
    tokenizer = model.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    mask = batch["attention_mask"]  # (B, T)
    embeds = model.embed(batch["input_ids"], batch["virtual_index"], batch["tasknames"])  # (B, T, D)
    positions = model.position_ids(mask)  # (B, T)
    head = model.lm.get_output_embeddings()
    cache, last = _backbone_step(model, None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    rows = mask.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        nxt = _pick(head(last), do_sample, temperature, top_p, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        for i in (~done).nonzero()[:, 0].tolist():
            token = nxt[i].item()
            if token == eos:
                done[i] = True
                continue
            tokens[i].append(token)
            if stop:
                texts[i], hit = _cut(tokenizer.decode(tokens[i], skip_special_tokens=True), stop)
                done[i] = done[i] | hit
        if bool(done.all()) or step == max_new_tokens - 1:  # no backbone call for a token never picked
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
        cache, last = _backbone_step(model, cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos)
        next_pos = next_pos + 1
    return [texts[i] if stop else tokenizer.decode(tokens[i], skip_special_tokens=True) for i in range(rows)]
