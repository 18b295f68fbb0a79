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
