"""The vLLM engine's lifecycle: load in the background, report readiness, notice death, restart, shut down.

The worker answers HTTP while the engine loads (`/live` 200, `/health` 503 `loading` with the
stage), because the load runs in a thread started from the app's lifespan. vLLM is imported there
too, so importing the app stays cheap. An engine that dies after it was ready (a vLLM bug, an OOM,
a kill) is restarted in place, with a backoff and a limit (`engine_restarts` per
`engine_restart_window`): /health says `dead`, then `loading`, then `ready`, and the port never
closes. A first load that fails, or deaths past the limit, end the worker process (non-zero), so
that the supervisor (Granian, the launcher, systemd, Kubernetes) sees it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fcntl
import gc
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, TYPE_CHECKING, Any

from qwen_server import metrics, procs
from qwen_server import settings as settings_mod
from qwen_server.demo import model as demo
from qwen_server.engine import cpushare, host, vllm_compat
from qwen_server.engine.adapters import Adapters
from qwen_server.errors import Kind, ServiceError
from qwen_server.media.image import Geometry, geometry_of
from qwen_server.media.video import VideoGeometry
from qwen_server.settings import Settings

if TYPE_CHECKING:
    from qwen_server.engine.vllm_compat import AsyncLLM

log = logging.getLogger("qwen_server")

_WATCH_INTERVAL = 1.0
_MAX_BACKOFF = 30.0


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class Engine:
    """Owns one vLLM AsyncLLM for this worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = EngineState.LOADING
        self.stage = "waiting to start"
        self.error: str | None = None
        self.client: AsyncLLM | None = None
        self.tokenizer: Any = None
        self.max_model_len: int | None = None
        # Bytes of the vocabulary's longest token: a text of more than max_model_len times this many
        # characters cannot fit the context, and is refused without being tokenized.
        self.longest_token = 1
        self.vocab_size = 0  # token ids a prompt may hold: [0, vocab_size)
        self.sampling_defaults: dict[str, Any] = {}  # the model's generation_config
        self.max_num_seqs: int | None = None
        self.model_path: str | None = None
        # The model's image pixel budget, so media can size images before the processor sees them.
        self.image_geometry: Geometry | None = None
        self.video_geometry: VideoGeometry | None = None  # None: the model takes no video we can size
        self.model_config: Any = None  # vLLM's, for its chat template handling
        self.chat_template: str | None = None  # --chat-template's text
        # vLLM's parser of reasoning and tool calls (a class: one instance per choice), or None.
        self.output_parser: type | None = None
        self.adapters = Adapters(settings)  # LoRA adapters a request's `model` may name
        self.loaded_in: float | None = None
        # The scheduler's latest counts, reported by EngineCore after each step it runs.
        self.scheduler_stats: Any = None
        # vLLM's multimodal processor cache since start: items looked up, items found.
        self.mm_cache_queries = 0
        self.mm_cache_hits = 0
        self._t0 = time.monotonic()
        self._stage_t0 = self._t0
        self._tasks: list[asyncio.Task] = []
        self._cpu_share: IO[str] | None = None  # this worker's claim on its CPUs, held while it lives
        self.restarts: list[float] = []  # monotonic times of the restarts within the window
        # Engine request ids in flight, so that a death can be traced to the requests it hit.
        self._inflight: collections.Counter[str] = collections.Counter()
        self._hit_by_death: set[str] = set()
        # Attached mode (--shared-engine): the launcher's engine host left its slots in the environment;
        # this worker attaches to that engine instead of building one. None: embedded (one engine here).
        self.attach = Attachment.from_env(os.environ)

    # --- lifecycle ---

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._tasks.append(asyncio.create_task(self._run(), name="engine"))

    async def stop(self) -> None:
        self.begin_drain()
        for task in self._tasks:
            task.cancel()
        if self.client is None:
            # Still loading: the load thread waits on vLLM's EngineCore; ending our children makes
            # it fail at once instead of finishing a load nobody wants.
            procs.terminate_children(os.getpid(), grace=3.0)
        else:
            client, self.client = self.client, None
            await asyncio.to_thread(vllm_compat.shutdown_client, client)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("engine stopped")

    def begin_drain(self) -> None:
        """/health reports draining from now on; the load (if still running) is abandoned at stop."""
        if self.state is not EngineState.DEAD:
            self.state = EngineState.DRAINING

    async def _run(self) -> None:
        """Load, watch, and restart after a death until the restart limit; then end the worker."""
        first = True
        while True:
            failure = await self._load()
            if failure is None:
                first = False
                failure = await self._watch()
            if failure is None or self.state is EngineState.DRAINING:
                return
            reason, exc = failure
            if first:  # the model, the options or the machine: restarting would fail the same way
                self._die(reason, exc)
                return
            if not await self._recover(reason, exc):
                return

    async def _recover(self, reason: str, exc: BaseException | None) -> bool:
        """After a death: clear what is left of the engine, wait the backoff, and let `_run` load
        again. False (the worker is ending) past the restart limit."""
        if self.attach is not None:
            return await self._recover_attached(reason)
        now = time.monotonic()
        window = self.settings.engine_restart_window
        self.restarts = [t for t in self.restarts if now - t < window]
        inflight = sorted(self._hit_by_death | set(self._inflight))
        self._hit_by_death.clear()
        log.error(
            "%s; engine requests in flight then: %s",
            reason[0].upper() + reason[1:],
            ", ".join(inflight) if inflight else "none",
        )
        if len(self.restarts) >= self.settings.engine_restarts:
            self._die(
                f"{reason}; the engine was restarted {len(self.restarts)} time(s) in the last {window:g} s, "
                f"the limit (--engine-restarts {self.settings.engine_restarts})",
                exc,
            )
            return False
        self.restarts.append(now)
        delay = min(2.0 ** (len(self.restarts) - 1), _MAX_BACKOFF)
        self.state = EngineState.DEAD
        self.error = (
            f"{reason}; restarting in {delay:g} s (restart {len(self.restarts)} of at most "
            f"{self.settings.engine_restarts} in {window:g} s)"
        )
        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(vllm_compat.shutdown_client, client), timeout=30)
            except Exception as err:  # noqa: BLE001 - a dead engine's client may fail to shut down cleanly
                log.warning("the dead engine's client did not shut down cleanly: %r", err)
        # Whatever is left of the old engine (its model workers, vLLM's resource tracker) goes.
        await asyncio.to_thread(procs.terminate_children, os.getpid(), 3.0)
        await asyncio.sleep(delay)
        if self.state is not EngineState.DEAD:  # drained meanwhile
            return False
        self.state = EngineState.LOADING
        self.stage = "waiting to start"
        self._t0 = time.monotonic()
        log.warning("restarting the engine (restart %d in the last %g s)", len(self.restarts), window)
        return True

    async def _recover_attached(self, reason: str) -> bool:
        """The shared engine died: its host restarts it (backoff and limit are the host's). Fail what is in
        flight, let go of the dead engine's client (the host waits for that before the new engine
        starts), and let `_run` re-attach once the host reports the new engine ready."""
        inflight = sorted(self._hit_by_death | set(self._inflight))
        self._hit_by_death.clear()
        log.error(
            "%s; engine requests in flight then: %s", reason[0].upper() + reason[1:], ", ".join(inflight) or "none"
        )
        self.state = EngineState.DEAD
        self.error = f"{reason}; the launcher is restarting the shared engine"
        client, self.client = self.client, None
        if client is not None:
            vllm_compat.mark_engine_dead(client, reason)
            try:
                await asyncio.wait_for(asyncio.to_thread(vllm_compat.shutdown_client, client), timeout=30)
            except Exception as err:  # noqa: BLE001 - a dead engine's client may fail to shut down cleanly
                log.warning("the dead engine's client did not shut down cleanly: %r", err)
        assert self.attach is not None
        self.attach.detach()
        await asyncio.sleep(0.5)  # an attach that failed is not retried in a tight loop
        # /health says `dead` (and why) until the host's next engine is up; then `loading` while attaching.
        while self.state is EngineState.DEAD:
            if (final := self.attach.host_gave_up()) is not None:
                self._die(final, None)
                return False
            if self.attach.engine_ready():  # the next one (or the same, if it was our attach that failed)
                break
            await asyncio.sleep(0.25)
        if self.state is not EngineState.DEAD:  # drained meanwhile
            return False
        self.state = EngineState.LOADING
        self.stage = "waiting to start"
        self._t0 = time.monotonic()
        return True

    async def _load(self) -> tuple[str, BaseException | None] | None:
        """Build the engine; None once it is ready, else why it failed."""
        try:
            self._set_stage("locating the model")
            if self.settings.model:
                path = self.settings.model
            else:
                path = str(await asyncio.to_thread(demo.demo_model_path))
                log.warning(demo.NOISE_WARNING)
            self.model_path = path
            self._set_stage("importing vLLM")
            engine_args_cls, async_llm_cls, usage_context_cls = await asyncio.to_thread(vllm_compat.engine_classes)
            self._set_stage("checking the chat options (parsers, template)")
            self.chat_template = await asyncio.to_thread(vllm_compat.check_chat_options, self.settings)
            stat_loggers = [_scheduler_stats_recorder(self), metrics.engine_stat_logger(self.attach is not None)]
            if self.attach is not None:
                self._set_stage("waiting for the shared engine (the launcher loads it)")
                await self.attach.wait_engine_ready(lambda: self.state is EngineState.LOADING)
                self._set_stage("attaching to the shared engine")
                client = await self.attach.connect(stat_loggers)
            else:
                if self.settings.workers > 1 and self._cpu_share is None:
                    self._set_stage("claiming this worker's share of the CPUs")
                    self._cpu_share = await asyncio.to_thread(cpushare.claim, self.settings)
                self._set_stage("starting the engine (config, weights, memory profiling, KV cache)")
                kwargs = self.settings.engine_kwargs(path)
                args = engine_args_cls(**(kwargs if self.settings.model else demo.engine_overrides(kwargs)))
                client = await asyncio.to_thread(
                    async_llm_cls.from_engine_args,
                    args,
                    # vLLM's server context: its batch defaults (max_num_seqs, max_num_batched_tokens) are
                    # the server's, larger on big GPUs than the plain engine's.
                    usage_context=usage_context_cls.OPENAI_API_SERVER,
                    stat_loggers=stat_loggers,
                )
            if self.state is not EngineState.LOADING:  # stopped while loading
                await asyncio.to_thread(vllm_compat.shutdown_client, client)
                return None
            self.client = client
            if self.settings.processor_threads:
                self._set_stage("limiting the processor's torch threads")
                threads = await asyncio.to_thread(
                    vllm_compat.limit_processor_threads, client, self.settings.processor_threads
                )
                log.info("the model's processor runs on %d torch thread(s)", threads)
            self.tokenizer = client.get_tokenizer()
            self.longest_token = await asyncio.to_thread(_longest_token, self.tokenizer)
            self.max_model_len = vllm_compat.max_model_len(client)
            self.vocab_size = vllm_compat.vocab_size(client)
            self.sampling_defaults = vllm_compat.generation_defaults(client)
            self.max_num_seqs = vllm_compat.max_num_seqs(client)
            self.model_config = client.model_config
            self.output_parser = vllm_compat.output_parser_class(self.settings, self.tokenizer, path)
            self._set_stage("inspecting the image processor")
            self.image_geometry = await asyncio.to_thread(_image_geometry, client.model_config)
            self.video_geometry = await asyncio.to_thread(video_geometry_of, client.model_config)
            if len(self.adapters):
                self._set_stage("loading the LoRA adapters")
                await self.adapters.preload(client)
            # The engine's processes: this worker's children, or the shared engine's (the launcher's).
            engine_procs = procs.descendants(os.getpid()) if self.attach is None else self.attach.engine_processes()
            if self.settings.keep_off_engine_cores:
                _keep_off_engine_cores(engine_procs)
            if self.settings.engine_nice and vllm_compat.device_type(client) == "cpu":
                _renice_engine(self.settings.engine_nice, engine_procs)
            frozen = _freeze_heap()
            self.loaded_in = time.monotonic() - self._t0
            self.state = EngineState.READY
            self._set_stage("ready")
            log.info(
                "engine ready in %.1f s: model %s, max_model_len %d; %d startup objects frozen out of GC",
                self.loaded_in,
                path,
                self.max_model_len,
                frozen,
            )
            return None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any load failure is reported to _run
            if self.state is not EngineState.LOADING:
                return None
            return f"the engine failed to load during '{self.stage}': {type(exc).__name__}: {exc}", exc

    async def _watch(self) -> tuple[str, None] | None:
        """Wait until the engine dies (its reason) or is stopped (None)."""
        while self.state is EngineState.READY or self.state is EngineState.DRAINING:
            await asyncio.sleep(_WATCH_INTERVAL)
            client = self.client
            if client is None:
                return None
            if self.attach is not None and (gone := self.attach.engine_gone()) is not None:
                # An attached client has no engine monitor: the host's word is how a death is known.
                vllm_compat.mark_engine_dead(client, gone)
                return gone, None
            if client.errored:
                return f"the engine died: {client.dead_error!r}", None
        return None

    async def generate(self, prompt: Any, sampling: Any, request_id: str, **options: Any) -> AsyncIterator[Any]:
        """The engine's outputs for one request (a 503 when it is not ready); `options` are
        AsyncLLM.generate's keywords (the reasoning state structured output starts from)."""
        client = self.require_client()
        outputs = client.generate(prompt, sampling, request_id, **options)
        self._inflight[request_id] += 1
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()  # a consumer that stopped early: vLLM aborts the request on close
            if client.errored:  # ended by the engine's death: named when the death is logged
                self._hit_by_death.add(request_id)
            self._inflight[request_id] -= 1
            if not self._inflight[request_id]:
                del self._inflight[request_id]

    def _die(self, reason: str, exc: BaseException | None) -> None:
        self.state = EngineState.DEAD
        self.error = reason
        log.error(
            "\n%s\n"
            "  model: %s\n"
            "  engine options: %s\n"
            "  This worker exits now so that its supervisor sees the failure. Check the model path or id,\n"
            "  the engine options (they are vLLM's own: see `vllm serve --help`), and free memory\n"
            "  (on vLLM's CPU build, size the KV cache with VLLM_CPU_KVCACHE_SPACE=<GiB>).\n",
            reason[0].upper() + reason[1:],
            self.model_path or self.settings.model,
            self.settings.engine_kwargs(self.model_path or "")
            | ({} if self.settings.model else {"model": "(built-in demo)"}),
            exc_info=exc,
        )
        # SIGTERM to ourselves: Granian stops this worker gracefully (lifespan shutdown runs), and its
        # supervisor, seeing a worker it did not stop, exits non-zero.
        os.kill(os.getpid(), signal.SIGTERM)

    def _set_stage(self, stage: str) -> None:
        now = time.monotonic()
        if self.stage != "waiting to start":
            log.info("engine load: %s done in %.1f s", self.stage, now - self._stage_t0)
        log.info("engine load: %s (%.1f s since start)", stage, now - self._t0)
        self.stage = stage
        self._stage_t0 = now

    # --- status ---

    def dead_reason(self) -> str | None:
        """Why the engine is dead, or None. A client that errored counts at once: the watch loop
        only looks every second, and /health must not report a dead engine as "ready" meanwhile."""
        if self.state is EngineState.DEAD:
            return self.error
        client = self.client
        if client is not None and client.errored:
            return f"the engine died: {client.dead_error!r}"
        return None

    def status(self) -> dict[str, Any]:
        if (reason := self.dead_reason()) is not None:
            return {"status": EngineState.DEAD.value, "reason": reason}
        body: dict[str, Any] = {"status": self.state.value}
        if self.state is EngineState.LOADING:
            body["stage"] = self.stage
            body["elapsed_seconds"] = round(time.monotonic() - self._t0, 1)
        elif self.client is not None:
            body["worker_pid"] = os.getpid()
            body["engine_mode"] = "embedded" if self.attach is None else f"attached (slot {self.attach.slot})"
            # Requests this worker still tracks, and the scheduler's own counts (running, waiting; with a
            # shared engine each step's counts reach one of its clients only).
            body["requests_in_engine"] = self.client.get_num_unfinished_requests()
            stats = self.scheduler_stats
            body["scheduler"] = {
                "running": stats.num_running_reqs if stats else 0,
                "waiting": stats.num_waiting_reqs if stats else 0,
            }
            body["mm_cache"] = {"queries": self.mm_cache_queries, "hits": self.mm_cache_hits}
        return body

    @property
    def ready(self) -> bool:
        client = self.client
        return self.state is EngineState.READY and client is not None and not client.errored

    def require_client(self) -> AsyncLLM:
        """The engine, or an UNAVAILABLE error telling the client when to retry."""
        client = self.client
        if self.ready and client is not None:
            return client
        retry = self.settings.retry_after_seconds
        if (reason := self.dead_reason()) is not None:
            raise ServiceError(
                Kind.UNAVAILABLE, f"The engine is not available: {reason}", code="engine_dead", retry_after=retry
            )
        if self.state is EngineState.LOADING:
            raise ServiceError(
                Kind.UNAVAILABLE,
                f"The model is loading ({self.stage}); retry shortly.",
                code="loading",
                retry_after=retry,
            )
        raise ServiceError(Kind.UNAVAILABLE, "The server is shutting down.", code="draining", retry_after=retry)


