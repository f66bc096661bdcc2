"""The command line end to end on the tiny model and the bundled samples."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import promptlab as pl
from promptlab.cli import main
from promptlab.data import read_jsonl
from promptlab.pipeline import build_model, load_run_config
from promptlab.table import PromptTable


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for task in ("sentiment", "intent_and_slot"):
        assert main(["prepare", task, "--out", str(root / task), "--samples"]) == 0
    return root


def _config(tmp_path, prepared, **overrides):
    config = {
        "model": "tiny",
        "methods": [{"method": "prompt_tuning", "task": "sentiment", "init_text": "Classify the sentiment"},
                    {"method": "p_tuning", "tasks": ["intent_and_slot"], "encoder": "mlp", "hidden_size": 32}],
        "data": {"train": [str(prepared / "sentiment/train.jsonl"), str(prepared / "intent_and_slot/train.jsonl")],
                 "validation": [str(prepared / "sentiment/validation.jsonl")]},
        "training": {"max_steps": 3, "batch_size": 4, "eval_every": 0, "eval_max_records": 2, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    config.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prepare_writes_splits_and_manifest(prepared):
    manifest = json.loads((prepared / "sentiment" / "manifest.json").read_text())
    counts = {s: len(read_jsonl(prepared / "sentiment" / f"{s}.jsonl")) for s in ("train", "validation", "test")}
    assert counts == manifest["counts"] and counts["train"] > counts["test"] > 0


def test_prepare_slot_formats(tmp_path):
    assert main(["prepare", "intent_and_slot", "--out", str(tmp_path / "m"), "--samples", "--slot-marks"]) == 0
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["options"] == {"slot_format": "marks"}
    assert any("[time : " in r["label"] for r in read_jsonl(tmp_path / "m" / "train.jsonl"))
    assert main(["prepare", "intent_and_slot", "--out", str(tmp_path / "w"), "--samples",
                 "--slot-format", "words-first"]) == 0
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["options"] == {"slot_format": "words-first"}
    assert any(" -> time" in r["label"] for r in read_jsonl(tmp_path / "w" / "train.jsonl"))
    assert main(["prepare", "sentiment", "--out", str(tmp_path / "s"), "--samples", "--slot-marks"]) != 0
    assert not (tmp_path / "s").exists()


def test_train_generate_evaluate_table(tmp_path, prepared, capsys):
    config = _config(tmp_path, prepared)
    assert main(["train", str(config)]) == 0
    table = tmp_path / "run" / "prompts.safetensors"
    assert table.exists() and (tmp_path / "run" / "history.json").exists()
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()

    records = read_jsonl(prepared / "sentiment/test.jsonl")[:2] + read_jsonl(prepared / "intent_and_slot/test.jsonl")[:2]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts", str(table), "--model", "tiny", "--input", str(inp),
                 "--output", str(out), "--max-new-tokens", "3"]) == 0
    predictions = read_jsonl(out)
    assert [p["taskname"] for p in predictions] == [r["taskname"] for r in records]
    assert all(isinstance(p["prediction"], str) for p in predictions)
    assert all(p["prediction"] == p["prediction"].strip() for p in predictions)  # as evaluate scores it

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--prompts", str(table), "--model", "tiny", "--data", str(inp),
                 "--output", str(metrics)]) == 0
    results = json.loads(metrics.read_text())
    assert set(results) == {"sentiment", "intent_and_slot"} and results["sentiment"]["n"] == 2
    assert "intent_accuracy" in results["intent_and_slot"]

    capsys.readouterr()
    assert main(["table", "list", str(table)]) == 0
    listing = capsys.readouterr().out
    assert "sentiment" in listing and "prompt_tuning" in listing and "p_tuning" in listing
    assert main(["table", "show", str(table), "sentiment"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["shape"] == [10, 64] and shown["method"] == "prompt_tuning"
    assert main(["table", "remove", str(table), "sentiment"]) == 0
    assert main(["table", "show", str(table), "sentiment"]) == 2  # gone: a clear error, exit 2
    assert "not in the prompt table" in capsys.readouterr().err


def test_resume_continues_to_the_same_end(tmp_path, prepared):
    config = _config(tmp_path, prepared)
    assert main(["train", str(config)]) == 0
    first = PromptTable.load(tmp_path / "run" / "prompts.safetensors")
    assert main(["train", str(config), "--resume"]) == 0  # already at max_steps: nothing changes
    again = PromptTable.load(tmp_path / "run" / "prompts.safetensors")
    assert again.tasks() == first.tasks()
    assert all(torch.equal(again[t], first[t]) for t in first.tasks())


def test_evaluate_baselines(tmp_path, prepared, capsys):
    data = prepared / "sentiment/test.jsonl"
    assert main(["evaluate", "--baseline", "zero-shot", "--model", "tiny", "--data", str(data),
                 "--max-records", "2"]) == 0
    assert "sentiment" in capsys.readouterr().out
    assert main(["evaluate", "--baseline", "few-shot", "--model", "tiny", "--data", str(data), "--max-records", "2",
                 "--train", str(prepared / "sentiment/train.jsonl")]) == 0


@pytest.mark.parametrize("overrides, message", [
    ({"bogus": 1}, "unknown key(s) ['bogus']"),
    ({"methods": [{"method": "prompt_tuning", "task": "nope"}]}, "unknown task 'nope'"),
    ({"methods": [{"method": "lora", "task": "sentiment"}]}, "must be one of ['deep_prompt_tuning', 'p_tuning', 'prompt_tuning']"),
    ({"training": {"max_stepz": 3}}, "unknown training setting(s) ['max_stepz']"),
    # mistakes inside a method's settings: promptlab's own errors naming the setting and the value
    ({"methods": [{"method": "p_tuning", "tasks": ["intent_and_slot"], "encoder": "gru"}]}, "encoder: unknown EncoderType 'gru'"),
    ({"methods": [{"method": "p_tuning", "tasks": ["intent_and_slot"], "hidden_size": "big"}]}, "hidden_size must be an integer >= 1, got 'big'"),
    ({"methods": [{"method": "p_tuning", "tasks": ["intent_and_slot"], "dropout": 1.5}]}, "dropout must be a number in [0, 1), got 1.5"),
    ({"methods": [{"method": "prompt_tuning", "task": "sentiment", "init": "zeros"}]}, "init: unknown PromptInit 'zeros'"),
])
def test_bad_config_is_a_clear_error(tmp_path, prepared, capsys, overrides, message):
    assert main(["train", str(_config(tmp_path, prepared, **overrides))]) == 2
    assert message in capsys.readouterr().err


# -- an entry without a method trains by the task's recipe, as the README's calls do ------------------------------
def test_recipe_entries_train_as_the_readme_path_does(tmp_path, prepared, capsys):
    config = _config(tmp_path, prepared, methods=[{"task": "sentiment"}, {"task": "intent_and_slot"}],
                     training={"max_steps": 2, "batch_size": 4, "eval_max_records": 2, "progress": False})
    loaded = load_run_config(config)
    recipe = loaded.tasks["intent_and_slot"].recipe["training"]
    # the recipes' training settings, under the run's own: the same TrainConfig as the README's call makes
    assert loaded.training.eval_every == recipe["eval_every"] and loaded.training.max_steps == 2
    assert loaded.training == pl.TrainConfig.from_recipe(
        [loaded.tasks["sentiment"], loaded.tasks["intent_and_slot"]], max_steps=2, batch_size=4, eval_max_records=2,
        progress=False, output_dir=str(tmp_path / "run"))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["table", "list", str(tmp_path / "run" / "prompts.safetensors")]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "prompt_tuning" in listing["sentiment"] and "deep_prompt_tuning" in listing["intent_and_slot"]

    # options beside a recipe entry override the recipe's, and must be the recipe method's
    config = _config(tmp_path, prepared, methods=[{"task": "intent_and_slot", "num_virtual_tokens": 4}],
                     training={"max_steps": 1, "batch_size": 2, "eval_every": 0, "progress": False})
    model = build_model(load_run_config(config), pl.load_base_model("tiny"))
    assert model.deep_prompts["intent_and_slot"].num_virtual_tokens == 4


@pytest.mark.parametrize("methods, message", [
    ([{"task": "nope"}], "methods[0]: an entry without 'method' trains its 'task' by the task's recipe; unknown task 'nope'"),
    ([{"task": "sentiment", "encoder": "lstm"}], "unknown key(s) ['encoder'] for task 'sentiment''s recipe (prompt_tuning)"),
    # recipes of different budgets, and the run's training settings do not say which
    ([{"task": "sentiment"}, {"task": "intent_and_slot"}], "the recipes of the tasks disagree on max_steps: 150 and 2400"),
])
def test_bad_recipe_entries_are_clear_errors(tmp_path, prepared, capsys, methods, message):
    assert main(["train", str(_config(tmp_path, prepared, methods=methods, training={}))]) == 2
    assert message in capsys.readouterr().err


def test_the_example_run_config_reads():
    config = load_run_config(Path(__file__).parents[1] / "configs" / "example_run.yaml")
    assert [m["task"] for m in config.methods] == ["sentiment", "intent_and_slot"]
    assert all("method" not in m for m in config.methods)  # the recipes
    assert config.training.max_steps == 300 and config.training.eval_every == 100


def test_malformed_data_line_names_file_and_line(tmp_path, prepared, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"taskname": "sentiment", "sentence": "ok", "label": "neutral"}\n{not json\n')
    config = _config(tmp_path, prepared, data={"train": [str(bad)]})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "not valid JSON" in err


def test_empty_training_set(tmp_path, prepared, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train", str(_config(tmp_path, prepared, data={"train": [str(empty)]}))]) == 2
    assert "empty" in capsys.readouterr().err


def test_offline_model_name_says_so(tmp_path, prepared, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", str(_config(tmp_path, prepared, model="no-such-org/no-such-model"))]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "embedded" in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "promptlab", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "prepare" in out.stdout and "demo" in out.stdout


def test_demo_quick(tmp_path):
    from promptlab.demo import run_demo

    report = run_demo(tmp_path / "demo", quick=True, log=lambda *_: None)
    text = report.read_text()
    assert "zero-shot" in text and "sentiment" in text and "intent_and_slot" in text
    for png in ("comparison.png", "curves_sentiment.png", "curves_intent_and_slot.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["source"] == "samples" and set(results["learned"]) == {"sentiment", "intent_and_slot"}
    # each task trained by its recipe in tasks.yaml: the one a 135M model can learn intent_and_slot with
    assert results["methods"] == {"sentiment": "prompt_tuning", "intent_and_slot": "deep_prompt_tuning"}


# -- generate writes the answer as evaluate scores it ---------------------------------------------------------
def test_generate_writes_answers_as_evaluate_scores_them(tmp_path, prepared, monkeypatch):
    """A sentiment answer follows "sentiment:" and comes out as " negative"; an intent answer starts on a new
    line. Both are written without that whitespace, exactly as `evaluate` records and scores them."""
    from promptlab.model import PromptLearningModel

    assert main(["train", str(_config(tmp_path, prepared))]) == 0
    table = tmp_path / "run" / "prompts.safetensors"
    raw = {"sentiment": " negative", "intent_and_slot": "\nIntent: alarm_set\nSlots: None "}
    monkeypatch.setattr(PromptLearningModel, "generate", lambda self, records, **kw: [raw[r["taskname"]] for r in records])
    records = [{"taskname": "sentiment", "sentence": "Profit fell .", "label": "negative"},
               {"taskname": "intent_and_slot", "utterance": "wake me up", "label": "Intent: alarm_set\nSlots: None"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    assert main(["generate", "--prompts", str(table), "--model", "tiny", "--input", str(inp), "--output", str(out)]) == 0
    assert main(["evaluate", "--prompts", str(table), "--model", "tiny", "--data", str(inp), "--output", str(metrics)]) == 0
    written = {p["taskname"]: p["prediction"] for p in read_jsonl(out)}
    assert written == {"sentiment": "negative", "intent_and_slot": "Intent: alarm_set\nSlots: None"}
    scored = json.loads(metrics.read_text())
    assert {t: r["predictions"] for t, r in scored.items()} == {t: [p] for t, p in written.items()}
    assert scored["sentiment"]["accuracy"] == 1.0 and scored["intent_and_slot"]["intent_accuracy"] == 1.0


# -- resume, errors ---------------------------------------------------------------------------------------------
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_fresh(tmp_path, prepared, capsys):
    """Killed before its first checkpoint: only the output folder and a killed writer's temporary file are
    there. ``--resume`` starts a fresh run, says so, and ends where an uninterrupted run ends."""
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    assert main(["train", str(_config(fresh_dir, prepared))]) == 0
    expected = PromptTable.load(fresh_dir / "run" / "prompts.safetensors")

    killed = tmp_path / "killed"
    (killed / "run").mkdir(parents=True)
    (killed / "run" / ".checkpoint.safetensors.somehost.999999.abcd.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert main(["train", str(_config(killed, prepared)), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint" in out and "fresh" in out, out
    got = PromptTable.load(killed / "run" / "prompts.safetensors")
    assert got.tasks() == expected.tasks() and all(torch.equal(got[t], expected[t]) for t in expected.tasks())


def test_only_promptlab_errors_become_exit_code_2(tmp_path, monkeypatch, capsys):
    """A user mistake (a PromptlabError) is one line on stderr and exit 2; any other exception is a bug
    and keeps its traceback."""
    import promptlab.pipeline

    def broken(path):
        raise KeyError("an internal bug")

    monkeypatch.setattr(promptlab.pipeline, "load_run_config", broken)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["train", str(tmp_path / "run.yaml")])
    assert main(["table", "show", str(tmp_path / "missing.safetensors"), "x"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("env, refused", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),  # --cpu --num_processes 2
    ({"ACCELERATE_USE_CPU": "True"}, False),  # accelerate launch --cpu, one process asked for
    ({"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, False),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "PMI_SIZE": "2"}, False),  # mpirun (--mpirun_hostfile)
    ({"MASTER_ADDR": "127.0.0.1"}, False),  # not launched by accelerate --cpu
])
def test_accelerate_cpu_launch_that_started_one_process_is_refused(tmp_path, prepared, monkeypatch, capsys, env, refused):
    """`accelerate launch --cpu --num_processes 2` starts one process (accelerate needs mpirun for more):
    the environment it leaves (MASTER_ADDR for peers, no WORLD_SIZE) is refused with the commands that work."""
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE",
                 "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    from promptlab.errors import ConfigError
    from promptlab.pipeline import check_launch

    if refused:
        with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
            check_launch(env)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main(["train", str(_config(tmp_path, prepared))]) == 2
        assert "started only this one process" in capsys.readouterr().err
    else:
        check_launch(env)
