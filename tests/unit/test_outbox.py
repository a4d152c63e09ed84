"""The outbox's immediate writes (ws_protocol.py's `write_text`): a frame is written at once
only when nothing could be sent before it; otherwise it waits in order for the sender."""

from __future__ import annotations

import asyncio

import pytest

from parley.delivery import Close, Outbox, Overflow


class Connection:
    """Stands in for the WebSocket protocol: records what it wrote, refuses while `full`."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.full = False

    def write_now(self, frame: str) -> bool:
        if self.full:
            return False
        self.written.append(frame)
        return True


async def test_frames_are_written_at_once_while_nothing_waits() -> None:
    connection = Connection()
    outbox = Outbox(4, write_now=connection.write_now)
    outbox.put("a")
    outbox.put("b")
    assert connection.written == ["a", "b"]
    assert len(outbox) == 0


async def test_a_frame_never_overtakes_one_queued_or_being_sent() -> None:
    connection = Connection()
    outbox = Outbox(4, write_now=connection.write_now)
    connection.full = True  # the client stopped reading: its transport's buffer is full
    outbox.put("a")
    outbox.put("b")
    assert len(outbox) == 2
    connection.full = False
    outbox.put("c")  # "a" and "b" are still queued: "c" waits behind them
    assert connection.written == []
    assert await outbox.get() == "a"
    # The sender holds "a" (its send may be waiting for the buffer to drain): "d" waits too.
    outbox.put("d")
    assert connection.written == []
    assert [await outbox.get() for _ in range(3)] == ["b", "c", "d"]
    # The sender came back for more: it sent "d", nothing waits, the next frame goes at once.
    get = asyncio.ensure_future(outbox.get())
    await asyncio.sleep(0)
    outbox.put("e")
    assert connection.written == ["e"]
    get.cancel()


async def test_closes_and_overflow_go_through_the_queue() -> None:
    connection = Connection()
    outbox = Outbox(2, write_now=connection.write_now)
    outbox.put(Close(1000, "bye"))
    assert connection.written == []
    assert outbox.closed
    outbox.put("after the close")  # dropped, never written
    assert connection.written == []

    outbox = Outbox(2, write_now=connection.write_now)
    connection.full = True
    outbox.put("a")
    outbox.put("b")
    with pytest.raises(Overflow):
        outbox.put("c")


async def test_a_failing_immediate_write_falls_back_to_the_queue_for_good() -> None:
    written: list[str] = []

    def broken(frame: str) -> bool:
        if not written:
            written.append(frame)
            raise AttributeError("'WebSocketProtocol' object has no attribute 'conn'")
        raise AssertionError("not called again")

    outbox = Outbox(4, write_now=broken)
    outbox.put("a")
    outbox.put("b")
    assert [await outbox.get(), await outbox.get()] == ["a", "b"]
    # Nothing queued and the sender back for more: a working write_now would be called now.
    get = asyncio.ensure_future(outbox.get())
    await asyncio.sleep(0)
    outbox.put("c")
    assert await get == "c"
    assert written == ["a"]


async def test_a_frame_put_back_goes_first() -> None:
    outbox = Outbox(4)
    outbox.put("a")
    outbox.put("b")
    taken = await outbox.get()
    outbox.put_back(taken)  # the sender was stopped before it could send it
    assert outbox.take_before_close() == ["a", "b"]
