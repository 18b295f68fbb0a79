"""The SSE body sender (qwen_server/http/sse.py), with a fake ASGI receive and send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qwen_server.http.sse import send_frames
from qwen_server.service.generation import DONE


class Peer:
    """A fake ASGI server side: records what is sent; `leave()` makes receive() report a disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self.receives == 1:  # what Granian gives after a body was read: an empty last chunk
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()


async def frames_of(items: list[bytes], state: dict[str, Any], pause: float = 0) -> AsyncIterator[bytes]:
    try:
        for item in items:
            if pause:
                await asyncio.sleep(pause)
            yield item
        state["ended"] = True
    except asyncio.CancelledError:
        state["cancelled"] = True
        raise


def test_the_frame_with_done_is_the_last_body_event_and_no_empty_one_follows() -> None:
    peer, state = Peer(), dict[str, Any]()
    asyncio.run(send_frames(frames_of([b"data: 1\n\n", b"data: 2\n\n" + DONE], state), peer.send, peer.receive))
    assert [(m["body"], m["more_body"]) for m in peer.sent] == [(b"data: 1\n\n", True), (b"data: 2\n\n" + DONE, False)]
    assert state == {"ended": True}  # the sender read past [DONE]: the generator ran to its end


def test_frames_that_end_without_done_get_an_empty_last_event() -> None:
    peer = Peer()
    asyncio.run(send_frames(frames_of([b": comment\n\n"], {}), peer.send, peer.receive))
    assert [(m["body"], m["more_body"]) for m in peer.sent] == [(b": comment\n\n", True), (b"", False)]


def test_a_client_that_leaves_cancels_the_frames_and_the_sender_returns() -> None:
    peer, state = Peer(), dict[str, Any]()

    async def run() -> bool:
        sending = asyncio.ensure_future(
            send_frames(frames_of([b"data: 1\n\n", b"data: 2\n\n"], state, pause=3600), peer.send, peer.receive)
        )
        await asyncio.sleep(0.05)
        peer.leave()
        await asyncio.wait_for(sending, 5)
        await asyncio.sleep(0.01)  # the caller goes on: no cancellation is left over for it
        return sending.cancelled()

    assert asyncio.run(run()) is False
    assert state == {"cancelled": True} and peer.sent == []


def test_a_deadline_still_reaches_the_caller_and_cancels_the_frames() -> None:
    peer, state = Peer(), dict[str, Any]()

    async def run() -> None:
        async with asyncio.timeout(0.05):
            await send_frames(frames_of([b"data: 1\n\n"], state, pause=3600), peer.send, peer.receive)

    with pytest.raises(TimeoutError):
        asyncio.run(run())
    assert state == {"cancelled": True}


def test_a_deadline_that_comes_with_a_disconnect_is_not_swallowed() -> None:
    peer, state = Peer(), dict[str, Any]()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, peer.leave)
        async with asyncio.timeout_at(loop.time() + 0.05):
            await send_frames(frames_of([b"data: 1\n\n"], state, pause=3600), peer.send, peer.receive)

    with pytest.raises(TimeoutError):
        asyncio.run(run())
    assert state == {"cancelled": True}


def test_a_disconnect_after_the_end_cancels_nothing() -> None:
    peer = Peer()

    async def run() -> str:
        await send_frames(frames_of([DONE], {}), peer.send, peer.receive)
        peer.leave()
        await asyncio.sleep(0.02)  # a watcher left running would cancel this
        return "went on"

    assert asyncio.run(run()) == "went on"
