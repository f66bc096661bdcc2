"""One process of the 2-process CPU training run of tests/test_ddp.py (a helper script, not a test module).

Run under torchrun:  python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_worker.py SPEC.json OUTDIR

SPEC.json holds the records, the TrainConfig settings and the model layout (see `build`). Every rank writes
``final_rank<r>.safetensors`` (its trainable state, via `PromptLearningModel.save_trainable`) and
``history_rank<r>.json``; rank 0 writes ``final.safetensors``. test_ddp.py imports `build` for its
single-process reference run, so both runs set up the model the same way.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def build(spec: dict, init_seed: int, base=None):
    """The model and Trainer that ``spec`` describes: prompt tuning of sentiment, LSTM p-tuning of
    intent_and_slot and deep prompt tuning of squad (through its MLP), on the tiny Llama-style base (CPU; ``base``: an already loaded one). ``init_seed``
    seeds the encoder's random init."""
    import torch

    import promptlab as pl

    base = base if base is not None else pl.load_base_model("tiny", device="cpu")
    torch.manual_seed(init_seed)
    model = pl.PromptLearningModel(base, pl.default_tasks())
    model.add_prompt_tuning("sentiment", init_text="Classify the sentiment of this financial news")
    model.add_p_tuning(["intent_and_slot"], encoder="lstm", hidden_size=spec.get("encoder_hidden", 32),
                       num_layers=1, init_text="Predict the intent")
    model.add_deep_prompt_tuning("squad", num_virtual_tokens=4, hidden_size=16, init_text="Answer")
    config = pl.TrainConfig.from_dict(spec["config"])
    return pl.Trainer(model, spec["records"], None, config)


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2])
    # Each rank seeds its encoder init differently on purpose: the Trainer must start every rank from
    # rank 0's parameters, so the result equals a single process built with init_seed.
    rank = int(os.environ.get("RANK", "0"))
    trainer = build(spec, spec["init_seed"] + rank)
    acc = trainer.accelerator
    if acc.process_index != rank:
        raise SystemExit(f"accelerate says rank {acc.process_index}, torchrun says {rank}")
    if acc.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise SystemExit(f"accelerate sees {acc.num_processes} processes, torchrun started "
                         f"{os.environ.get('WORLD_SIZE')}")
    initial = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    history = trainer.fit()
    from safetensors.torch import save_file

    save_file(initial, str(out / f"initial_rank{rank}.safetensors"))
    trainer.model.save_trainable(out / f"final_rank{rank}.safetensors")
    info = {"rank": rank, "num_processes": acc.num_processes, "history": history,
            "backend": str(acc.state.backend), "distributed_type": str(acc.distributed_type)}
    (out / f"history_rank{rank}.json").write_text(json.dumps(info))
    if acc.is_main_process:
        trainer.model.save_trainable(out / "final.safetensors")
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
