"""How the event log writes a stored event's frame, id and time stamp without pydantic's copy:
the text must be exactly what the copy would have produced, for every kind of run event and
for content that imitates the envelope."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime

import pytest

from parley.protocol import (
    AgentCancelled,
    AgentCompleted,
    AgentError,
    AgentMessageDelta,
    AgentStarted,
    AgentThinking,
    RunEvent,
    ToolCompleted,
    ToolExecuting,
    Usage,
    utc_iso,
    utc_now_iso,
)
from parley.store.queries import new_id, new_ids

ENVELOPE_LOOKALIKE = '"seq":0,"event_id":""'
TAG = {"thread_id": 'th"read\\', "run_id": "run-1"}

EVENTS: list[RunEvent] = [
    AgentStarted(agent="assistant", message_id="m1", **TAG),
    AgentThinking(text=ENVELOPE_LOOKALIKE, **TAG),
    ToolExecuting(tool_call_id="c1", tool="calc", arguments={"seq": 0, "event_id": ""}, **TAG),
    ToolCompleted(
        tool_call_id="c1",
        tool="calc",
        status="ok",
        result={"seq": 0, "event_id": "", "nested": [ENVELOPE_LOOKALIKE]},
        duration_ms=3,
        **TAG,
    ),
    ToolCompleted(
        tool_call_id="c2", tool="calc", status="error", error="boom", duration_ms=1, **TAG
    ),
    AgentMessageDelta(text='{"seq":0,"event_id":""} ünïcode \u2028 \x01 "quoted"', **TAG),
    AgentCompleted(
        message_id="m2", content="done", usage=Usage(input_tokens=3), duration_ms=9, **TAG
    ),
    AgentError(code="llm_unavailable", message="down", retryable=True, **TAG),
    AgentCancelled(reason="user_requested", **TAG),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_a_stored_frame_is_the_copy_s_frame(event: RunEvent) -> None:
    seq, event_id = 41, str(uuid.uuid4())
    expected = event.model_copy(update={"seq": seq, "event_id": event_id}).to_json()
    assert event.to_json_stored(seq, event_id) == expected
    frame = json.loads(expected)
    assert (frame["seq"], frame["event_id"]) == (seq, event_id)


def test_an_event_already_numbered_is_numbered_again_by_copy() -> None:
    event = AgentThinking(text="x", seq=7, event_id="old", **TAG)
    frame = json.loads(event.to_json_stored(8, "new"))
    assert (frame["seq"], frame["event_id"]) == (8, "new")


def test_new_ids_are_distinct_time_ordered_version_7_uuids() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_ids(500)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 500
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after  # the milliseconds come first
    later = new_id()
    time.sleep(0.002)
    assert new_id()[:13] > later[:13]  # a later millisecond sorts after
    assert new_ids(0) == []


def test_the_time_stamp_is_utc_iso_with_milliseconds() -> None:
    before = utc_iso(datetime.now(UTC))
    stamped = utc_now_iso()
    after = utc_iso(datetime.now(UTC))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamped)
    assert before <= stamped <= after
