"""Engines built from settings: shared engines per role, chat templates from files, and
configuration errors that say how to fix them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.engines import ConfigurationError, Engines, read_chat_template
from services.settings import Settings


def test_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert read_chat_template(str(config)) == "{{ messages[0]['content'] }}"
    named = tmp_path / "named.json"
    named.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": "y"},
                ]
            }
        )
    )
    assert read_chat_template(str(named)) == "y"
    plain = tmp_path / "t.jinja"
    plain.write_text("{{ bos_token }}")
    assert read_chat_template(str(plain)) == "{{ bos_token }}"


@pytest.mark.parametrize("content", [json.dumps({"bos_token": "<s>"}), None])
def test_bad_chat_template_files_are_configuration_errors(tmp_path: Path, content) -> None:
    path = tmp_path / "tokenizer_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=r"tokenizer_config|cannot read"):
        read_chat_template(str(path))


def test_sglang_without_url_says_which_variable_to_set() -> None:
    engines = Engines(Settings(coordinator_backend="sglang", coordinator_url=None))
    with pytest.raises(ConfigurationError, match="TANDEM_COORDINATOR_URL"):
        engines.backend("coordinator")


def test_trained_policy_without_artifact_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="TANDEM_CLASSIFIER_ARTIFACT"):
        Engines(Settings(classifier_artifact=None)).policy("trained")


def test_feature_model_defaults_to_the_executor() -> None:
    settings = Settings(executor_backend="sglang", executor_url="http://x:1", executor_model="m")
    assert settings.model("classifier").engine_key == settings.model("executor").engine_key
