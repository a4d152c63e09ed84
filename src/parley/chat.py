"""`parley chat`: the terminal client. It shows a run's timeline with Rich — a spinner with the
agent's thinking, a panel per tool call, the answer streaming in — stops the run on Ctrl-C
(a second Ctrl-C quits), and reconnects with backoff, resuming from the last `seq` it showed.

A connection lives no longer than its token: with a way to get a new one (`renew`), the client
sends `authenticate` before the token expires; without one, it says that the token expired and
exits when the server closes the connection (4401 `token expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import websockets
from rich.console import Console
from rich.panel import Panel
from rich.status import Status
from rich.text import Text
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from parley.token_source import RenewFailed, TokenSource, renew_in

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}
PROMPT = "you> "


class ChatClient:
    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        thread_id: str | None,
        console: Console,
        renew: TokenSource | None = None,
    ) -> None:
        self._url = url
        self._token = token
        self._renew = renew
        self._renewal: asyncio.Task[None] | None = None
        self._auth_error: str | None = None
        self.thread_id = thread_id
        self._console = console
        self._ws: ClientConnection | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._last_seq: dict[str, int] = {}
        self._run_id: str | None = None
        self._interrupts = 0
        self._fatal: str | None = None
        self._main: asyncio.Task[Any] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._tool_arguments: dict[str, Any] = {}
        self._pending: dict[str, dict[int, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ connection

    async def run(self) -> int:
        # Without --token, the first token comes from the token source too.
        if self._token is None and (self._renew is None or not await self._renewed()):
            return 1
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        receiver = asyncio.create_task(self._stay_connected())
        try:
            return await self._conversation()
        except asyncio.CancelledError:
            if self._fatal:  # already said, by _stay_connected
                return 1
            self._console.print("\n[dim]bye[/]")
            return 0
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            if self._renewal is not None:
                self._renewal.cancel()
            loop.remove_signal_handler(signal.SIGINT)

    async def _stay_connected(self) -> None:
        delay = 0.5
        while True:
            try:
                async with websockets.connect(
                    self._url, additional_headers={"Authorization": f"Bearer {self._token}"}
                ) as ws:
                    self._ws = ws
                    delay = 0.5
                    await self._receive(ws)
            except (OSError, ConnectionClosed, InvalidStatus) as exc:
                self._connected.clear()
                closed = exc.rcvd if isinstance(exc, ConnectionClosed) else None
                if closed is not None and closed.code == 4401:
                    expired = "token expired" in (closed.reason, self._auth_error)
                    if expired and self._renew is not None and await self._renewed():
                        # Missed the renewal (e.g. the machine slept): reconnect at once.
                        self._console.print("[yellow]token expired; renewed it, reconnecting…[/]")
                        continue
                    self._stop(self._refusal(expired))
                    return
                if closed is not None and closed.code == 4403:
                    self._stop("the server does not allow this client's origin")
                    return
            # Also after a clean close (1001 when the server shuts down), which ends the
            # receive loop without an exception.
            self._connected.clear()
            self._console.print(f"[yellow]connection lost; reconnecting in {delay:g}s…[/]")
            self._ws = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _refusal(self, expired: bool) -> str:
        if not expired:
            return f"the server refused this token: {self._auth_error or 'unauthorized'}"
        if self._renew is None:
            return (
                "your token expired; get a new one and run parley chat again with "
                f"--token NEW{f' --thread {self.thread_id}' if self.thread_id else ''} "
                "(or give --token-command, which parley chat runs to renew it)"
            )
        return "your token expired and no new one could be obtained"

    def _stop(self, message: str) -> None:
        """Say why the chat cannot go on, now (the prompt may be waiting), and end it."""
        self._fatal = message
        self._console.print(f"\n{message}", style="red", markup=False, highlight=False)
        if self._main is not None:
            self._main.cancel()

    async def _renewed(self) -> bool:
        assert self._renew is not None
        try:
            self._token = await self._renew()
        except RenewFailed as exc:
            self._console.print(
                f"could not renew the token: {exc}", style="red", markup=False, highlight=False
            )
            return False
        self._auth_error = None
        return True

    def _renew_before(self, expires_at: str | None) -> None:
        """Send `authenticate` with a new token before the current one expires at `expires_at`."""
        if self._renew is None or expires_at is None:  # None: a server without expiry
            return
        left = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp() - time.time()
        if self._renewal is not None:
            self._renewal.cancel()
        self._renewal = asyncio.create_task(self._renew_after(renew_in(left)))

    async def _renew_after(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))
        if await self._renewed() and self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"type": "authenticate", "token": self._token}))

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "ping":
                await ws.send(json.dumps({"type": "pong"}))
            elif kind == "authenticated":
                self._renew_before(frame.get("token_expires_at"))
            elif kind == "error" and frame.get("code") == "unauthorized":
                # Before system_message: why the handshake was refused. Later: a renewal
                # refused; the connection keeps the token it has.
                self._auth_error = frame["message"]
                if self._connected.is_set():
                    self._console.print(
                        frame["message"], style="red", markup=False, highlight=False
                    )
            elif kind == "system_message":
                self._renew_before(frame.get("token_expires_at"))
                self._connected.set()
                self._console.print(
                    f"[dim]connected as {frame['user_id']} · model {frame.get('model')}[/]"
                )
                if self.thread_id is not None:
                    after = self._last_seq.get(self.thread_id, 0)
                    await ws.send(
                        json.dumps(
                            {"type": "resume", "thread_id": self.thread_id, "after_seq": after}
                        )
                    )
            elif "seq" in frame:
                await self._accept_in_order(frame)
            elif kind == "resume_complete":
                # Whatever still waits behind a gap the replay could not fill: show it now.
                waiting = self._pending.pop(frame["thread_id"], {})
                for seq in sorted(waiting):
                    await self._accept_in_order(waiting[seq], force=True)
            elif kind in ("message_accepted", "error"):
                await self._events.put(frame)

    async def _accept_in_order(self, frame: dict[str, Any], *, force: bool = False) -> None:
        """Show each event once, in `seq` order: an event past a gap (which a reconnect can
        cause) waits until the replay fills the gap."""
        thread, seq = frame["thread_id"], frame["seq"]
        last = self._last_seq.get(thread)
        if last is not None and seq <= last:
            return  # already shown
        if last is not None and seq > last + 1 and not force:
            self._pending.setdefault(thread, {})[seq] = frame
            return
        self._last_seq[thread] = seq
        await self._events.put(frame)
        waiting = self._pending.get(thread, {})
        while (following := waiting.pop(self._last_seq[thread] + 1, None)) is not None:
            self._last_seq[thread] = following["seq"]
            await self._events.put(following)

    async def _send(self, message: dict[str, Any]) -> None:
        while True:
            await self._connected.wait()
            assert self._ws is not None
            try:
                await self._ws.send(json.dumps(message))
                return
            except ConnectionClosed:
                # It closed a moment ago and _stay_connected has not seen it yet: send again
                # once it has reconnected (a `user_message`'s client_message_id makes that safe).
                await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ the conversation

    async def _conversation(self) -> int:
        # Not wait_for: on Python 3.11 it swallows a cancel (_stop's) that arrives just as the
        # connection comes up, and the chat would go on after saying it cannot.
        async with asyncio.timeout(30):
            await self._connected.wait()
        if self.thread_id is not None:
            self._last_seq.setdefault(self.thread_id, 0)
        while True:
            self._interrupts = 0
            text = await self._read_line()
            if text is None:
                return 0
            text = text.strip()
            if text in ("/quit", "/exit"):
                return 0
            if not text:
                continue
            await self._ask(text)

    async def _read_line(self) -> str | None:
        """One line from the terminal, read in a daemon thread so that Ctrl-C can quit even
        while the prompt waits (a thread of the default executor would hold the exit)."""
        loop = asyncio.get_running_loop()
        line: asyncio.Future[str | None] = loop.create_future()

        def read() -> None:
            try:
                text: str | None = self._console.input(PROMPT)
            except (EOFError, KeyboardInterrupt, OSError):
                text = None

            def deliver() -> None:
                if not line.done():
                    line.set_result(text)

            loop.call_soon_threadsafe(deliver)

        threading.Thread(target=read, daemon=True, name="chat-input").start()
        return await line

    async def _ask(self, text: str) -> None:
        message: dict[str, Any] = {
            "type": "user_message",
            "content": text,
            "client_message_id": str(uuid.uuid4()),
        }
        if self.thread_id:
            message["thread_id"] = self.thread_id
        await self._send(message)
        while True:
            frame = await self._events.get()
            if frame["type"] == "error":
                self._console.print(f"[red]error {frame['code']}: {frame['message']}[/]")
                return
            if frame["type"] == "message_accepted":
                self.thread_id = frame["thread_id"]
                self._run_id = frame["run_id"]
                self._last_seq.setdefault(self.thread_id, 0)
                break
        await self._show_run()
        self._run_id = None

    async def _show_run(self) -> None:
        status = Status("starting…", console=self._console, spinner="dots")
        status.start()
        streaming = False
        try:
            while True:
                event = await self._events.get()
                if event.get("run_id") != self._run_id:
                    continue
                kind = event["type"]
                if kind == "agent_thinking":
                    status.update(f"[italic]{event['text']}[/]")
                elif kind == "tool_executing":
                    self._tool_arguments[event["tool_call_id"]] = event["arguments"]
                    status.update(f"running tool {event['tool']}…")
                elif kind == "tool_completed":
                    status.stop()
                    arguments = self._tool_arguments.pop(event["tool_call_id"], {})
                    self._console.print(_tool_panel(event, arguments))
                    status.start()
                elif kind == "agent_message_delta":
                    if not streaming:
                        status.stop()
                        streaming = True
                        self._console.print("[bold]agent>[/] ", end="")
                    self._console.print(event["text"], end="", markup=False, highlight=False)
                elif kind in TERMINAL:
                    status.stop()
                    if streaming:
                        self._console.print()
                    self._console.print(_terminal_line(event))
                    return
        finally:
            status.stop()

    def _on_interrupt(self) -> None:
        self._interrupts += 1
        if self._run_id is not None and self._interrupts == 1:
            self._console.print("\n[yellow]stopping the run (Ctrl-C again to quit)…[/]")
            if self._ws is not None:
                stop = json.dumps({"type": "stop_agent", "run_id": self._run_id})
                self._stopping = asyncio.get_running_loop().create_task(self._ws.send(stop))
            return
        if self._main is not None:
            self._main.cancel()


def _tool_panel(event: dict[str, Any], arguments: Any) -> Panel:
    if event["status"] == "ok":
        outcome = json.dumps(event.get("result"), indent=2)
        style, title = "green", f"🔧 {event['tool']} · {event['duration_ms']} ms"
    else:
        outcome = f"error: {event.get('error')}"
        style, title = "red", f"🔧 {event['tool']} failed · {event['duration_ms']} ms"
    body = Text(f"{json.dumps(arguments)}\n→ {outcome}")
    return Panel(body, title=title, border_style=style, expand=False)


def _terminal_line(event: dict[str, Any]) -> str:
    if event["type"] == "agent_completed":
        usage = event["usage"]
        return (
            f"[green]✓ completed[/] [dim]{event['duration_ms']} ms · "
            f"{usage['input_tokens']} tokens in, {usage['output_tokens']} out[/]"
        )
    if event["type"] == "agent_error":
        return f"[red]✗ error {event['code']}[/]: {event['message']}"
    return f"[yellow]■ cancelled[/] ({event['reason']})"
