"""What one connection sends, and in which order: the outbox with its flow control, and each
thread's delivery state. Invariants, per connection:
- each run event is sent at most once, and in `seq` order per thread;
- nothing that was published for the user is silently skipped on a thread the connection
  follows: a `seq` that jumps ahead (Redis pub/sub dropped something, or the bus reconnected)
  is filled from the store before anything newer is sent;
- one slow client never stalls a run or other clients: live events are only queued; a client
  that falls `limit` frames behind is closed (1013) and can `resume`. Replays do not push into
  that queue: they pull pages from the store only while the outbox has room, so a replay of
  any length neither overflows the queue nor holds up the connection's receive loop.

A thread's state moves between three modes:
- *held*: only in the first moments of a connection (`RESUME_HOLD_S`), for threads it has not
  named yet. A client that reconnects mid-run sends `resume` right after `system_message`;
  without the hold, live events published in that round trip would overtake the replay of the
  ones it missed. Held events are dropped on `resume` (the replay reads them from the store)
  and sent when the connection posts into the thread or when the hold ends.
- *replaying*: a replay or gap fill is reading from the store; live events are not queued but
  their highest `seq` is noted, and the replay reads until it has passed it. Events are
  committed before they are published, so the store always has what was noted.
- *live*: events are queued as they come.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from parley.bus import Delivery
from parley.observability import get_logger
from parley.protocol import ResumeComplete

log = get_logger(__name__)

RESUME_HOLD_S = 0.5
REPLAY_PAGE = 256
# The ASGI scope extension through which a server offers to write a text frame at once
# (`Callable[[str], bool]`, see ws_protocol.py).
WRITE_TEXT_EXTENSION = "parley.write_text"

# A page of a thread's stored frames after a seq: (seq, frame) pairs, oldest first.
PageReader = Callable[[str, int, int], Awaitable[Sequence[tuple[int, str]]]]


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


class Overflow(Exception):
    """The client fell too far behind."""


class Outbox:
    """Frames waiting to be sent, in order. `put` refuses (Overflow) past `limit`; `put_pulled`
    is for frames read on demand after `wait_for_room`, which waits until the outbox is at most
    half full.

    With `write_now` (a function that writes a frame at once if the connection can take it,
    see ws_protocol.py), a frame put while nothing waits before it, and while the sender is not
    in the middle of sending one, is written at once instead of waking the sender."""

    def __init__(self, limit: int, write_now: Callable[[str], bool] | None = None) -> None:
        self.limit = limit
        self._frames: deque[str | Close] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False
        self._write_now = write_now
        self._sending = False  # the sender took a frame and has not come back for the next

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: str | Close) -> None:
        if self.closed:
            return
        if (
            self._write_now is not None
            and not self._frames
            and not self._sending
            and not isinstance(frame, Close)
            and self._written_now(frame)
        ):
            return
        if len(self._frames) >= self.limit and not isinstance(frame, Close):
            raise Overflow
        self._append(frame)
        if isinstance(frame, Close):
            self.closed = True

    def put_back(self, frame: str) -> None:
        """The sender took `frame` but did not send it (it was stopped while waiting for the
        connection to take it): first in line again, for whoever sends what is left."""
        self._frames.appendleft(frame)

    def _written_now(self, frame: str) -> bool:
        assert self._write_now is not None
        try:
            return self._write_now(frame)
        except Exception:
            # A server that broke its promise (e.g. after an upgrade of uvicorn): the frame and
            # all after it go through ASGI, as without the extension.
            log.exception("delivery.write_now_failed")
            self._write_now = None
            return False

    def put_pulled(self, frame: str) -> None:
        if not self.closed:
            self._append(frame)

    def take_before_close(self) -> list[str]:
        """Empty the outbox; returns the frames queued before its close (what the sender did
        not get to send when the connection ended)."""
        frames: list[str] = []
        while self._frames:
            frame = self._frames.popleft()
            if isinstance(frame, Close):
                break
            frames.append(frame)
        self._frames.clear()
        return frames

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def get(self) -> str | Close:
        """The next frame, for the sender, which calls `get` again only once it is sent."""
        self._sending = False
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        self._sending = True
        if len(self._frames) <= self.limit // 2:
            self._room.set()
        return frame

    def _append(self, frame: str | Close) -> None:
        self._frames.append(frame)
        self._ready.set()
        if len(self._frames) > self.limit // 2:
            self._room.clear()


@dataclass
class ThreadState:
    mode: Literal["held", "replaying", "live"]
    # The highest seq sent on this connection; None until the first one (a thread followed from
    # the middle starts wherever its first live event is).
    last: int | None = None
    # The first seq sent live before the client's first `resume` of the thread: a replay then
    # skips [first_live, last], sent already (e.g. released from the hold before the resume
    # arrived). After a resume the client knows what it has and asks for exactly that.
    first_live: int | None = None
    resumed: bool = False
    held: list[Delivery] = field(default_factory=list)
    noted: int = 0  # the highest seq published while replaying
    replays: int = 0  # replays and gap fills queued or running

    def sent(self, seq: int) -> None:
        if self.first_live is None and not self.resumed:
            self.first_live = seq
        self.last = seq if self.last is None else max(self.last, seq)

    def sent_live_range(self) -> tuple[int, int] | None:
        if self.resumed or self.first_live is None or self.last is None:
            return None
        return self.first_live, self.last


@dataclass(frozen=True)
class _Replay:
    thread_id: str
    after_seq: int
    announce: bool  # a client's `resume` (answered with resume_complete); else a gap fill


class ConnectionDelivery:
    """The delivery side of one connection: the bus sink, replays and the outbox."""

    def __init__(self, outbox: Outbox, read_page: PageReader, *, holding: bool = True) -> None:
        self.outbox = outbox
        self._read_page = read_page
        self._threads: dict[str, ThreadState] = {}
        self._replays: asyncio.Queue[_Replay] = asyncio.Queue()
        self._holding = holding
        self.overflowed = asyncio.Event()
        self.gap_fills = 0

    # ------------------------------------------------------------------ events in

    def deliver(self, delivery: Delivery) -> None:
        """Bus sink: runs on the event loop for every event of this user; never blocks."""
        state = self._threads.get(delivery.thread_id)
        if state is None:
            state = ThreadState(mode="held" if self._holding else "live")
            self._threads[delivery.thread_id] = state
        if state.mode == "held":
            state.held.append(delivery)
        elif state.mode == "replaying":
            state.noted = max(state.noted, delivery.seq)
        elif state.last is not None and delivery.seq <= state.last:
            return  # already sent (e.g. by a replay)
        elif state.last is not None and delivery.seq > state.last + 1:
            self._fill_gap(delivery.thread_id, state, delivery.seq)
        else:
            self._send(state, delivery.seq, delivery.frame)

    def claim(self, thread_id: str) -> None:
        """The connection posts into the thread: follow it live from now on."""
        state = self._threads.setdefault(thread_id, ThreadState(mode="live"))
        if state.mode == "held":
            self._go_live(state)

    def release_held(self) -> None:
        """End of the hold window: send what was held, in order, and hold nothing more."""
        self._holding = False
        for state in self._threads.values():
            if state.mode == "held":
                self._go_live(state)

    def begin_resume(self, thread_id: str) -> None:
        """A client's `resume` of the thread arrived (its ownership is being checked): from now
        on live events of the thread wait in the store for the replay, so none overtakes it.
        Follow with `resume` once the thread is found, or `abandon_resume`."""
        state = self._threads.setdefault(thread_id, ThreadState(mode="replaying"))
        state.held.clear()
        self._start_replay(thread_id, state)

    def resume(self, thread_id: str, after_seq: int) -> None:
        """Queue the replay begun by `begin_resume`: the thread's events after `after_seq`,
        then resume_complete, then live events again."""
        self._replays.put_nowait(_Replay(thread_id, after_seq, announce=True))

    def abandon_resume(self, thread_id: str) -> None:
        """The resume was refused (not the user's thread, or the check failed)."""
        state = self._threads.get(thread_id)
        if state is None:
            return
        state.replays -= 1
        if state.replays > 0:
            return  # another replay of the thread is under way and will go live itself
        if state.last is None:
            # Nothing of it was ever sent here (a foreign or unknown thread never delivers):
            # forget it; a thread of the user's is followed again from its next event.
            del self._threads[thread_id]
            return
        state.mode = "live"
        if state.noted > state.last:
            self._fill_gap(thread_id, state, state.noted)
        state.noted = 0

    def catch_up(self) -> None:
        """The bus was cut off and is back: check every followed thread against the store."""
        for thread_id, state in self._threads.items():
            if state.mode == "live" and state.last is not None:
                self._fill_gap(thread_id, state, state.last)

    # ------------------------------------------------------------------ replays

    async def replay_forever(self) -> None:
        """The connection's replay worker: one replay at a time, pulled page by page."""
        while True:
            job = await self._replays.get()
            await self._replay(job)

    async def _replay(self, job: _Replay) -> None:
        state = self._threads[job.thread_id]
        skip = state.sent_live_range() if job.announce else None
        if job.announce:
            state.resumed = True
        position = job.after_seq
        # `wait_for_room` waits until the outbox is at most half full; a page of at most a
        # quarter of it leaves a quarter for frames of other threads (live events, pongs), so
        # a replay alone never makes the outbox overflow, whatever SEND_QUEUE_SIZE is.
        page_size = max(1, min(REPLAY_PAGE, self.outbox.limit // 4))
        while True:
            await self.outbox.wait_for_room()
            page = await self._read_page(job.thread_id, position, page_size)
            for seq, frame in page:
                position = seq
                if skip is not None and skip[0] <= seq <= skip[1]:
                    continue
                state.sent(seq)
                self.outbox.put_pulled(frame)
            if len(page) < page_size and state.noted <= position:
                break
        state.replays -= 1
        if state.replays == 0:
            state.mode = "live"
            state.noted = 0
        if job.announce:
            self.outbox.put_pulled(
                ResumeComplete(thread_id=job.thread_id, last_seq=position).to_json()
            )

    # ------------------------------------------------------------------ helpers

    def _fill_gap(self, thread_id: str, state: ThreadState, seen: int) -> None:
        assert state.last is not None
        self.gap_fills += 1
        self._start_replay(thread_id, state)
        state.noted = max(state.noted, seen)
        self._replays.put_nowait(_Replay(thread_id, state.last, announce=False))

    def _start_replay(self, thread_id: str, state: ThreadState) -> None:
        state.mode = "replaying"
        state.replays += 1

    def _go_live(self, state: ThreadState) -> None:
        state.mode = "live"
        held, state.held = state.held, []
        for delivery in held:
            if state.last is None or delivery.seq > state.last:
                self._send(state, delivery.seq, delivery.frame)

    def _send(self, state: ThreadState, seq: int, frame: str) -> None:
        state.sent(seq)
        try:
            self.outbox.put(frame)
        except Overflow:
            self.overflowed.set()
