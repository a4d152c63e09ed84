"""The embedded default: in development with no LLM configured, the bundled SmolLM2 model
answers for real, offline, through the same client code as a hosted provider."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.harness import unique_user

pytestmark = pytest.mark.local_model


async def test_development_with_no_llm_configured_streams_a_real_answer_from_the_bundled_model(
    spawn: SpawnServer,
) -> None:
    server = spawn(
        ENVIRONMENT="development",
        LLM_PROVIDER="",
        LLM_MODEL="",
        LLM_BASE_URL="",
        # A loaded 2-core machine can take many seconds to the first token (the tests' default
        # of 10 s is for the scripted server); the default in real use is 30 s.
        LLM_TIMEOUT_S="60",
        LLM_MAX_TOKENS="48",
        STARTUP_TIMEOUT_S="60",
    )
    async with server.connect(unique_user()) as client:
        assert client.hello["model"] == "local:SmolLM2-135M-Instruct"
        accepted = await client.ask("Name one colour of the sky.")
        events = await client.run_events(accepted["run_id"], timeout=60)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "agent_started"
    assert "agent_thinking" in kinds
    deltas = [e["text"] for e in events if e["type"] == "agent_message_delta"]
    assert len(deltas) > 1  # streamed, not delivered at once
    assert kinds[-1] == "agent_completed"
    assert events[-1]["content"] == "".join(deltas)
    assert events[-1]["content"].strip()
    async with httpx.AsyncClient(base_url=server.http) as http:
        llm = (await http.get("/health/ready")).json()["components"]["llm"]
    assert llm["status"] == "ok"
    assert llm["provider"] == "local"
    assert "135M" in llm["description"]
