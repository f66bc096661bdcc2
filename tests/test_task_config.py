"""A task is its configuration: a task defined only in YAML trains by its recipe, is scored by its own
metric with its own label ranking, and mixes with the tutorial tasks in one generated batch."""
import pytest

import promptlab as pl
from promptlab.evaluate import evaluate

TASK_YAML = """
tasks:
  - taskname: topic
    prompt_template: "<|VIRTUAL_PROMPT_0|> Request: {text}\\nScenario: {category}"
    total_virtual_tokens: 4
    answer_field: category
    metric: classification
    labels: [alarm, music, weather]
    max_new_tokens: 3
    stop: ["\\n"]
    init_text: "Which scenario is this request about"
    instruction: "Name the scenario of the request: alarm, music or weather.\\n"
    recipe:
      method: deep_prompt_tuning
      num_virtual_tokens: 3
      reparameterize: false
      training: {max_steps: 3, batch_size: 4, deep_prompt_lr: 0.05}
"""
RECORDS = [{"taskname": "topic", "text": t, "category": c} for t, c in [
    ("wake me up at seven", "alarm"), ("play some jazz", "music"), ("will it rain today", "weather"),
    ("set an alarm for noon", "alarm"), ("next song please", "music"), ("is it cold outside", "weather")]]


@pytest.fixture
def topic(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(TASK_YAML)
    return pl.load_tasks(path)["topic"]


def test_a_task_defined_only_in_yaml_trains_scores_and_mixes(tiny_base, topic):
    tasks = {**pl.default_tasks(), "topic": topic}
    model = pl.PromptLearningModel(tiny_base, tasks)
    model.add_task("topic")  # the recipe: a deep prompt of 3 positions, without the MLP
    assert model.method_of("topic") == "deep_prompt_tuning" and model.deep_prompts["topic"].num_virtual_tokens == 3
    model.add_task("sentiment")  # the tutorial recipe: prompt tuning
    config = pl.TrainConfig.from_recipe(topic, progress=False, eval_every=0)
    assert (config.max_steps, config.batch_size, config.deep_prompt_lr) == (3, 4, 0.05)
    model.freeze(["sentiment"])  # only the new task trains here
    history = pl.Trainer(model, RECORDS, None, config).fit()
    assert len([h for h in history if "loss" in h]) == 3
    results = evaluate(model, RECORDS)["topic"]
    assert {"accuracy", "macro_f1", "ranked_accuracy", "n"} <= set(results)  # its own metric and ranking
    mixed = [{"taskname": "topic", "text": "play a song"}, {"taskname": "sentiment", "sentence": "Profit rose ."}]
    together = model.generate(mixed, max_new_tokens=3)
    assert together == [model.generate([r], max_new_tokens=3)[0] for r in mixed]


def test_recipes_that_disagree_must_be_settled(topic):
    other = pl.TaskTemplate(**{**topic.to_dict(), "taskname": "other", "recipe": {
        "method": "prompt_tuning", "training": {"max_steps": 9}}})
    with pytest.raises(pl.ConfigError, match="disagree on max_steps: 3 and 9"):
        pl.TrainConfig.from_recipe([topic, other])
    assert pl.TrainConfig.from_recipe([topic, other], max_steps=5).max_steps == 5
    bad = pl.TaskTemplate(**{**topic.to_dict(), "recipe": {"method": "p_tuning", "training": {"max_stepz": 1}}})
    with pytest.raises(pl.ConfigError, match=r"recipe of task\(s\) topic: unknown training setting\(s\) \['max_stepz'\]"):
        pl.TrainConfig.from_recipe(bad)


def test_the_tutorial_tasks_carry_their_rules(tasks):
    assert tasks["sentiment"].metric == "classification" and tasks["sentiment"].labels == ["negative", "neutral", "positive"]
    assert tasks["intent_and_slot"].metric == "intent_and_slot" and tasks["intent_and_slot"].stop == []
    assert tasks["squad"].metric == "squad" and tasks["squad"].truncate_field == "context"
    for t in tasks.values():
        assert t.init_text and t.instruction and t.recipe["method"] in ("prompt_tuning", "p_tuning", "deep_prompt_tuning")


def test_table_keeps_the_richer_template(tiny_base, topic, tmp_path):
    model = pl.PromptLearningModel(tiny_base, {"topic": topic})
    model.add_task("topic")
    model.freeze()
    model.prompt_table.save(tmp_path / "t.safetensors")
    loaded = pl.PromptTable.load(tmp_path / "t.safetensors", tiny_base).entry("topic").template
    assert (loaded.metric, loaded.labels, loaded.stop, loaded.recipe) == ("classification", topic.labels, ["\n"], topic.recipe)
