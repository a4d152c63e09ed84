"""uvicorn's protocols as Parley serves them: its WebSocket protocol (websockets' sans-I/O
implementation) with one addition, a text frame written at once from a plain function call;
and its HTTP protocol, letting go of its parser when it hands a connection to the WebSocket
protocol.

Through ASGI a frame goes from the connection's sender task through Starlette's `WebSocket`,
its exception middleware's send wrapper and uvicorn's `send` coroutine: a task wake-up and five
Python frames for every streamed delta. Without them the event loop's CPU at 200 streams fell
by a sixth (bench/README.md). The transport uses `write_text` when nothing is queued before the
frame and falls back to ASGI otherwise, so the order of frames and the flow control (a client
that stops reading fills its transport's buffer, then its outbox) are unchanged.

The extension is offered in the ASGI scope as `extensions["parley.write_text"]`
(`delivery.WRITE_TEXT_EXTENSION`); served by anything else (another uvicorn protocol, a test
server) the transport sends through ASGI only. It relies on uvicorn's protocol attributes
(pinned in uv.lock); tests/unit/test_ws_protocol.py checks them, so an upgrade that changes
them fails there.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

from parley.delivery import WRITE_TEXT_EXTENSION


class WebSocketProtocol(WebSocketsSansIOProtocol):
    async def run_asgi(self) -> None:
        extensions: dict[str, object] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
        extensions[WRITE_TEXT_EXTENSION] = self.write_text
        try:
            await super().run_asgi()
        finally:
            # The scope would otherwise hold this protocol (a cycle left to the collector).
            extensions.pop(WRITE_TEXT_EXTENSION, None)

    def write_text(self, text: str) -> bool:
        """Write `text` as one frame now; False when it cannot go now (the handshake is not
        done, the connection is closing, or its transport's buffer is full): then send it
        through ASGI, which waits or fails as it would."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.initial_response is not None
            or not self.writable.is_set()
            or self.transport.is_closing()
        ):
            return False
        try:
            self.conn.send_text(text.encode())
        except InvalidState:  # the client's close frame came in: ASGI reports the disconnect
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True


class HttpProtocol(HttpToolsProtocol):
    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # httptools' parser holds this protocol's callbacks, and this protocol its parser.
        # uvicorn breaks that cycle when a connection is lost, but an upgraded connection is
        # lost to the WebSocket protocol, not to this one: each WebSocket connection left ~30
        # objects (this protocol, its parser, transport, flow control) to the cycle collector.
        # The connection is the WebSocket protocol's now; nothing here reads the parser again.
        self.parser = None  # type: ignore[assignment]