class Attachment:
    """This worker's slot on the launcher's shared engine (engine/host.py): a free slot taken with
    flock() on its lock file (the kernel frees it when the worker dies, so a respawned or reloaded
    worker finds it free, and the engine aborts what the dead one left running), the client attached
    to it, and the host's word on the engine (its generation: a restarted engine is a new one)."""

    def __init__(self, slots: list[dict[str, Any]], client_count: int, slot_dir: str) -> None:
        self.slots = slots
        self.client_count = client_count
        self.slot_dir = slot_dir
        self.slot: int | None = None
        self.generation: int | None = None  # of the engine this worker's client is attached to
        self._lock_fd: int | None = None

    @classmethod
    def from_env(cls, environ: Any) -> Attachment | None:
        raw = environ.get(settings_mod.ENGINE_HOST_SLOTS_ENV)
        if not raw:
            return None
        return cls(
            json.loads(raw),
            int(environ[settings_mod.ENGINE_HOST_CLIENT_COUNT_ENV]),
            environ[settings_mod.ENGINE_HOST_SLOT_DIR_ENV],
        )

    def _take_slot(self) -> int:
        if self.slot is not None:
            return self.slot
        # The engine tries each lock for an instant every 0.2 s (to see a client die): a slot found
        # busy is tried again a few times before it counts as another worker's.
        for _ in range(10):
            for slot in range(self.client_count):
                fd = os.open(host.slot_lock_path(self.slot_dir, slot), os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self._lock_fd, self.slot = fd, slot  # held (open) for the life of this process
                return slot
            time.sleep(0.05)
        raise RuntimeError(f"all {self.client_count} slots of the shared engine are taken by other workers")

    def engine_gone(self) -> str | None:
        """Why the engine this worker is attached to is gone (the host says so), or None."""
        state = host.read_state(self.slot_dir)
        if state.get("generation") == self.generation and state.get("state") == "ready":
            return None
        return state.get("reason") or "the shared engine is gone"

    def host_gave_up(self) -> str | None:
        """The host's reason, once it will not restart the engine any more."""
        state = host.read_state(self.slot_dir)
        if state.get("state") != "failed":
            return None
        return str(state.get("reason") or "the shared engine failed")

    def engine_processes(self) -> list[int]:
        """The shared engine's processes (EngineCore and its model workers), as its host reported them."""
        roots = host.read_state(self.slot_dir).get("pids", [])
        return [pid for root in roots for pid in (root, *procs.descendants(root))]

    def engine_ready(self) -> bool:
        return host.read_state(self.slot_dir).get("state") == "ready"

    async def wait_engine_ready(self, still_wanted: Callable[[], bool]) -> None:
        """Until the host reports its engine ready (at once, unless it is being restarted)."""
        while still_wanted():
            if self.engine_ready():
                return
            if (final := self.host_gave_up()) is not None:
                raise RuntimeError(f"the shared engine will not be restarted: {final}")
            await asyncio.sleep(0.25)

    async def connect(self, stat_loggers: list[Any]) -> AsyncLLM:
        slot = await asyncio.to_thread(self._take_slot)
        self.generation = host.read_state(self.slot_dir).get("generation")
        used = os.path.exists(host.slot_used_path(self.slot_dir, slot))
        t0 = time.monotonic()
        client = await asyncio.to_thread(
            vllm_compat.attach_client,
            host.inherited_config(),
            self.slots[slot],
            self.client_count,
            slot,
            os.path.join(self.slot_dir, host.READY_PAYLOAD),
            used,
            stat_loggers,
        )
        attempts = await vllm_compat.confirm_route(client) if used else 0
        open(host.slot_used_path(self.slot_dir, slot), "w").close()
        log.info(
            "attached to the shared engine (generation %s) on slot %d of %d in %.2f s (%s)",
            self.generation,
            slot,
            self.client_count,
            time.monotonic() - t0,
            f"slot re-used: ready message replayed, route confirmed in {attempts} attempt(s)" if used else "new slot",
        )
        return client

    def detach(self) -> None:
        """This worker's client of a dead engine is closed: tell the host, which waits for every
        slot's before it starts the next engine (a client still open would swallow its ready message)."""
        if self.slot is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(host.slot_used_path(self.slot_dir, self.slot))
        self.generation = None


def _scheduler_stats_recorder(engine: Engine):
    """A vLLM stat logger that keeps the latest SchedulerStats on `engine` (vLLM calls it per step)."""

    def on_stats(scheduler_stats: Any, mm_cache_stats: Any) -> None:
        if scheduler_stats is not None:
            engine.scheduler_stats = scheduler_stats
        if mm_cache_stats is not None:
            engine.mm_cache_queries += mm_cache_stats.queries
            engine.mm_cache_hits += mm_cache_stats.hits

    return vllm_compat.scheduler_stats_logger(on_stats)


def _longest_token(tokenizer: Any) -> int:
    return max((len(token.encode()) for token in tokenizer.get_vocab()), default=1)


def _keep_off_engine_cores(engine_procs: list[int]) -> None:
    """On a CPU engine vLLM pins each model (OpenMP) thread to a core of its own and leaves the rest
    "reserved" for everything else (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU). A front-end
    thread scheduled on a pinned core stalls the model's step, and with it every request. Moving this
    worker's threads to the other cores (opt-in) helped short outputs on 2 cores (224 px c16, 16
    tokens: median 53 -> 89 req/s) but halved long decodes (128 tokens: ~21 -> ~12), where the front
    end then shares its one core with EngineCore. Nothing happens when nothing was pinned (GPU
    engines) or no other core is left."""
    mine = os.sched_getaffinity(0)
    pinned = set().union(*(procs.pinned_cpus(pid) for pid in engine_procs))
    rest = mine - pinned
    if not pinned or not rest:
        return
    procs.restrict_cpus(os.getpid(), rest)
    log.info("front end kept off the engine's pinned cores %s: runs on %s", sorted(pinned), sorted(rest))


def _renice_engine(nice: int, engine_procs: list[int]) -> None:
    """vLLM's CPU engine busy-waits: EngineCore spins on shared memory for the model worker's output
    while the model runs (sched_yield in a loop, for 1 s after each message). On few cores that spin
    holds the cores this worker needs to parse requests, decode images and stream tokens, so the
    requests the engine waits for arrive late; at a lower priority it still gets every cycle nobody
    else wants. Processes with a thread vLLM pinned to a core of its own (the model workers) keep
    their priority: that core is theirs, and a niced model thread lets anything that lands there
    stall the step (224 px c1: 14 req/s with the workers niced too, 18.5 without)."""
    changed = 0
    try:
        for pid in engine_procs:
            if not procs.pinned_cpus(pid):
                changed += procs.renice(pid, nice)
    except PermissionError:  # this worker already runs above `nice`; raising priority needs a privilege
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        log.warning("engine processes left at this worker's nice %d: %d would raise their priority", mine, nice)
        return
    log.info(
        "engine processes not pinned to cores run at nice %d (%d threads): a core they share goes to "
        "the front end first",
        nice,
        changed,
    )


def _freeze_heap() -> int:
    """Move what the load built (torch, transformers, vLLM: ~700k objects) out of the collector's
    reach, as vLLM's own server does: those objects live as long as the worker, and one full
    collection walking them stalled the event loop for ~385 ms on this machine. Returns how many
    objects are frozen. Runs on the loop: a collection holds the GIL, so a thread would not help."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _image_geometry(model_config: Any) -> Geometry | None:
    """The pixel budget of the image processor vLLM uses for this model (server-wide
    mm_processor_kwargs applied), or None when the model has no image processor we pre-size for."""
    if not model_config.is_multimodal_model:
        return None
    try:
        processor = vllm_compat.cached_image_processor(model_config)
    except Exception as exc:  # noqa: BLE001 - no pre-sizing then; vLLM's processor still sizes images
        log.warning("image processor not inspected (%s): images go to the model's processor at full size", exc)
        return None
    geometry = geometry_of(processor)
    log.info("image budget: %s", geometry or f"none for {type(processor).__name__}, images passed at full size")
    return geometry


def video_geometry_of(model_config: Any) -> VideoGeometry | None:
    """The budget and frame sampler of the video processor vLLM uses for this model, or None when it
    has none this server decodes for (video parts are then refused)."""
    if not model_config.is_multimodal_model:
        return None
    try:
        processor = vllm_compat.cached_video_processor(model_config)
        sample = vllm_compat.video_sampler(processor)
    except Exception as exc:  # noqa: BLE001 - no video processor: the model takes no video
        log.info("no video processor (%s): video parts are refused", exc)
        return None
    size = getattr(processor, "size", None)
    low = getattr(size, "shortest_edge", None) or getattr(processor, "min_pixels", None)
    high = getattr(size, "longest_edge", None) or getattr(processor, "max_pixels", None)
    if sample is None or not (low and high):
        log.info(
            "video parts are refused: %s is not a video processor this server samples for", type(processor).__name__
        )
        return None
    geometry = VideoGeometry(
        factor=processor.patch_size * processor.merge_size,
        min_pixels=int(low),
        max_pixels=int(high),
        temporal_patch=processor.temporal_patch_size,
        per_clip=type(processor).__name__.startswith("Qwen3VL"),
        fps=float(getattr(processor, "fps", None) or 2.0),
        max_frames=int(processor.max_frames),
        sample=sample,
    )
    log.info("video budget: %s", geometry)
    return geometry
