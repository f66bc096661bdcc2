"""User mistakes in prompt and template settings raise promptlab's own errors, naming the setting and value.

`ConfigError` and `TemplateError` subclass `ValueError`, so code that caught ValueError keeps working; the
command line turns them (and only promptlab's errors) into one line on stderr and exit code 2.
"""
from __future__ import annotations

import pytest
import torch

from promptlab.errors import ConfigError, PromptlabError, TemplateError
from promptlab.prompts import EncoderConfig, initial_prompt
from promptlab.templates import TaskTemplate

EMBEDDINGS = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("settings, message", [
    ({"encoder": "gru"}, "encoder: unknown EncoderType 'gru'; choose one of ['lstm', 'mlp']"),
    ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
    ({"hidden_size": "256"}, "hidden_size must be an integer >= 1, got '256'"),
    ({"num_layers": True}, "num_layers must be an integer >= 1, got True"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1), got 1.0"),
    ({"dropout": "0.1"}, "dropout must be a number in [0, 1), got '0.1'"),
    ({"residual": "yes"}, "residual must be true or false, got 'yes'"),
])
def test_bad_encoder_settings(settings, message):
    with pytest.raises(ConfigError) as info:
        EncoderConfig(**settings)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PromptlabError)


@pytest.mark.parametrize("args, message", [
    ({"init": "zeros"}, "init: unknown PromptInit 'zeros'; choose one of ['text', 'vocab', 'random']"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be an integer >= 1, got 0"),
    ({"num_virtual_tokens": 2.5}, "num_virtual_tokens must be an integer >= 1, got 2.5"),
    ({"init": "text", "init_text": "a prompt"}, "init='text' needs the base model's tokenizer"),
])
def test_bad_prompt_init(args, message):
    args = {"num_virtual_tokens": 4, **args}
    with pytest.raises(ConfigError) as info:
        initial_prompt(args.pop("num_virtual_tokens"), EMBEDDINGS, None, **args)
    assert message in str(info.value)


def test_good_settings_still_work():
    assert EncoderConfig("MLP", hidden_size=16, dropout=0.1).encoder == "mlp"
    assert initial_prompt(3, EMBEDDINGS, init="random", generator=torch.Generator().manual_seed(1)).shape == (3, 8)


@pytest.mark.parametrize("key, value, message", [
    ("total_virtual_tokens", True, "total_virtual_tokens must be an integer >= 0, got True"),
    ("virtual_token_splits", [True, 1], "virtual_token_splits must be positive integers, got [True, 1]"),
    ("answer_only_loss", "yes", "answer_only_loss must be true or false, got 'yes'"),
    ("answer_field", 3, "answer_field must be a field name or null, got 3"),
])
def test_bad_template_counts_and_flags(key, value, message):
    data = {"taskname": "t", "prompt_template": "<|VIRTUAL_PROMPT_0|> {a} x: {b}", "total_virtual_tokens": 2,
            "answer_field": "b", key: value}
    with pytest.raises(TemplateError) as info:
        TaskTemplate.from_dict(data)
    assert message in str(info.value) and "task 't'" in str(info.value)
