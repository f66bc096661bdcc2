"""The command line for one's own data and for PEFT: --data with a column mapping, table export-peft and
import-peft, on the tiny model and the bundled samples."""
import json

import pytest
import yaml

from promptlab.cli import main
from promptlab.data import read_jsonl
from promptlab.table import PromptTable

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A table with a prompt-tuned sentiment task and a deep-prompted intent_and_slot task."""
    root = tmp_path_factory.mktemp("own")
    for task in ("sentiment", "intent_and_slot"):
        assert main(["prepare", task, "--out", str(root / task), "--samples"]) == 0
    config = {"model": "tiny", "output_dir": str(root / "run"),
              "methods": [{"method": "prompt_tuning", "task": "sentiment"},
                          {"method": "deep_prompt_tuning", "task": "intent_and_slot", "num_virtual_tokens": 4,
                           "hidden_size": 16}],
              "data": {"train": [str(root / "sentiment/train.jsonl"), str(root / "intent_and_slot/train.jsonl")]},
              "training": {"max_steps": 2, "batch_size": 4, "eval_every": 0, "progress": False}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "run.yaml")]) == 0
    return root


def test_evaluate_and_generate_read_a_csv_with_a_column_mapping(trained, tmp_path, capsys):
    rows = read_jsonl(trained / "sentiment/test.jsonl")[:3]
    csv = tmp_path / "news.csv"
    csv.write_text("headline,tone\n" + "".join(f"\"{r['sentence']}\",{r['label']}\n" for r in rows))
    table = str(trained / "run" / "prompts.safetensors")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--prompts", table, "--model", "tiny", "--task", "sentiment",
                 "--data", f"{csv}:sentence=headline,label=tone", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["sentiment"]["n"] == 3
    predictions = tmp_path / "pred.jsonl"
    assert main(["generate", "--prompts", table, "--model", "tiny", "--task", "sentiment",
                 "--input", f"{csv}:sentence=headline", "--output", str(predictions), "--max-new-tokens", "2"]) == 0
    assert [p["sentence"] for p in read_jsonl(predictions)] == [r["sentence"] for r in rows]
    capsys.readouterr()
    assert main(["evaluate", "--prompts", table, "--model", "tiny", "--task", "sentiment",
                 "--data", f"{csv}:sentence=title"]) == 2
    assert "no column(s) ['title', 'label'] for task 'sentiment'" in capsys.readouterr().err
    assert main(["evaluate", "--prompts", table, "--model", "tiny", "--data", str(csv)]) == 2
    assert "with --task" in capsys.readouterr().err


def test_export_then_import_peft_gives_the_same_answers(trained, tmp_path, capsys):
    table = str(trained / "run" / "prompts.safetensors")
    for task in ("sentiment", "intent_and_slot"):
        assert main(["table", "export-peft", table, task, str(tmp_path / task), "--model", "tiny"]) == 0
        config = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert config["peft_type"] == {"sentiment": "PROMPT_TUNING", "intent_and_slot": "PREFIX_TUNING"}[task]
    copy = str(tmp_path / "imported.safetensors")
    for task in ("sentiment", "intent_and_slot"):
        assert main(["table", "import-peft", copy, task, str(tmp_path / task), "--model", "tiny"]) == 0
    original, imported = PromptTable.load(table), PromptTable.load(copy)
    assert {t: imported.entry(t).method for t in imported} == {t: original.entry(t).method for t in original}
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"taskname": "sentiment", "sentence": "Profit rose ."}) + "\n"
                       + json.dumps({"taskname": "intent_and_slot", "utterance": "wake me up at six"}) + "\n")
    outs = []
    for path in (table, copy):
        out = tmp_path / f"out{len(outs)}.jsonl"
        assert main(["generate", "--prompts", path, "--model", "tiny", "--input", str(records), "--output", str(out),
                     "--max-new-tokens", "4"]) == 0
        outs.append([r["prediction"] for r in read_jsonl(out)])
    assert outs[0] == outs[1]
    capsys.readouterr()
    assert main(["table", "import-peft", copy, "sentiment", str(tmp_path / "sentiment"), "--model", "tiny"]) == 2
    assert "already in the prompt table" in capsys.readouterr().err
    assert main(["table", "export-peft", table, "sentiment", "--model", "tiny"]) == 2
    assert "needs TABLE TASK DIR" in capsys.readouterr().err
