"""The precision policy (promptlab.precision), and what holds when the base is held in bf16 or fp16.

What holds in bf16 (tested below, both tiny architectures): a mixed batch still generates exactly what each
record generates alone, and greedy text starts with fp32's first token for every fixture record (later tokens
of the random tiny models have near-ties, closer than bf16's resolution, that summing in another order or
rounding may flip); per-example losses are within 2% of fp32's (bf16 keeps 8 bits of mantissa). Exact
equality with fp32 is not promised.
"""
import pytest
import torch

import promptlab as pl
from promptlab import precision
from promptlab.precision import choose_precision, cpu_has_native_bf16

from test_deep import RECORDS, build, loss_batch, prompts_only


def test_cpu_detection_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu amx_bf16\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")  # macOS, Windows: no /proc: fp32


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_cpu_gets_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *a: native)
    chosen = choose_precision("cpu")
    assert chosen.name == expected and chosen.dtype == precision.NAMES[expected]
    assert not chosen.loss_scaling


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_gpus_by_compute_capability(monkeypatch, capability, expected):
    """A T4 (7.5) reports bf16 support through emulation: it gets fp16 with loss scaling."""
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = choose_precision("cuda")
    assert chosen.name == expected and chosen.loss_scaling == (expected == "fp16")
    assert f"{capability[0]}.{capability[1]}" in chosen.reason


def test_other_devices_and_overrides(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    assert choose_precision("mps").name == "fp32"
    assert choose_precision("cpu", "bf16").name == "bf16"
    assert choose_precision("cpu", torch.float16).name == "fp16"
    monkeypatch.setenv(precision.ENV, "fp16")
    assert choose_precision("cpu").name == "fp16" and precision.ENV in choose_precision("cpu").reason
    monkeypatch.setenv(precision.ENV, "double")
    with pytest.raises(pl.ConfigError, match=f"got 'double' \\(from {precision.ENV}\\)"):
        choose_precision("cpu")
    with pytest.raises(pl.ConfigError, match="got 'int8'"):
        choose_precision("cpu", "int8")


def test_load_reports_the_choice(capsys):
    base = pl.load_base_model("tiny", dtype="bf16")
    assert base.dtype == torch.bfloat16
    assert "tiny on cpu, base in bf16" in capsys.readouterr().out


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2"])
def bases(request):
    return {name: pl.load_base_model(request.param, dtype=name, verbose=False) for name in ("fp32", "bf16")}


def test_fingerprint_does_not_depend_on_the_dtype(bases, tmp_path):
    assert bases["fp32"].fingerprint == bases["bf16"].fingerprint
    assert pl.load_base_model("tiny", dtype="fp16", verbose=False).fingerprint == \
        pl.load_base_model("tiny", dtype="fp32", verbose=False).fingerprint
    for source, target in (("bf16", "fp32"), ("fp32", "bf16")):  # a table trained in one loads in the other
        model = build(bases[source])
        model.freeze()
        path = tmp_path / f"{source}.safetensors"
        model.prompt_table.save(path)
        table = pl.PromptTable.load(path, bases[target])
        assert all(torch.equal(table[t], model.prompt_table[t]) for t in table)


def test_bf16_keeps_mixed_batch_equal_to_alone_and_fp32_text(bases):
    models = {name: build(base) for name, base in bases.items()}
    for m in models.values():
        m.eval()
    records = prompts_only(RECORDS)
    # 3 tokens: the 4th of one tiny-gpt2 row is a near-tie (its top two logits alone 0.004 apart, half a bf16
    # step at that size) that the batch's other summation order flips
    texts = {name: m.generate(records, max_new_tokens=3) for name, m in models.items()}
    assert texts["bf16"] == [models["bf16"].generate([r], max_new_tokens=3)[0] for r in records]
    # the same greedy first token as fp32; later tokens of these random models have near-ties that bf16
    # rounding can flip (one row of tiny-gpt2 has an exact bf16 tie at its 2nd token, another differs at its 4th)
    first = {name: m.generate(records, max_new_tokens=1) for name, m in models.items()}
    assert first["bf16"] == first["fp32"]
    losses = {name: m(loss_batch(m, RECORDS), reduction="none").detach() for name, m in models.items()}
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.02, atol=0)
    # prompts and deep prefixes stay fp32 whatever the base
    assert all(p.dtype == torch.float32 for p in models["bf16"].parameters() if p.requires_grad)


def test_trainer_follows_the_base_and_refuses_a_contradiction(bases):
    records = RECORDS * 2
    trainer = pl.Trainer(build(bases["bf16"]), records, None, pl.TrainConfig(max_steps=1, progress=False))
    assert trainer.precision == "bf16" and trainer.scaler is None
    trainer.fit()
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    with pytest.raises(pl.ConfigError, match="held in bf16.*dtype='fp16'"):
        pl.Trainer(build(bases["bf16"]), records, None, pl.TrainConfig(mixed_precision="fp16"))


@pytest.fixture(scope="module")
def fp16_base():
    return pl.load_base_model("tiny", dtype="fp16", verbose=False)


def test_fp16_loss_scaling_resumes_exactly(fp16_base, tmp_path):
    records = RECORDS * 3
    settings = dict(max_steps=4, batch_size=4, eval_every=0, checkpoint_every=2, progress=False, seed=2,
                    warmup_steps=1)

    def trainer(out):
        return pl.Trainer(build(fp16_base), records, None, pl.TrainConfig(**settings, output_dir=str(out)))

    straight = trainer(tmp_path / "a")
    assert straight.precision == "fp16" and straight.scaler is not None
    straight.scaler._init_scale = 2.0 ** 20  # start high, so that the scaler backs off and its state matters
    straight.fit()
    scale = straight.scaler.get_scale()
    assert scale != 2.0 ** 20

    class Killed(Exception):
        pass

    killed = trainer(tmp_path / "b")
    killed.scaler._init_scale = 2.0 ** 20
    step = killed.train_step
    killed.train_step = lambda s: (_ for _ in ()).throw(Killed()) if s == 2 else step(s)
    with pytest.raises(Killed):
        killed.fit()
    resumed = trainer(tmp_path / "b")  # its scaler starts at the default scale: the checkpoint restores it
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == scale
    want, got = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # a checkpoint with loss scaling does not resume a run without it, and the reverse
    fp32 = pl.Trainer(build(pl.load_base_model("tiny", dtype="fp32", verbose=False)), records, None,
                      pl.TrainConfig(**settings, output_dir=str(tmp_path / "b")))
    with pytest.raises(pl.CheckpointError, match="fp16 loss scaling"):
        fp32.fit(resume=True)


def test_fp16_overflow_stops_with_a_clear_error(fp16_base, tmp_path):
    model = build(fp16_base)
    with torch.no_grad():
        model.prompt_embeddings["sentiment"].weight.fill_(1e6)  # beyond fp16's range: inf, then NaN
    trainer = pl.Trainer(model, RECORDS * 2, None, pl.TrainConfig(max_steps=3, batch_size=10, progress=False,
                                                                  output_dir=str(tmp_path)))
    with pytest.raises(pl.TrainingError, match=r"step 1: the loss is nan.*fp16 overflowed: train in fp32 or bf16"):
        trainer.fit()
    assert not (tmp_path / "checkpoint.safetensors").exists()  # nothing was saved from the NaN step
