"""bench/campaign.py on the tiny model and the bundled samples: the README-path run and the PEFT runs end in a
result.json that `--report` turns into tables, and a PEFT run stopped after a checkpoint resumes to exactly the
result of an uninterrupted one."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

import promptlab as pl  # noqa: E402
from promptlab.data.jsonl import read_jsonl  # noqa: E402
from promptlab.data.prepare import prepare_dataset  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def campaign():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("campaign", BENCH / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


@pytest.fixture
def sentiment(tmp_path, monkeypatch, campaign):
    prepare_dataset("sentiment", tmp_path / "data", source="samples", progress=False)
    data = {s: list(read_jsonl(tmp_path / "data" / f"{s}.jsonl")) for s in ("train", "validation", "test")}
    monkeypatch.setattr(campaign, "splits", lambda task: data)
    monkeypatch.setenv("PROMPTLAB_CAMPAIGN", str(tmp_path / "runs"))
    monkeypatch.setattr(campaign, "TEST_N", {"sentiment": 6})
    monkeypatch.setattr(campaign, "VAL_N", {"sentiment": 4})
    monkeypatch.setattr(campaign.common, "BENCH", tmp_path)  # --report writes RESULTS.md and figures here
    (tmp_path / "RESULTS.md").write_text("# Results\n")
    return tmp_path


SHORT = {"max_steps": 4, "eval_every": 2, "checkpoint_every": 2}
RUNS = [("default, validated every 10 steps", None),
        ("PEFT prompt tuning lr 3e-2, validated every 10 steps", {"method": "peft_prompt_tuning"}),
        ("PEFT prefix tuning", {"method": "peft_prefix_tuning", "num_virtual_tokens": 3}),
        ("PEFT prefix tuning, no MLP", {"method": "peft_prefix_tuning", "num_virtual_tokens": 3,
                                        "reparameterize": False})]


def test_each_kind_of_run_ends_in_a_result_and_a_report(campaign, sentiment, tiny_base):
    results = []
    for name, method in RUNS:
        result = campaign.run(name, "sentiment", method, SHORT, 1, tiny_base)
        results.append(result)
        assert result["steps"] == 4 and result["n"] == 6 and 0 <= result["score"] <= 1
        assert [p["step"] for p in result["curve"]] == [2, 4]
        assert result["method"] == (method or {}).get("method", "prompt_tuning")
        folder = sentiment / "runs" / campaign.run_id(name, "sentiment", 1)
        # checkpoints gone; the test answers and the trained prompt kept
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
            "predictions.jsonl", "prompts.safetensors", "result.json"]
        answers = list(read_jsonl(folder / "predictions.jsonl"))
        assert len(answers) == 6 and all("prediction" in a and "label" in a for a in answers)
        assert sum(a["score"] for a in answers) / 6 == pytest.approx(result["score"])
        table = pl.PromptTable.load(folder / "prompts.safetensors", tiny_base)
        learned = {"peft_prompt_tuning": "prompt_tuning", "peft_prefix_tuning": "deep_prompt_tuning"}
        assert table.tasks() == ["sentiment"]
        assert table.entry("sentiment").method == learned.get(result["method"], result["method"])
    # a finished run is read back, not trained again (its overrides no longer matter)
    again = campaign.run(RUNS[0][0], "sentiment", RUNS[0][1], {"max_steps": 1}, 1, tiny_base)
    assert again["steps"] == 4 and again["score"] == results[0]["score"]
    # every result is kept in the repository's folder too, and a run found there is not trained again
    kept = sorted((sentiment / "campaign_results").iterdir())
    assert kept == sorted(campaign.kept_result(campaign.run_id(name, "sentiment", 1)) for name, _ in RUNS)
    assert all(re.fullmatch(r"[\w.-]+", p.name) for p in kept)  # names any file system takes
    for folder in (sentiment / "runs").iterdir():
        (folder / "result.json").unlink()
    again = campaign.run(RUNS[1][0], "sentiment", RUNS[1][1], {"max_steps": 1}, 1, tiny_base)
    assert again == json.loads(json.dumps(results[1], default=str))
    campaign.report()
    text = (sentiment / "RESULTS.md").read_text()
    assert "PEFT prefix tuning, no MLP" in text and "first validation >= 0.88" in text and "of which training" in text


def test_curve_counts_training_time_apart_from_validation_time(campaign):
    history = [{"step": 1, "loss": 2.0, "seconds": 3.0}, {"step": 2, "loss": 1.5, "seconds": 3.0},
               {"step": 2, "val_loss": 1.4, "val/score": 0.5, "seconds": 10.0},
               {"step": 3, "loss": 1.0, "seconds": 3.0}, {"step": 3, "val/score": 0.7, "seconds": 10.0}]
    assert campaign.curve(history) == [{"step": 2, "seconds": 16.0, "train_seconds": 6.0, "score": 0.5},
                                       {"step": 3, "seconds": 29.0, "train_seconds": 9.0, "score": 0.7}]


def test_a_stopped_peft_run_resumes_to_the_same_result(campaign, sentiment, tiny_base, monkeypatch):
    name, method = RUNS[2]
    whole = campaign.run(name, "sentiment", method, SHORT, 1, tiny_base)
    folder = sentiment / "runs" / campaign.run_id(name, "sentiment", 1)
    (sentiment / "whole.json").write_text((folder / "result.json").read_text())
    (folder / "result.json").unlink()
    campaign.kept_result(folder.name).unlink()

    calls = {"n": 0, "die_at": 3}
    real_loss = campaign.common.peft_loss

    def counted(*args):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt("stopped")
        return real_loss(*args)

    monkeypatch.setattr(campaign.common, "peft_loss", counted)
    with pytest.raises(KeyboardInterrupt):
        campaign.run(name, "sentiment", method, SHORT, 1, tiny_base)
    assert (folder / "peft-checkpoint.pt").is_file() and not (folder / "result.json").exists()
    calls.update(n=0, die_at=None)
    resumed = campaign.run(name, "sentiment", method, SHORT, 1, tiny_base)
    assert calls["n"] == 2  # the resumed run computed steps 3-4 only
    keys = ("metrics", "score", "steps", "tokens")
    assert {k: resumed[k] for k in keys} == {k: whole[k] for k in keys}
    assert [p["score"] for p in resumed["curve"]] == [p["score"] for p in whole["curve"]]


def result(name: str, task: str, seed: int, score: float) -> dict:
    return {"name": name, "task": task, "seed": seed, "score": score, "interval95": [score - 0.1, score + 0.1],
            "primary": "accuracy" if task == "sentiment" else "f1", "n": 10, "steps": 4, "tokens": 40,
            "metrics": {"macro_f1": score, "ranked_accuracy": score, "exact_match": score}, "train_seconds": 9.0,
            "precision": "float32", "threads": 1, "curve": [{"step": 4, "seconds": 9.0, "score": score}]}


def test_report_keeps_the_rows_whose_results_it_does_not_have(campaign, sentiment, capsys):
    """Rows measured before results were kept in the repository stay as written; the rest are recomputed."""
    columns = ["task", "method", "metric", "score", "also (mean)", "seeds", "n test", "steps", "labelled tokens",
               "train s", "precision"]
    written = [["sentiment", "lost row", "accuracy", "0.777 ± 0.011", "macro_f1 0.7", "1,2,3", "10", "4", "40",
                "9", "float32"],
               ["sentiment", "partial row", "accuracy", "0.666 ± 0.022", "macro_f1 0.6", "1,2", "10", "4", "40",
                "9", "float32"],
               ["sentiment", "stale row", "accuracy", "0.111 [0.0, 0.2]", "macro_f1 0.1", "1 (single run)", "10",
                "4", "40", "9", "float32"]]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [columns, ["---"] * len(columns), *written])
    (sentiment / "RESULTS.md").write_text(f"# Results\n\n<!-- BEGIN campaign -->\nrows\n\n{table}\n"
                                          "<!-- END campaign -->\n")
    folder = sentiment / "campaign_results"
    folder.mkdir()
    for r in (result("partial row", "sentiment", 3, 0.9), result("stale row", "sentiment", 1, 0.5),
              result("new row", "sentiment", 1, 0.4), result("whole row", "squad", 1, 0.6)):
        campaign.kept_result(campaign.run_id(r["name"], r["task"], r["seed"])).write_text(json.dumps(r))
    campaign.report()
    rows = campaign.written_rows()
    assert list(rows) == [("sentiment", "lost row"), ("sentiment", "new row"), ("sentiment", "partial row"),
                          ("sentiment", "stale row"), ("squad", "whole row")]
    assert rows["sentiment", "lost row"]["score"] == "0.777 ± 0.011"
    assert rows["sentiment", "partial row"]["score"] == "0.666 ± 0.022" and rows["sentiment", "partial row"][
        "seeds"] == "1,2"
    assert rows["sentiment", "stale row"]["score"] == "0.500 [0.400, 0.600]"
    assert rows["sentiment", "new row"]["seeds"] == "1 (single run)"
    assert rows["squad", "whole row"]["score"] == "60.0 [50.0, 70.0]"
    err = capsys.readouterr().err
    assert "'lost row': no result here for seed(s) 1,2,3" in err and "'partial row'" in err
    assert "'stale row'" not in err
    # the figure of a task with rows kept as written is not redrawn without them
    assert not (sentiment / "campaign_sentiment.png").exists() and (sentiment / "campaign_squad.png").is_file()


def test_a_plan_may_hold_the_base_in_another_precision(campaign, monkeypatch):
    loaded, ran = [], []
    monkeypatch.setattr(campaign.pl, "load_base_model", lambda name, dtype: loaded.append(dtype) or f"base {dtype}")
    monkeypatch.setattr(campaign, "run", lambda name, task, method, overrides, seed, base: ran.append((name, base))
                        or {"primary": "accuracy", "score": 0.5, "n": 1, "train_seconds": 1.0})
    monkeypatch.setitem(campaign.PLANS, "precisions", [
        ("a", "sentiment", None, {}, (1, 2)), ("b", "sentiment", None, {campaign.BASE_DTYPE: "fp32"}, (1, 2))])
    campaign.main(["--plan", "precisions"])
    assert loaded == ["auto", "fp32"]  # once per precision, however many runs ask for it
    assert ran == [("a", "base auto"), ("a", "base auto"), ("b", "base fp32"), ("b", "base fp32")]
