"""Answers the agent loop cannot use are the model's fault (`llm_error`), never `internal_error`."""

from __future__ import annotations

import uuid

from tests.fakes.llm_server import FakeLLM, Text
from tests.harness import ServerProcess, unique_user


async def test_empty_model_answer_ends_the_run_with_llm_error_saying_what_the_model_did(
    server: ServerProcess, fake_llm: FakeLLM
) -> None:
    trigger = fake_llm.script(f"T{uuid.uuid4().hex[:10]}", Text(""))
    async with server.connect(unique_user()) as client:
        accepted = await client.ask(f"say nothing {trigger}")
        events = await client.run_events(accepted["run_id"])
    terminal = events[-1]
    assert terminal["type"] == "agent_error"
    assert terminal["code"] == "llm_error"
    message = terminal["message"]
    assert message.startswith("the language model gave no usable answer (Exceeded maximum"), message
    assert "asked again: Please return text" in message  # what the model did: no text
    assert terminal["retryable"] is True
    assert len(fake_llm.requests_with(trigger)) >= 2  # the loop asked again before giving up
