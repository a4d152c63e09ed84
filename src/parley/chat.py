"""`parley chat`: the terminal client. It shows a run's timeline with Rich — a spinner with the
agent's thinking, a panel per tool call, the answer streaming in — stops the run on Ctrl-C
(a second Ctrl-C quits), and reconnects with backoff, resuming from the last `seq` it showed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import uuid
from typing import Any

import websockets
from rich.console import Console
from rich.panel import Panel
from rich.status import Status
from rich.text import Text
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}
PROMPT = "you> "


class ChatClient:
    def __init__(self, *, url: str, token: str, thread_id: str | None, console: Console) -> None:
        self._url = url
        self._token = token
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
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        receiver = asyncio.create_task(self._stay_connected())
        try:
            return await self._conversation()
        except asyncio.CancelledError:
            self._console.print("\n[dim]bye[/]")
            return 0
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
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
                code = exc.rcvd.code if isinstance(exc, ConnectionClosed) and exc.rcvd else None
                if code in (4401, 4403):
                    self._fatal = (
                        "the server refused this token"
                        if code == 4401
                        else "the server does not allow this client's origin"
                    )
                    await self._events.put({"type": "_fatal"})
                    return
            # Also after a clean close (1001 when the server shuts down), which ends the
            # receive loop without an exception.
            self._connected.clear()
            self._console.print(f"[yellow]connection lost; reconnecting in {delay:g}s…[/]")
            self._ws = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "ping":
                await ws.send(json.dumps({"type": "pong"}))
            elif kind == "system_message":
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
        await self._connected.wait()
        assert self._ws is not None
        await self._ws.send(json.dumps(message))

    # ------------------------------------------------------------------ the conversation

    async def _conversation(self) -> int:
        await asyncio.wait_for(self._connected.wait(), timeout=30)
        if self.thread_id is not None:
            self._last_seq.setdefault(self.thread_id, 0)
        while True:
            self._interrupts = 0
            text = await self._read_line()
            if text is None:
                return 0
            if self._fatal:
                self._console.print(f"[red]{self._fatal}[/]")
                return 1
            text = text.strip()
            if text in ("/quit", "/exit"):
                return 0
            if not text:
                continue
            await self._ask(text)
            if self._fatal:
                self._console.print(f"[red]{self._fatal}[/]")
                return 1

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
            if frame["type"] == "_fatal":
                return
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
                if event["type"] == "_fatal":
                    return
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
