"""Attached mode's slot choice (--shared-engine): the host's variables select it, and a slot is taken
with flock() on its lock file, so that a dead worker's slot is free again at once. No engine here."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from qwen_server import settings
from qwen_server.engine import host
from qwen_server.engine.lifecycle import Attachment


def _env(slot_dir: Path, count: int) -> dict[str, str]:
    for slot in range(count):
        Path(host.slot_lock_path(str(slot_dir), slot)).touch()
    slots = [
        {"input_address": f"ipc://in{i}", "output_address": f"ipc://out{i}", "input_fd": -1, "output_fd": -1}
        for i in range(count)
    ]
    return {
        settings.ENGINE_HOST_SLOTS_ENV: json.dumps(slots),
        settings.ENGINE_HOST_CLIENT_COUNT_ENV: str(count),
        settings.ENGINE_HOST_SLOT_DIR_ENV: str(slot_dir),
    }


def test_without_the_host_variables_the_engine_is_embedded() -> None:
    assert Attachment.from_env({}) is None


def test_a_slot_is_held_while_its_holder_lives_and_free_once_it_died(tmp_path: Path) -> None:
    env = _env(tmp_path, 2)
    child = os.fork()
    if child == 0:  # another worker: takes slot 0 and holds it until killed
        Attachment.from_env(env)._take_slot()  # type: ignore[union-attr]
        (tmp_path / "taken").touch()
        time.sleep(60)
        os._exit(0)
    try:
        while not (tmp_path / "taken").exists():
            time.sleep(0.01)
        mine = Attachment.from_env(env)
        assert mine is not None and mine._take_slot() == 1
        third = Attachment.from_env(env)
        assert third is not None
        try:
            third._take_slot()
            raise AssertionError("a third worker got a slot of two")
        except RuntimeError as exc:
            assert "taken" in str(exc)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    after = Attachment.from_env(env)
    assert after is not None and after._take_slot() == 0  # the dead holder's lock went with it


# --- the host's word on the engine (engine.json), as the workers read it ---


def _write_state(slot_dir: Path, **state: object) -> None:
    Path(host.state_path(str(slot_dir))).write_text(json.dumps(state))


def test_the_engine_is_gone_when_the_host_says_dead_or_a_new_generation(tmp_path: Path) -> None:
    mine = Attachment.from_env(_env(tmp_path, 2))
    assert mine is not None
    assert host.read_state(str(tmp_path)) == {}  # before the host's first word
    _write_state(tmp_path, generation=1, state="ready", reason=None, pids=[])
    mine.generation = 1
    assert mine.engine_gone() is None and mine.engine_ready()
    _write_state(tmp_path, generation=1, state="dead", reason="the shared engine died (EngineCore exit code -9)")
    assert mine.engine_gone() == "the shared engine died (EngineCore exit code -9)"
    assert not mine.engine_ready() and mine.host_gave_up() is None
    _write_state(tmp_path, generation=2, state="ready", reason=None)
    assert mine.engine_gone() is not None, "attached to generation 1: generation 2 is another engine"
    _write_state(tmp_path, generation=2, state="failed", reason="past the limit")
    assert mine.host_gave_up() == "past the limit"


def test_waiting_for_the_engine_ends_when_it_is_ready_and_fails_when_the_host_gave_up(tmp_path: Path) -> None:
    import asyncio

    mine = Attachment.from_env(_env(tmp_path, 1))
    assert mine is not None
    _write_state(tmp_path, generation=1, state="loading")

    async def wait_then_ready() -> None:
        waiter = asyncio.create_task(mine.wait_engine_ready(lambda: True))
        await asyncio.sleep(0.3)
        assert not waiter.done(), "loading is not ready"
        _write_state(tmp_path, generation=1, state="ready")
        await asyncio.wait_for(waiter, 5)

    asyncio.run(wait_then_ready())
    _write_state(tmp_path, generation=1, state="failed", reason="the model does not load")
    try:
        asyncio.run(mine.wait_engine_ready(lambda: True))
        raise AssertionError("waited on an engine its host gave up on")
    except RuntimeError as exc:
        assert "the model does not load" in str(exc)


def test_detaching_tells_the_host_the_slot_has_no_client_of_the_dead_engine(tmp_path: Path) -> None:
    env = _env(tmp_path, 2)
    child = os.fork()
    if child == 0:  # a worker attached to slot 0 (its lock held, its `used` marker written)
        a = Attachment.from_env(env)
        slot = a._take_slot()  # type: ignore[union-attr]
        Path(host.slot_used_path(str(tmp_path), slot)).touch()
        (tmp_path / "attached").touch()
        while not (tmp_path / "detach").exists():
            time.sleep(0.01)
        a.detach()  # type: ignore[union-attr]
        (tmp_path / "detached").touch()
        time.sleep(60)
        os._exit(0)
    try:
        while not (tmp_path / "attached").exists():
            time.sleep(0.01)
        engine = type("Engine", (), {"client_count": 2})()
        h = host.EngineHost(settings.Settings(), engine, str(tmp_path))  # type: ignore[arg-type]
        Path(host.slot_used_path(str(tmp_path), 1)).touch()  # slot 1: used by a worker that is gone
        assert h._client_open(0), "slot 0's worker holds its lock and has not closed its client"
        assert not h._client_open(1), "no worker holds slot 1: nothing to wait for"
        (tmp_path / "detach").touch()
        while not (tmp_path / "detached").exists():
            time.sleep(0.01)
        assert not h._client_open(0)
        h._wait_for_clients_to_close(timeout=5)  # returns at once
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
