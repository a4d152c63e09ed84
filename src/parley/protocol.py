"""The wire format of protocol v1 (docs/protocol.md): every client message and server frame as a
pydantic model.

This module is the single source of the format. Client frames are parsed once at the edge by
`parse_client_message`, which turns every malformed input into a `ProtocolViolation` carrying
the protocol error code (`invalid_json`, `invalid_message`, `unknown_type`) and a message that
names the offending field. Every value a client sends is bounded to what every supported
database can store: strings hold no NUL and no lone surrogate, integers fit the column they
are compared with, and JSON nests at most `MAX_JSON_DEPTH` levels.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
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
# `seq` is an INTEGER column: 32 bits on PostgreSQL, so that is the largest `after_seq` any
# backend can compare with (a thread never gets near two billion events).
MAX_SEQ = 2**31 - 1
# A client message is a flat object; this leaves room for nested extension fields while
# keeping the parser far from Python's recursion limit.
MAX_JSON_DEPTH = 32
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# A compact JWT is three base64url parts; real ones stay under a few kilobytes, even with
# many claims. The pattern refuses whitespace, controls and anything beyond ASCII before the
# token reaches the JWT library (which would fail on a lone surrogate with no clear message).
MAX_TOKEN_CHARS = 16384
_TOKEN_CHARACTERS = re.compile(r"[!-~]+")


def utc_now_iso() -> str:
    """Now, as `utc_iso` writes it. Every frame is stamped, so this is on the hot path: the
    date and time to the second are formatted once a second, only the milliseconds each call
    (a quarter of what `datetime.isoformat` costs)."""
    global _second_text
    now = time.time()
    second = int(now)
    cached = _second_text  # one read: another thread may replace it (database threads stamp)
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


_second_text: tuple[int, str] = (-1, "")  # the second `utc_now_iso` formatted last, as text


def utc_iso(moment: datetime) -> str:
    """`moment` as the wire writes times: ISO-8601 UTC with milliseconds and a `Z` suffix."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- client messages


def _storable(value: str) -> str:
    # PostgreSQL cannot store NUL in text, and no database can store a lone surrogate (it is
    # not encodable as UTF-8): refuse both here, alike on every backend.
    found = _UNSTORABLE.search(value)
    if found is not None:
        what = "a NUL character" if found.group() == "\x00" else "a lone surrogate"
        raise ValueError(f"must not contain {what} (at index {found.start()})")
    return value


_Storable = AfterValidator(_storable)
Content = Annotated[StrictStr, Field(min_length=1, max_length=MAX_CONTENT_CHARS), _Storable]
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=64), _Storable]
ClientMessageId = Annotated[StrictStr, Field(min_length=1, max_length=128), _Storable]


class _ClientMessage(BaseModel):
    # Unknown extra fields are ignored so that newer clients keep working with this server.
    model_config = ConfigDict(frozen=True, extra="ignore")


class UserMessage(_ClientMessage):
    type: Literal["user_message"]
    content: Content
    thread_id: Identifier | None = None
    client_message_id: ClientMessageId | None = None
    agent: Identifier | None = None


class StopAgent(_ClientMessage):
    type: Literal["stop_agent"]
    run_id: Identifier


class Resume(_ClientMessage):
    type: Literal["resume"]
    thread_id: Identifier
    after_seq: Annotated[StrictInt, Field(ge=0, le=MAX_SEQ)]


def _token_characters(value: str) -> str:
    if _TOKEN_CHARACTERS.fullmatch(value) is None:
        raise ValueError("must be a compact JWT: visible ASCII characters only, no spaces")
    return value


Token = Annotated[
    StrictStr,
    # The pattern is for the schema's readers; the validator gives the clearer message.
    Field(
        min_length=1,
        max_length=MAX_TOKEN_CHARS,
        json_schema_extra={"pattern": f"^{_TOKEN_CHARACTERS.pattern}$"},
    ),
    AfterValidator(_token_characters),
]


class Authenticate(_ClientMessage):
    """Replace the connection's token (before it expires) with a newer one of the same user."""

    type: Literal["authenticate"]
    token: Token


class Ping(_ClientMessage):
    type: Literal["ping"]


class Pong(_ClientMessage):
    type: Literal["pong"]


ClientMessage = Annotated[
    UserMessage | StopAgent | Resume | Authenticate | Ping | Pong, Field(discriminator="type")
]
CLIENT_TYPES = frozenset({"user_message", "stop_agent", "resume", "authenticate", "ping", "pong"})
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


class ProtocolViolation(Exception):
    """A client frame that cannot be accepted; `code` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def parse_client_message(text: str) -> ClientMessage:
    """The typed message in `text`; every other outcome is a `ProtocolViolation`."""
    too_deep = ProtocolViolation(
        "invalid_json", f"frame is nested deeper than {MAX_JSON_DEPTH} levels"
    )
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # the C parser hit the interpreter's recursion limit
        raise too_deep from None
    except ValueError as exc:  # also numbers over Python's 4300-digit limit
        raise ProtocolViolation("invalid_json", f"frame is not valid JSON: {exc}") from None
    # Counting brackets is cheap; only a frame with many of them is walked.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH):
        raise too_deep
    if not isinstance(data, dict):
        raise ProtocolViolation("invalid_message", "a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation("invalid_message", "field 'type' is required and must be a string")
    if kind not in CLIENT_TYPES:
        known = ", ".join(sorted(CLIENT_TYPES))
        shown = repr(kind) if len(kind) <= 64 else repr(kind[:64]) + "…"
        raise ProtocolViolation("unknown_type", f"unknown message type {shown}; known: {known}")
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolViolation("invalid_message", _describe(exc)) from None


def _deeper_than(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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
    # When the connection's token expires (its `exp`): the connection is closed with 4401
    # then, unless the client sends `authenticate` with a newer token first.
    token_expires_at: str


class Authenticated(ServerFrame):
    """The answer to `authenticate`: the connection now runs on the new token."""

    type: Literal["authenticated"] = "authenticated"
    user_id: str
    token_expires_at: str


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

    def to_json_stored(self, seq: int, event_id: str) -> str:
        """The frame of this event once stored as `seq` with `event_id`: the same text as
        `self.model_copy(update={"seq": seq, "event_id": event_id}).to_json()`, without the
        copy, which cost more than the rest of storing a streamed delta. The envelope is
        serialized before any field of a subclass and no string can hold it unescaped, so
        its first occurrence is the envelope's."""
        frame = self.to_json()
        if self.seq != 0 or self.event_id != "" or _UNSTORED_ENVELOPE not in frame:
            return self.model_copy(update={"seq": seq, "event_id": event_id}).to_json()
        stored = f'"seq":{seq},"event_id":{json.dumps(event_id)}'
        return frame.replace(_UNSTORED_ENVELOPE, stored, 1)


_UNSTORED_ENVELOPE = '"seq":0,"event_id":""'


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

    def to_json(self) -> str:
        # An ok completion carries `result` even when the tool returned nothing (JSON null); an
        # error carries `error` and no `result` (docs/protocol.md). Every other field is set.
        if self.status == "ok":
            return self.model_dump_json(exclude={"error"})
        return self.model_dump_json(exclude={"result"})


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
    | Authenticated
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
