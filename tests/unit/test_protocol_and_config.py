"""Parsing of client frames, and per-environment configuration rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from parley.config import Environment, LLMProvider, Settings
from parley.protocol import (
    ProtocolViolation,
    Resume,
    UserMessage,
    json_schema,
    parse_client_message,
)


def test_parses_each_client_message_type() -> None:
    message = parse_client_message(
        json.dumps({"type": "user_message", "content": "hi", "client_message_id": "c", "x": 1})
    )
    assert message == UserMessage(type="user_message", content="hi", client_message_id="c")
    resume = parse_client_message('{"type": "resume", "thread_id": "t", "after_seq": 0}')
    assert resume == Resume(type="resume", thread_id="t", after_seq=0)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "invalid_json"),
        ("\x00", "invalid_json"),
        ("null", "invalid_message"),
        ('{"type": null}', "invalid_message"),
        ('{"type": "USER_MESSAGE"}', "unknown_type"),
        ('{"type": "user_message", "content": ["a"]}', "invalid_message"),
    ],
)
def test_violations_carry_the_protocol_code(text: str, code: str) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        parse_client_message(text)
    assert caught.value.code == code


def test_json_schema_covers_both_directions() -> None:
    schema = json_schema()
    client = json.dumps(schema["client"])
    server = json.dumps(schema["server"])
    for kind in ("user_message", "stop_agent", "resume", "ping", "pong"):
        assert kind in client
    for kind in ("system_message", "agent_started", "tool_completed", "agent_cancelled"):
        assert kind in server


def test_committed_json_schema_is_current() -> None:
    committed = Path(__file__).parents[2] / "docs" / "protocol.schema.json"
    assert json.loads(committed.read_text()) == json.loads(json.dumps(json_schema())), (
        "docs/protocol.schema.json is stale: run `make schema`"
    )


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_development_needs_nothing_but_a_model() -> None:
    assert settings().problems() == []


@pytest.mark.parametrize("environment", [Environment.STAGING, Environment.PRODUCTION])
def test_deployed_environments_require_explicit_dependencies(environment: Environment) -> None:
    problems = settings(environment=environment).problems()
    assert any("DATABASE_URL" in p for p in problems)
    assert any("JWT_SECRET or AUTH_SERVICE_URL" in p for p in problems)
    assert any("LLM_PROVIDER" in p for p in problems)
    complete = settings(
        environment=environment,
        database_url="postgresql+asyncpg://db/parley",
        jwt_secret=SecretStr("s" * 40),
        llm_provider=LLMProvider.OPENAI,
        llm_model="gpt-4o-mini",
        llm_api_key=SecretStr("sk-test"),
    )
    assert complete.problems() == []


def test_short_secrets_and_bad_urls_are_reported() -> None:
    problems = settings(
        environment=Environment.PRODUCTION,
        jwt_secret=SecretStr("short"),
        llm_base_url="ftp://x",
        auth_service_url="nope",
    ).problems()
    assert any("at least 32" in p for p in problems)
    assert any("LLM_BASE_URL" in p for p in problems)
    assert any("AUTH_SERVICE_URL" in p for p in problems)


def test_an_instance_lease_of_fewer_than_three_heartbeats_is_reported() -> None:
    problems = settings(instance_heartbeat_s=5, instance_lease_s=10).problems()
    assert any("INSTANCE_LEASE_S" in p for p in problems)
    assert settings(instance_heartbeat_s=2, instance_lease_s=6).problems() == []


def test_comma_separated_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_ORIGINS", "https://a.example, https://b.example,")
    assert Settings().allowed_origins == ["https://a.example", "https://b.example"]
