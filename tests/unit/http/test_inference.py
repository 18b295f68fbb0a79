"""The SSE keep-alive wrapper of the inference routes, on made-up frame generators (no engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from qwen_server.http.inference import KEEP_ALIVE, keep_alive


async def frames(gaps: list[float], state: dict[str, int | bool]) -> AsyncIterator[bytes]:
    """A frame after each gap; `state` records how far it got and whether it was closed."""
    try:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            state["made"] = i + 1
            yield f"data: {i}\n\n".encode()
    finally:
        state["closed"] = True


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in it]


def test_a_silence_is_filled_with_comments_and_every_frame_still_comes_in_order() -> None:
    state: dict[str, int | bool] = {}
    out = asyncio.run(collect(keep_alive(frames([0, 0.35, 0], state), 0.1)))
    data = [f for f in out if f != KEEP_ALIVE]
    assert data == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    between = out[out.index(b"data: 0\n\n") + 1 : out.index(b"data: 1\n\n")]
    assert len(between) >= 2 and set(between) == {KEEP_ALIVE}, out
    assert state["closed"]


def test_frames_that_flow_get_no_comments() -> None:
    out = asyncio.run(collect(keep_alive(frames([0] * 50, {}), 5.0)))
    assert KEEP_ALIVE not in out and len(out) == 50


def test_a_client_that_leaves_stops_the_frames_at_once() -> None:
    state: dict[str, int | bool] = {}

    async def leave() -> None:
        it = keep_alive(frames([0, 3600], state), 0.05)
        assert await it.__anext__() == b"data: 0\n\n"
        assert await it.__anext__() == KEEP_ALIVE
        await asyncio.wait_for(it.aclose(), 1)  # type: ignore[attr-defined]

    asyncio.run(leave())
    assert state["closed"]  # the inner generator (the engine request) was closed, not left waiting an hour


def test_a_slow_reader_holds_the_frames_back() -> None:
    """Frames are made as they are read (one ahead at most), not piled up for a reader that lags."""
    state: dict[str, int | bool] = {}

    async def lag() -> int:
        it = keep_alive(frames([0] * 100, state), 5.0)
        await it.__anext__()
        await asyncio.sleep(0.2)
        made = int(state["made"])
        await it.aclose()  # type: ignore[attr-defined]
        return made

    assert asyncio.run(lag()) <= 3


def test_a_failing_stream_raises_instead_of_hanging() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"data: 0\n\n"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(asyncio.wait_for(collect(keep_alive(broken(), 0.05)), 5))
