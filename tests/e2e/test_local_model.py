"""The embedded default: in development with no LLM configured, the bundled SmolLM2 model
answers for real, offline, through the same client code as a hosted provider."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import SpawnServer
from tests.harness import base_env, parley_command, unique_user

pytestmark = pytest.mark.local_model

# Development with no model configured: the bundled local model.
BUNDLED_MODEL = {
    "ENVIRONMENT": "development",
    "LLM_PROVIDER": "",
    "LLM_MODEL": "",
    "LLM_BASE_URL": "",
    # A loaded 2-core machine can take many seconds to the first token (the tests' default of
    # 10 s is for the scripted server); the default in real use is 30 s.
    "LLM_TIMEOUT_S": "60",
}


async def test_development_with_no_llm_configured_streams_a_real_answer_from_the_bundled_model(
    spawn: SpawnServer,
) -> None:
    server = spawn(**BUNDLED_MODEL, LLM_MAX_TOKENS="48", STARTUP_TIMEOUT_S="60")
    async with server.connect(unique_user()) as client:
        assert client.hello["model"] == "local:SmolLM2-135M-Instruct"
        accepted = await client.ask("Name one colour of the sky.")
        events = await client.run_events(accepted["run_id"], timeout=60)
        # And again in the same thread: the model answers twice in a row, the history included.
        again = await client.ask("And one colour of grass?", thread_id=accepted["thread_id"])
        second = await client.run_events(again["run_id"], timeout=60)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "agent_started"
    assert "agent_thinking" in kinds
    deltas = [e["text"] for e in events if e["type"] == "agent_message_delta"]
    assert len(deltas) > 1  # streamed, not delivered at once
    assert kinds[-1] == "agent_completed"
    assert events[-1]["content"] == "".join(deltas)
    assert events[-1]["content"].strip()
    # Real counts from the model's own tokenizer, not zeros: the instructions alone are over
    # 50 tokens, and the answer is at most LLM_MAX_TOKENS.
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 50, usage
    assert 0 < usage["output_tokens"] <= 48, usage
    assert second[-1]["type"] == "agent_completed", second[-1]
    assert second[-1]["content"].strip()
    # Its prompt holds the first question and answer too.
    assert second[-1]["usage"]["input_tokens"] > usage["input_tokens"] + usage["output_tokens"]
    async with httpx.AsyncClient(base_url=server.http) as http:
        llm = (await http.get("/health/ready")).json()["components"]["llm"]
    assert llm["status"] == "ok"
    assert llm["provider"] == "local"
    assert "135M" in llm["description"]


def test_a_local_model_that_cannot_load_fails_startup_in_llm_saying_what_to_do(
    tmp_path: Path,
) -> None:
    # A file llama.cpp cannot load: the runtime starts and its process exits, the way a build
    # for the wrong CPU dies. Startup must stop there, not serve a model that cannot answer.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    done = subprocess.run(
        parley_command("serve"),
        env=base_env(
            tmp_path / "data",
            PORT="0",  # it never gets to serve: no port to race other processes for
            ENVIRONMENT="development",
            LLM_PROVIDER="local",
            LLM_MODEL_PATH=str(broken),
            STARTUP_TIMEOUT_S="60",
        ),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    first = done.stderr.splitlines()[0]
    assert done.returncode == 1
    assert first.startswith("startup failed in phase llm: the local model "), done.stderr
    assert re.search(r"its process (exited with status \d+|killed by signal \w+)", first), first
    assert "while loading broken.gguf" in first
    assert "LLM_PROVIDER=openai" in first  # what to do instead
    assert "Traceback" not in done.stderr
