"""Training checkpoints: one safetensors file (no pickle) written atomically, restored exactly.

It holds the trainable prompt parameters, the optimizer state, the best prompts so far, the RNG state, and
as JSON metadata the step, history, and the settings that must match to resume. The metadata records a
sha256 of every tensor and is itself checksummed, so a flipped byte anywhere is refused on load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import check_same_layout, check_tensor_sums, load_checksummed, save_checksummed, tensor_sha256

FORMAT = "promptlab.checkpoint.v1"
META_KEY = "promptlab_checkpoint"


@dataclass
class TrainState:
    """Where a run is: the next step, its history, and the best validation so far."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_step: int | None = None
    best_params: dict[str, torch.Tensor] | None = None
    evals_without_improvement: int = 0
    total_steps: int | None = None  # the step budget a time budget decided (None: max_steps)


def save_checkpoint(path: Path, model, optimizer, state, config_key: dict, scaler=None) -> None:
    """Write the run's state; ``scaler``: fp16 loss scaling, whose scale and growth count resume exactly."""
    tensors = {f"model/{k}": v for k, v in model.trainable_state_dict().items()}
    optim = optimizer.state_dict()
    for i, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optim/{i}/{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    for k, v in (state.best_params or {}).items():
        tensors[f"best/{k}"] = v
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    if scaler is not None:
        for name, value in scaler.state_dict().items():  # scale, growth factors, growth tracker
            tensors[f"scaler/{name}"] = torch.tensor(value, dtype=torch.float64)
    groups = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
    meta = {"format": FORMAT, "step": state.step, "history": state.history, "best_score": state.best_score,
            "best_step": state.best_step, "evals_without_improvement": state.evals_without_improvement,
            "total_steps": state.total_steps,
            "config": config_key, "spec": model.trainable_spec(), "param_groups": groups,
            "sha256": {k: tensor_sha256(v) for k, v in tensors.items()}}
    save_checksummed(path, tensors, META_KEY, meta)


def _check_meta(path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The checksums match every tensor, and the fields a resume relies on have their types."""
    check_tensor_sums(path, tensors, meta.get("sha256"), CheckpointError)
    ok = (isinstance(meta.get("step"), int) and meta["step"] >= 0 and isinstance(meta.get("history"), list)
          and (meta.get("best_step") is None or isinstance(meta["best_step"], int))
          and (meta.get("total_steps") is None or isinstance(meta["total_steps"], int))
          and (meta.get("best_score") is None or isinstance(meta["best_score"], (int, float)))
          and isinstance(meta.get("evals_without_improvement"), int)
          and isinstance(meta.get("param_groups"), list) and all(isinstance(g, dict) for g in meta["param_groups"])
          and isinstance(meta.get("spec"), dict))
    if not ok:
        raise CheckpointError(f"{path}: malformed checkpoint metadata (step, history, best, param groups or spec)")
    rng = tensors.get("rng/torch")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape):
        raise CheckpointError(f"{path}: the saved RNG state is {rng.dtype} {tuple(rng.shape)}, not this torch's")


def load_checkpoint(path: Path, model, optimizer, config_key: dict, scaler=None):
    """Restore model prompts, optimizer and RNG in place; returns the `TrainState` to continue from.

    Refuses (CheckpointError) a file that is corrupt, from another base model, another config, or a model
    whose trainable tasks and encoders differ.
    """
    tensors, meta = load_checksummed(path, META_KEY, CheckpointError, "promptlab training checkpoint")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a promptlab training checkpoint of format {FORMAT}")
    _check_meta(path, meta, tensors)
    spec, mine = meta.get("spec", {}), model.trainable_spec()
    if not isinstance(spec.get("base_fingerprint"), str) or not model.base.matches(spec["base_fingerprint"]):
        raise CheckpointError(f"{path}: written for another base model (embedding fingerprint differs)")
    if meta.get("config") != config_key:
        diff = sorted(k for k in set(config_key) | set(meta.get("config") or {})
                      if (meta.get("config") or {}).get(k) != config_key.get(k))
        raise CheckpointError(f"{path}: written by a run with other settings ({', '.join(diff)}); "
                              f"resume with the same config or start afresh")
    keys = ("prompt_tuning", "encoders", "deep_prompts")
    if {k: spec.get(k, {}) for k in keys} != {k: mine[k] for k in keys}:
        raise CheckpointError(f"{path}: its trainable tasks/encoders/deep prompts {spec.get('prompt_tuning')}, "
                              f"{spec.get('encoders')}, {spec.get('deep_prompts', {})} differ from this model's")
    params = model.trainable_state_dict()
    saved = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    check_same_layout(path, "parameters", params, saved, CheckpointError)
    if best:
        check_same_layout(path, "best parameters", params, best, CheckpointError)
    optim_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            try:
                _, i, name = k.split("/", 2)
                optim_state.setdefault(int(i), {})[name] = v
            except ValueError:
                raise CheckpointError(f"{path}: malformed optimizer state name {k!r}") from None
    saved_scaler = {k[len("scaler/"):]: v for k, v in tensors.items() if k.startswith("scaler/")}
    if bool(saved_scaler) != (scaler is not None):
        raise CheckpointError(f"{path}: written by a run {'with' if saved_scaler else 'without'} fp16 loss "
                              f"scaling; this run is {'with' if scaler is not None else 'without'}: resume "
                              f"with the base model in the same dtype")
    plist = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, slots in optim_state.items():
        for name, v in slots.items():
            if idx >= len(plist) or (name != "step" and (v.shape != plist[idx].shape
                                                         or v.dtype != plist[idx].dtype)):
                raise CheckpointError(f"{path}: optimizer state {idx}/{name} does not fit this model's parameters")
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this model: {exc}") from exc
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(saved[k])
    if scaler is not None:
        state = {k: (int(v.item()) if k == "_growth_tracker" or k == "growth_interval" else float(v.item()))
                 for k, v in saved_scaler.items()}
        scaler.load_state_dict(state)
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return TrainState(step=meta["step"], history=meta["history"], best_score=meta["best_score"],
                      best_step=meta["best_step"], best_params=best or None,
                      evals_without_improvement=meta["evals_without_improvement"],
                      total_steps=meta.get("total_steps"))
