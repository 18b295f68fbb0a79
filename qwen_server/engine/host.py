"""The engine host (--shared-engine, EXPERIMENTAL): ONE vLLM engine in the launcher, shared by its workers.

The launcher imports this module only after it has taken the port. Importing it imports the heavy
packages (torch, transformers and vLLM through vllm_compat, and Litestar) but none of the app's modules,
so that Granian's workers, forked from the launcher, inherit them instead of importing them again: a
worker (first start, respawn, --reload) attaches in about a second instead of paying `import vllm`.

`EngineHost.start` starts EngineCore for `workers + 1` client slots (the spare one lets a new worker
attach while an old one still holds its slot), pre-warms one InputProcessor and the image processor
while the model loads, and tells the workers where the slots are through the variables named in
settings.py (ENGINE_HOST_*); it returns before the model is loaded, so that Granian's workers answer
/health (503 `loading`) during the load, and attach once the host says `ready`. Each
worker takes a free slot with flock() on the slot's lock file (engine/lifecycle.py); the kernel frees it
when the worker dies, and EngineCore, watching the locks, then aborts that worker's requests.

The host's word on the engine is `engine.json` in the slot directory: its generation (one per launch)
and its state (`loading`, `ready`, `dead`, `failed`), which the workers read once a second. When EngineCore dies,
the host says `dead` (the workers fail their requests in flight with engine_dead and close their
clients), waits a backoff, waits for the clients to close (one still open would swallow the new
engine's ready message), and launches a new engine on the same listeners; past --engine-restarts in
--engine-restart-window it says `failed` and stops the launcher (SIGTERM to itself: workers drain).
"""

from __future__ import annotations

import contextlib
import fcntl
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
ENGINE_STATE = "engine.json"
MAX_BACKOFF = 30.0  # seconds, as a worker's own engine restarts (engine/lifecycle.py)

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


def state_path(slot_dir: str) -> str:
    return os.path.join(slot_dir, ENGINE_STATE)


def read_state(slot_dir: str) -> dict[str, Any]:
    """The host's latest word on the engine ({} before the first)."""
    try:
        with open(state_path(slot_dir), "rb") as f:
            state: dict[str, Any] = json.loads(f.read())
            return state
    except FileNotFoundError:
        return {}


class EngineStartError(RuntimeError):
    """The shared engine could not start; the message says why and what to check."""


def explain_failure(stage: str, exc: BaseException, settings: Settings, path: str) -> str:
    """The launcher's account of a failed engine load, worded as a worker's (engine/lifecycle.py)."""
    return (
        f"The engine failed to load during '{stage}': {type(exc).__name__}: {exc}\n"
        f"  model: {path}\n"
        f"  engine options: {settings.engine_kwargs(path) | ({} if settings.model else {'model': '(built-in demo)'})}\n"
        "  The launcher exits now. Check the model path or id, the engine options (they are vLLM's own: see\n"
        "  `vllm serve --help`), and free memory (on vLLM's CPU build, size the KV cache with\n"
        "  VLLM_CPU_KVCACHE_SPACE=<GiB>)."
    )


