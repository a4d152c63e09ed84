"""The wire format of PROTOCOL.md v1: every client message and server frame as a pydantic model.

This module is the single source of the format. Client frames are parsed once at the edge by
`parse_client_message`, which turns every malformed input into a `ProtocolViolation` carrying
the protocol error code (`invalid_json`, `invalid_message`, `unknown_type`) and a message that
names the offending field.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

PROTOCOL_VERSION = "parley.v1"
MAX_CONTENT_CHARS = 32000


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- client messages


class _ClientMessage(BaseModel):
    # Unknown extra fields are ignored so that newer clients keep working with this server.
    model_config = ConfigDict(frozen=True, extra="ignore")


class UserMessage(_ClientMessage):
    type: Literal["user_message"]
    content: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS)]
    thread_id: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    client_message_id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    agent: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None


class StopAgent(_ClientMessage):
    type: Literal["stop_agent"]
    run_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]


class Resume(_ClientMessage):
    type: Literal["resume"]
    thread_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    after_seq: Annotated[StrictInt, Field(ge=0)]


class Ping(_ClientMessage):
    type: Literal["ping"]


class Pong(_ClientMessage):
    type: Literal["pong"]


ClientMessage = Annotated[
    UserMessage | StopAgent | Resume | Ping | Pong, Field(discriminator="type")
]
CLIENT_TYPES = frozenset({"user_message", "stop_agent", "resume", "ping", "pong"})
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


class ProtocolViolation(Exception):
    """A client frame that cannot be accepted; `code` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_client_message(text: str) -> ClientMessage:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolViolation("invalid_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolViolation("invalid_message", "a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation("invalid_message", "field 'type' is required and must be a string")
    if kind not in CLIENT_TYPES:
        known = ", ".join(sorted(CLIENT_TYPES))
        raise ProtocolViolation("unknown_type", f"unknown message type {kind!r}; known: {known}")
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolViolation("invalid_message", _describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        # The first location element is the union tag; the field follows it.
        location = [str(p) for p in error["loc"][1:]] or [str(p) for p in error["loc"]]
        parts.append(f"field '{'.'.join(location)}': {error['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- server frames


class ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    ts: str = Field(default_factory=utc_now_iso)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class SystemMessage(ServerFrame):
    type: Literal["system_message"] = "system_message"
    connection_id: str
    user_id: str
    protocol: str = PROTOCOL_VERSION
    server_version: str
    heartbeat_interval_s: float
    model: str | None = None


class PingFrame(ServerFrame):
    type: Literal["ping"] = "ping"


class PongFrame(ServerFrame):
    type: Literal["pong"] = "pong"


class ErrorFrame(ServerFrame):
    type: Literal["error"] = "error"
    code: str
    message: str
    client_message_id: str | None = None


class MessageAccepted(ServerFrame):
    type: Literal["message_accepted"] = "message_accepted"
    client_message_id: str | None
    thread_id: str
    message_id: str
    run_id: str

    def to_json(self) -> str:
        # client_message_id is part of the contract even when the client sent none (null).
        return self.model_dump_json()


class ResumeComplete(ServerFrame):
    type: Literal["resume_complete"] = "resume_complete"
    thread_id: str
    last_seq: int


# --------------------------------------------------------------------------- run events


class RunEvent(ServerFrame):
    """An event of one run. The envelope (thread, run, seq, event id) is set by the event log."""

    thread_id: str = ""
    run_id: str = ""
    seq: int = 0
    event_id: str = ""


class AgentStarted(RunEvent):
    type: Literal["agent_started"] = "agent_started"
    agent: str
    message_id: str


class AgentThinking(RunEvent):
    type: Literal["agent_thinking"] = "agent_thinking"
    text: str


class ToolExecuting(RunEvent):
    type: Literal["tool_executing"] = "tool_executing"
    tool_call_id: str
    tool: str
    arguments: dict[str, Any]


class ToolCompleted(RunEvent):
    type: Literal["tool_completed"] = "tool_completed"
    tool_call_id: str
    tool: str
    status: Literal["ok", "error"]
    result: Any = None
    error: str | None = None
    duration_ms: int


class AgentMessageDelta(RunEvent):
    type: Literal["agent_message_delta"] = "agent_message_delta"
    text: str


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0


class AgentCompleted(RunEvent):
    type: Literal["agent_completed"] = "agent_completed"
    message_id: str
    content: str
    usage: Usage
    duration_ms: int


class AgentError(RunEvent):
    type: Literal["agent_error"] = "agent_error"
    code: str
    message: str
    retryable: bool


class AgentCancelled(RunEvent):
    type: Literal["agent_cancelled"] = "agent_cancelled"
    reason: str


TerminalEvent = AgentCompleted | AgentError | AgentCancelled

ServerMessage = Annotated[
    SystemMessage
    | PingFrame
    | PongFrame
    | ErrorFrame
    | MessageAccepted
    | ResumeComplete
    | AgentStarted
    | AgentThinking
    | ToolExecuting
    | ToolCompleted
    | AgentMessageDelta
    | AgentCompleted
    | AgentError
    | AgentCancelled,
    Field(discriminator="type"),
]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of both directions, exported into docs/protocol.schema.json."""
    return {
        "client": TypeAdapter(ClientMessage).json_schema(),
        "server": TypeAdapter(ServerMessage).json_schema(),
    }
