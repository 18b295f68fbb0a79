"""The engine host (--shared-engine, EXPERIMENTAL): ONE vLLM engine in the launcher, shared by its workers.

The launcher imports this module only after it has taken the port. Importing it imports the heavy
packages (torch, transformers and vLLM through vllm_compat, and Litestar) but none of the app's modules,
so that Granian's workers, forked from the launcher, inherit them instead of importing them again: a
worker (first start, respawn, --reload) attaches in about a second instead of paying `import vllm`.

`EngineHost.start` launches EngineCore for `workers + 1` client slots (the spare one lets a new worker
attach while an old one still holds its slot), pre-warms one InputProcessor and the image processor, and tells the workers
where the slots are through the variables named in settings.py (ENGINE_HOST_*). Each worker takes a
free slot with flock() on the slot's lock file (engine/lifecycle.py); the kernel frees it when the
worker dies. The host watches the engine's process: if it dies, the launcher stops (SIGTERM to itself:
the workers drain, then exit), since nothing restarts it yet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing import connection
from typing import Any

from qwen_server import settings as settings_mod
from qwen_server.demo import model as demo
from qwen_server.engine import vllm_compat
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server.engine_host")

SPARE_SLOTS = 1
READY_PAYLOAD = "ready_payload.bin"

# The host of this process, or (in a worker forked from the launcher) the launcher's, inherited.
_hosted: EngineHost | None = None


def slot_lock_path(slot_dir: str, slot: int) -> str:
    return os.path.join(slot_dir, f"slot{slot}.lock")


def slot_used_path(slot_dir: str, slot: int) -> str:
    """Present once a client attached to the slot: the engine's ready message was consumed."""
    return os.path.join(slot_dir, f"slot{slot}.used")


def inherited_config() -> Any:
    """The engine's VllmConfig, inherited from the launcher that forked this worker."""
    if _hosted is None or _hosted.pid != os.getppid():
        raise RuntimeError(
            "this worker was told to attach to a shared engine but was not forked from its host (the "
            "launcher with --shared-engine): it has no copy of the engine's config"
        )
    return _hosted.engine.vllm_config


class EngineHost:
    def __init__(self, engine: vllm_compat.SharedEngine, slot_dir: str) -> None:
        self.engine = engine
        self.slot_dir = slot_dir
        self.pid = os.getpid()
        self.died = False
        self._stopping = threading.Event()

    @classmethod
    def start(cls, settings: Settings) -> EngineHost:
        """Launch the engine (blocks until it is ready) and export the slots to the environment."""
        global _hosted
        vllm_compat.check_vllm_version()
        t0 = time.monotonic()
        if settings.model:
            path = settings.model
            kwargs = settings.engine_kwargs(path)
        else:
            path = str(demo.demo_model_path())
            log.warning(demo.NOISE_WARNING)
            kwargs = demo.engine_overrides(settings.engine_kwargs(path))
        count = settings.workers + SPARE_SLOTS
        log.info("shared engine: starting one engine for %d client slot(s), model %s", count, path)
        config = vllm_compat.shared_engine_config(kwargs, count)
        engine = vllm_compat.SharedEngine(config, count)
        t_engine = time.monotonic() - t0
        slot_dir = tempfile.mkdtemp(prefix="qwen-server-slots-")
        host = cls(engine, slot_dir)
        try:
            t1 = time.monotonic()
            vllm_compat.prewarm_input_processor(config)
            if config.model_config.is_multimodal_model:  # what each worker inspects to pre-size images (~1.8 s)
                vllm_compat.cached_image_processor(config.model_config)
            t_warm = time.monotonic() - t1
            os.environ[settings_mod.ENGINE_HOST_SLOTS_ENV] = json.dumps(engine.slots())
            os.environ[settings_mod.ENGINE_HOST_CLIENT_COUNT_ENV] = str(count)
            os.environ[settings_mod.ENGINE_HOST_SLOT_DIR_ENV] = slot_dir
            for slot in range(count):
                open(slot_lock_path(slot_dir, slot), "w").close()
        except BaseException:
            host.stop()
            raise
        _hosted = host
        threading.Thread(target=host._watch, name="qwen-server-engine-watch", daemon=True).start()
        log.info(
            "shared engine ready in %.1f s (engine %.1f s, input processor pre-warm %.1f s); EngineCore PID %s",
            time.monotonic() - t0,
            t_engine,
            t_warm,
            ", ".join(str(p) for p in host.pids()),
        )
        return host

    def pids(self) -> set[int]:
        """The engine's processes (children of the launcher that its supervisor must leave alone)."""
        return {p.pid for p in self.engine.processes() if p.pid is not None}

    def _watch(self) -> None:
        procs = self.engine.processes()
        sentinels = [p.sentinel for p in procs]
        while not self._stopping.is_set():
            if connection.wait(sentinels, timeout=1.0):
                break
        if self._stopping.is_set():
            return
        self.died = True
        for p in procs:
            p.join(1.0)  # its sentinel fired: reap it, so that its exit code is known
        codes = {p.name: p.exitcode for p in procs}
        log.error("the shared engine died (%s); stopping the server (engine restart is not implemented yet)", codes)
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        """Stop the engine and remove the slot directory; the workers must be gone (or going)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        t0 = time.monotonic()
        self.engine.stop()
        shutil.rmtree(self.slot_dir, ignore_errors=True)
        for name in (
            settings_mod.ENGINE_HOST_SLOTS_ENV,
            settings_mod.ENGINE_HOST_CLIENT_COUNT_ENV,
            settings_mod.ENGINE_HOST_SLOT_DIR_ENV,
        ):
            os.environ.pop(name, None)
        log.info("shared engine stopped in %.1f s", time.monotonic() - t0)