class EngineHost:
    def __init__(self, settings: Settings, engine: vllm_compat.SharedEngine, slot_dir: str) -> None:
        self.settings = settings
        self.engine = engine
        self.slot_dir = slot_dir
        self.pid = os.getpid()
        self.died = False  # gave up: the launcher's exit code says so
        self.generation = 0
        self.restarts: list[float] = []  # monotonic times of the restarts within the window
        self.launching = False
        self._path = settings.model or ""  # the model's path (the demo's once resolved)
        self._stopping = threading.Event()

    @classmethod
    def start(cls, settings: Settings, run_dir: str | None = None) -> EngineHost:
        """Start the engine's processes and export the slots to the environment; the model loads in
        the background (engine.json says `loading`, then `ready`), while Granian's workers already
        answer /health (503 `loading`). The slots' directory goes in `run_dir` (the launcher's,
        removed when it exits) if given. What the workers should inherit is imported and pre-warmed
        here, before Granian forks them; the thread left running imports nothing more (a fork while
        a thread holds a module's import lock would hand the child a lock nobody releases)."""
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
        slot_dir = tempfile.mkdtemp(prefix="qwen-server-slots-", dir=run_dir)
        locks = [slot_lock_path(slot_dir, slot) for slot in range(count)]
        for lock in locks:
            open(lock, "w").close()
        host: EngineHost | None = None
        stage = "checking the chat options (parsers, template)"
        try:
            vllm_compat.check_chat_options(settings)
            stage = "starting the shared engine (its config)"
            config = vllm_compat.shared_engine_config(kwargs, count)
            stage = "starting the shared engine (its processes)"
            engine = vllm_compat.SharedEngine(config, count, locks)
            host = cls(settings, engine, slot_dir)
            host._path = path
            host._begin_launch()
            stage = "starting the shared engine (pre-warming the front end)"
            if not host.pids():
                raise RuntimeError(
                    "--shared-engine needs EngineCore as a local process of the launcher (not Ray's "
                    "distributed executor): start without --shared-engine"
                )
            t1 = time.monotonic()
            vllm_compat.prewarm_input_processor(config)  # while EngineCore loads the model
            if config.model_config.is_multimodal_model:  # what each worker inspects to pre-size images (~1.8 s)
                vllm_compat.cached_image_processor(config.model_config)
            log.info(
                "shared engine: EngineCore PID %s loading; front end pre-warmed in %.1f s (%.1f s since start)",
                ", ".join(str(p) for p in host.pids()),
                time.monotonic() - t1,
                time.monotonic() - t0,
            )
            os.environ[settings_mod.ENGINE_HOST_SLOTS_ENV] = json.dumps(engine.slots())
            os.environ[settings_mod.ENGINE_HOST_CLIENT_COUNT_ENV] = str(count)
            os.environ[settings_mod.ENGINE_HOST_SLOT_DIR_ENV] = slot_dir
        except BaseException as exc:
            if host is not None:
                host.stop()
            shutil.rmtree(slot_dir, ignore_errors=True)
            if isinstance(exc, Exception):
                raise EngineStartError(explain_failure(stage, exc, settings, path)) from exc
            raise
        _hosted = host
        threading.Thread(target=host._load_then_watch, args=(t0,), name="qwen-server-engine-watch", daemon=True).start()
        return host

    def _load_then_watch(self, t0: float) -> None:
        """The first load's end (its handshake), then the watch. A first load that fails is not
        retried (the model, the options or the machine would fail it again): the launcher stops."""
        try:
            self._finish_launch()
        except Exception as exc:  # noqa: BLE001 - every failure of the load is reported the same way
            if self._stopping.is_set():  # stopped while loading: the launcher is on its way out already
                return
            self._give_up(explain_failure("loading the model in the shared engine", exc, self.settings, self._path))
            return
        log.info(
            "shared engine ready in %.1f s; EngineCore PID %s",
            time.monotonic() - t0,
            ", ".join(str(p) for p in self.pids()),
        )
        self._watch()

    def pids(self) -> set[int]:
        """The engine's processes (children of the launcher that its supervisor must leave alone)."""
        return {p.pid for p in self.engine.processes() if p.pid is not None}

    def owns(self, pid: int) -> bool:
        """Whether the launcher's child `pid` is the engine's. While an engine launches, its processes
        exist before they are known: every child then counts (the reaper waits)."""
        return self.launching or pid in self.pids()

    def _write_state(self, state: str, reason: str | None = None) -> None:
        body = {"generation": self.generation, "state": state, "reason": reason, "pids": sorted(self.pids())}
        tmp = f"{state_path(self.slot_dir)}.tmp"
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.replace(tmp, state_path(self.slot_dir))

    def _launch(self) -> None:
        """Start a new engine (generation + 1) on the listeners and say `ready` once it is."""
        self._begin_launch()
        self._finish_launch()

    def _begin_launch(self) -> None:
        self.generation += 1
        for slot in range(self.engine.client_count):  # its ready message is new on every slot
            with contextlib.suppress(FileNotFoundError):
                os.remove(slot_used_path(self.slot_dir, slot))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.slot_dir, READY_PAYLOAD))
        self.launching = True
        self._write_state("loading")
        try:
            self.engine.begin()
        except BaseException:
            self.launching = False
            raise

    def _finish_launch(self) -> None:
        try:
            self.engine.finish()
        finally:
            self.launching = False
        self._write_state("ready")

    def _give_up(self, final: str) -> None:
        log.error("%s", final)
        self._write_state("failed", final)
        self.died = True
        os.kill(os.getpid(), signal.SIGTERM)

    def _watch(self) -> None:
        """Wait for the engine's death, then restart it (or give up and stop the launcher)."""
        while not self._stopping.is_set():
            procs = self.engine.processes()
            sentinels = [p.sentinel for p in procs]
            while not self._stopping.is_set():
                if connection.wait(sentinels, timeout=1.0):
                    break
            if self._stopping.is_set():
                return
            for p in procs:
                p.join(1.0)  # its sentinel fired: reap it, so that its exit code is known
            codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in procs)
            reason = f"the shared engine died ({codes})"
            self._write_state("dead", reason)
            log.error("%s; the workers fail their requests in flight (engine_dead)", reason)
            if not self._restart(reason):
                return

    def _restart(self, reason: str) -> bool:
        """Relaunch after a death, with a backoff and a limit; False once the host gave up or stops."""
        while True:
            now = time.monotonic()
            window = self.settings.engine_restart_window
            self.restarts = [t for t in self.restarts if now - t < window]
            if len(self.restarts) >= self.settings.engine_restarts:
                self._give_up(
                    f"{reason}; the engine was restarted {len(self.restarts)} time(s) in the last {window:g} s, "
                    f"the limit (--engine-restarts {self.settings.engine_restarts}): stopping the server"
                )
                return False
            self.restarts.append(now)
            delay = min(2.0 ** (len(self.restarts) - 1), MAX_BACKOFF)
            self.engine.stop_engine()  # what is left of the dead one (its model workers)
            log.warning(
                "restarting the shared engine in %g s (restart %d of at most %d in %g s)",
                delay,
                len(self.restarts),
                self.settings.engine_restarts,
                window,
            )
            if self._stopping.wait(delay):
                return False
            self._wait_for_clients_to_close()
            t0 = time.monotonic()
            try:
                self._launch()
            except Exception as exc:  # noqa: BLE001 - a failed relaunch counts as another death
                reason = f"the shared engine failed to restart: {type(exc).__name__}: {exc}"
                self._write_state("dead", reason)
                log.error("%s", reason)
                continue
            log.warning(
                "shared engine restarted in %.1f s (generation %d); EngineCore PID %s",
                time.monotonic() - t0,
                self.generation,
                ", ".join(str(p) for p in self.pids()),
            )
            return True

    def _wait_for_clients_to_close(self, timeout: float = 30.0) -> None:
        """Until every slot attached to the dead engine is released by its worker (which removes the
        slot's `used` marker once its client is closed) or has no worker (its lock is free)."""
        deadline = time.monotonic() + timeout
        while True:
            open_slots = [s for s in range(self.engine.client_count) if self._client_open(s)]
            if not open_slots:
                return
            if time.monotonic() > deadline or self._stopping.is_set():
                log.warning(
                    "slot(s) %s still hold a client of the dead engine; starting the new one anyway", open_slots
                )
                return
            time.sleep(0.1)

    def _client_open(self, slot: int) -> bool:
        if not os.path.exists(slot_used_path(self.slot_dir, slot)):
            return False
        fd = os.open(slot_lock_path(self.slot_dir, slot), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # a worker holds the slot and has not closed its client yet
        finally:
            os.close(fd)  # closing the descriptor releases the lock, if it was taken
        return False

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
