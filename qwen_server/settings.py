"""The one settings struct: the launcher's options, the environment, Granian's arguments and the app
all derive from it.

Every field is read from `QWEN_SERVER_<FIELD>` (upper case). The launcher turns its options into those
variables, which is how Granian's workers (separate processes) receive them. Engine fields keep
vLLM's names and are passed to `AsyncEngineArgs` unchanged, so vLLM's parallelism (tensor, pipeline,
data; the Ray backend for several nodes) works as it does under `vllm serve`. A field that Granian
takes declares its Granian argument (`GranianArg`); the process fields are Granian's alone: the
launcher hands them to Granian, the app reads none of them, and under plain `granian` its own flags
set them instead.
"""

from __future__ import annotations

import ipaddress
import os
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ENV_PREFIX = "QWEN_SERVER_"
# prometheus_client's variable, not a setting: the launcher points it at a directory its workers share.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Not settings either: what the launcher's engine host (--shared-engine) tells the workers it forks.
# Present, a worker attaches to that engine instead of building its own (engine/lifecycle.py).
ENGINE_HOST_SLOTS_ENV = "QWEN_ENGINE_HOST_SLOTS"  # JSON list, per slot: input/output address and listener fd
ENGINE_HOST_CLIENT_COUNT_ENV = "QWEN_ENGINE_HOST_CLIENT_COUNT"  # slots the engine was launched for
ENGINE_HOST_SLOT_DIR_ENV = "QWEN_ENGINE_HOST_SLOT_DIR"  # per-slot lock files, the recorded ready message

_ENGINE = {"group": "engine"}
_SERVER = {"group": "server"}
_MEDIA = {"group": "media"}
_PROCESS = {"group": "process"}


class GranianArg(typing.NamedTuple):
    """How a field reaches Granian: its keyword for Granian's server class and its `granian` CLI flag
    (Granian 2.8's names); `convert` turns the field's value into what the server class takes."""

    kwarg: str
    flag: str
    convert: Any = None


def _doc(text: str, group: dict[str, str] = _SERVER, granian: GranianArg | None = None) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={**group, "granian": granian})


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each variable and what is wrong."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    # --- model and engine (vLLM's names, passed through to AsyncEngineArgs) ---
    model: Annotated[
        str | None,
        _doc(
            "Model to serve: a Hugging Face id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local path. "
            "Unset: a built-in tiny demo model with random weights.",
            _ENGINE,
        ),
    ] = None
    tokenizer: Annotated[str | None, _doc("Tokenizer id or path (default: the model's).", _ENGINE)] = None
    revision: Annotated[str | None, _doc("Model revision (branch, tag or commit).", _ENGINE)] = None
    dtype: Annotated[str, _doc("Weight and activation dtype (auto, bfloat16, float16, float32).", _ENGINE)] = "auto"
    max_model_len: Annotated[int | None, _doc("Context length (prompt + output tokens).", _ENGINE)] = None
    tensor_parallel_size: Annotated[int, _doc("Tensor-parallel ranks.", _ENGINE)] = 1
    pipeline_parallel_size: Annotated[int, _doc("Pipeline-parallel stages.", _ENGINE)] = 1
    data_parallel_size: Annotated[int, _doc("Data-parallel engine replicas.", _ENGINE)] = 1
    distributed_executor_backend: Annotated[
        Literal["mp", "ray", "uni", "external_launcher"] | None,
        _doc("vLLM executor: mp, ray (several nodes), uni (one process), external_launcher.", _ENGINE),
    ] = None
    gpu_memory_utilization: Annotated[float, _doc("Fraction of accelerator memory for the engine.", _ENGINE)] = 0.9
    limit_mm_per_prompt: Annotated[
        dict[str, int] | None, _doc('Items per prompt by modality, JSON, e.g. {"image": 4}.', _ENGINE)
    ] = None
    mm_processor_kwargs: Annotated[
        dict[str, Any] | None, _doc('Multimodal processor options, JSON, e.g. {"max_pixels": 1003520}.', _ENGINE)
    ] = None
    enforce_eager: Annotated[bool, _doc("Disable CUDA graphs and compilation.", _ENGINE)] = False
    max_num_seqs: Annotated[int | None, _doc("Maximum sequences per engine step.", _ENGINE)] = None
    max_num_batched_tokens: Annotated[int | None, _doc("Maximum tokens per engine step.", _ENGINE)] = None
    trust_remote_code: Annotated[bool, _doc("Allow custom model code from the model repository.", _ENGINE)] = False
    seed: Annotated[int | None, _doc("Engine random seed.", _ENGINE)] = None
    enable_prefix_caching: Annotated[bool | None, _doc("Reuse KV cache across shared prefixes.", _ENGINE)] = None
    quantization: Annotated[str | None, _doc("Quantization method (awq, gptq, fp8, ...).", _ENGINE)] = None
    kv_cache_dtype: Annotated[str | None, _doc("KV cache dtype (auto, fp8, ...).", _ENGINE)] = None
    reasoning_parser: Annotated[
        str | None,
        _doc(
            "Split the model's reasoning from its answer with this vLLM reasoning parser (qwen3 for "
            "Qwen3-VL-Thinking): `reasoning` in messages and deltas, and structured output applied after it.",
            _ENGINE,
        ),
    ] = None
    enable_lora: Annotated[
        bool, _doc("Serve LoRA adapters on the base model (vLLM's; see --lora-modules).", _ENGINE)
    ] = False
    max_loras: Annotated[int | None, _doc("Adapters one engine step may use at once (vLLM's; default 1).", _ENGINE)] = (
        None
    )
    max_lora_rank: Annotated[
        int | None, _doc("Largest adapter rank accepted (vLLM's: 1, 8, 16, 32, 64, ...; default 16).", _ENGINE)
    ] = None
    scheduling_policy: Annotated[
        Literal["fcfs", "priority"] | None,
        _doc(
            "How the engine orders waiting requests (vLLM's): fcfs, or priority (a request's `priority` "
            "field, lower first; ties first come first served). Default: fcfs.",
            _ENGINE,
        ),
    ] = None
    engine_args: Annotated[
        dict[str, Any] | None,
        _doc('Any other AsyncEngineArgs field, JSON, e.g. {"swap_space": 4}; applied last.', _ENGINE),
    ] = None

    # --- server ---
    served_model_name: Annotated[
        list[str] | None, _doc("Name(s) clients use in `model`; the first is reported (default: --model).")
    ] = None
    host: Annotated[str, _doc("Address to bind.", granian=GranianArg("address", "--host"))] = "127.0.0.1"
    port: Annotated[int, _doc("TCP port to bind.", granian=GranianArg("port", "--port"))] = 8000
    # ASGI root_path: Litestar routes /prefix/v1/... and /v1/... alike.
    root_path: Annotated[
        str,
        _doc(
            "Path prefix when served behind a reverse proxy.",
            granian=GranianArg("url_path_prefix", "--url-path-prefix"),
        ),
    ] = ""
    workers: Annotated[
        int,
        _doc(
            "Worker processes (Granian's). With the shared engine (the default) they all attach to the "
            "launcher's one engine; with --no-shared-engine, and under plain `granian`, each has its own, and "
            "CPU engines split the CPUs into this many shares, one per worker, when each gets 2 cores or more "
            "(under plain `granian --workers N`, set this to N as well).",
            granian=GranianArg("workers", "--workers"),
        ),
    ] = 1
    max_request_body_bytes: Annotated[int, _doc("Largest request body accepted (images come inline as base64).")] = (
        64 * 1024 * 1024
    )
    retry_after_seconds: Annotated[int, _doc("Retry-After sent with 503 while the engine loads.")] = 5
    overload_retry_after_seconds: Annotated[
        int, _doc("Retry-After sent with 429 when a worker is at its limit of requests in progress.")
    ] = 1
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug"],
        _doc("Log level of the server.", granian=GranianArg("log_level", "--log-level")),
    ] = "info"
    log_format: Annotated[Literal["text", "json"], _doc("Log lines as text or as one JSON object per line.")] = "text"
    keep_off_engine_cores: Annotated[
        bool,
        _doc(
            "CPU engines: move this worker's threads (HTTP, JSON, images) off the cores vLLM pinned its "
            "model threads to, onto the cores it reserved. Helps short outputs, hurts long decodes on few "
            "cores (see benchmarks/README.md); no effect when vLLM pins nothing (GPUs)."
        ),
    ] = False
    engine_nice: Annotated[
        int,
        _doc(
            "CPU engines: run vLLM's EngineCore (and any engine process it did not pin to cores) at this "
            "nice value (0-19), so a core it shares with this worker goes to HTTP, JSON and image work "
            "first: it busy-waits while the model runs. 0 leaves it as started; no effect on GPU engines."
        ),
    ] = 10
    processor_threads: Annotated[
        int,
        _doc(
            "Torch threads for the model's image and video processor in each HTTP worker (vLLM runs it "
            "there, on one thread of its own). 0: torch's default, one per core; on 2 cores that cost "
            "more CPU per image than 1 for little or no gain in time (see benchmarks/README.md)."
        ),
    ] = 1
    api_key: Annotated[
        list[str] | None, _doc("API key(s) clients must send as `Authorization: Bearer <key>` on /v1/*.")
    ] = None
    api_key_file: Annotated[str | None, _doc("File with one API key per line (# comments allowed).")] = None
    protect_probes: Annotated[bool, _doc("Require the API key on /health and /metrics too.")] = False
    max_pending_requests: Annotated[
        int | None,
        _doc(
            "Inference requests a worker admits at once (in the engine or preparing); more get 429 at "
            "once. Default: 4 x the engine's max_num_seqs."
        ),
    ] = None
    request_timeout: Annotated[
        float | None, _doc("Seconds a request may take in all; then its engine request is aborted.")
    ] = None
    drain_timeout: Annotated[
        float, _doc("On SIGTERM, seconds in-flight requests may take to finish before they are aborted.")
    ] = 30.0
    cors_allow_origins: Annotated[
        list[str] | None, _doc("Origins allowed by CORS (e.g. https://app.example.com, or *); unset: no CORS.")
    ] = None
    trust_request_mm_kwargs: Annotated[
        bool,
        _doc(
            "Pass per-request mm_processor_kwargs beyond min_pixels/max_pixels to the model's processor "
            "(vLLM's name). Off: those two are accepted within the server's budget, any other key is a 400. "
            "Values that would crash the model (sizes that are not positive integers, patch sizes other "
            "than the model's) are refused either way."
        ),
    ] = False
    trust_request_chat_template: Annotated[
        bool, _doc("Accept a client's own Jinja template (`chat_template`, in the request or its kwargs; vLLM's name).")
    ] = False
    chat_template: Annotated[
        str | None,
        _doc(
            "The chat template: a file, the name of one of vLLM's built-in templates, or the Jinja text "
            "itself. Unset: the processor's template, or the tokenizer's when the request has tools (vLLM's order)."
        ),
    ] = None
    default_chat_template_kwargs: Annotated[
        dict[str, Any] | None,
        _doc('Template variables for every request, JSON, e.g. {"enable_thinking": false}; a request\'s own win.'),
    ] = None
    enable_auto_tool_choice: Annotated[
        bool, _doc('Let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser.')
    ] = False
    tool_call_parser: Annotated[
        str | None,
        _doc(
            "The vLLM tool parser that finds calls in the model's output (hermes for Qwen2.5-VL and Qwen3-VL); "
            'needed for tool_choice "auto", "required" and named.'
        ),
    ] = None
    tool_strict_level: Annotated[
        Literal["auto", "function", "parameter"],
        _doc(
            "How far tool calls are constrained by grammar (vLLM's): auto (forced calls, and the arguments of "
            "tools marked strict), function (every call's envelope), parameter (every tool as if strict)."
        ),
    ] = "auto"
    exclude_tools_when_tool_choice_none: Annotated[
        bool, _doc('Do not show the tools to the model when tool_choice is "none" (vLLM\'s).')
    ] = False
    lora_modules: Annotated[
        list[str] | None,
        _doc(
            "LoRA adapters served from the start, each NAME=PATH or vLLM's JSON form "
            '{"name": ..., "path": ..., "base_model_name": ...} (repeat the option for several); '
            "a request's `model` NAME runs on that adapter. Needs --enable-lora."
        ),
    ] = None
    allow_runtime_lora_updating: Annotated[
        bool,
        _doc(
            "Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes). Needs "
            "--enable-lora, --allowed-lora-path, an API key, and one worker (each worker keeps its own "
            "list of adapters)."
        ),
    ] = False
    allowed_lora_path: Annotated[
        str | None, _doc("Directory runtime-loaded adapters must be in (symlinks resolved first).")
    ] = None
    enable_prompt_tokens_details: Annotated[
        bool,
        _doc(
            "Send usage.prompt_tokens_details (vLLM's name): cached_tokens (prompt tokens the prefix cache "
            "served), and here also image_tokens and video_tokens."
        ),
    ] = False
    sse_keep_alive: Annotated[
        float | None,
        _doc(
            "Seconds a stream may go without a frame before an SSE comment (`: keep-alive`) is sent, so that "
            "proxies with idle timeouts keep it open while a request waits for the engine or a long prefill "
            "(a big video) produces nothing. Unset: none."
        ),
    ] = None
    max_messages: Annotated[int, _doc("Messages one chat request may hold.")] = 2048
    max_batch_prompts: Annotated[int, _doc("Prompts one /v1/completions request may hold (a list of prompts).")] = 64
    completion_max_tokens: Annotated[
        int, _doc("max_tokens of a /v1/completions request that sets none (OpenAI's default, 16).")
    ] = 16
    max_content_parts: Annotated[int, _doc("Content parts one chat message may hold.")] = 512
    max_json_depth: Annotated[
        int, _doc("Nesting depth of free-form JSON fields (mm_processor_kwargs, chat_template_kwargs, schemas).")
    ] = 64
    engine_restarts: Annotated[
        int,
        _doc(
            "Times the engine is restarted within --engine-restart-window seconds after it died (a vLLM "
            "bug, an OOM, a kill), with a backoff of 1, 2, 4... s (at most 30); past that, or if the first "
            "load fails, the launcher (shared engine) or the worker exits with the reason. 0: never restart."
        ),
    ] = 5
    engine_restart_window: Annotated[float, _doc("Seconds over which --engine-restarts are counted.")] = 600.0

    # --- media ---
    max_image_bytes: Annotated[int, _doc("Largest encoded image accepted.", _MEDIA)] = 20 * 1024 * 1024
    max_image_pixels: Annotated[
        int, _doc("Largest image (width x height) decoded; bigger ones are refused before decoding.", _MEDIA)
    ] = 64_000_000
    max_image_side: Annotated[int, _doc("Longest image side (pixels) decoded.", _MEDIA)] = 16384
    max_request_image_bytes: Annotated[int, _doc("Largest total of encoded image bytes in one request.", _MEDIA)] = (
        64 * 1024 * 1024
    )
    image_cache_bytes: Annotated[
        int, _doc("Decoded images kept for repeats (RGB bytes, per worker); 0 disables.", _MEDIA)
    ] = 256 * 1024 * 1024
    media_fetch_timeout: Annotated[float, _doc("Seconds a remote image fetch may take in all.", _MEDIA)] = 10.0
    media_max_redirects: Annotated[int, _doc("Redirects followed when fetching a remote image.", _MEDIA)] = 5
    max_video_bytes: Annotated[int, _doc("Largest encoded video accepted.", _MEDIA)] = 64 * 1024 * 1024
    max_video_seconds: Annotated[float, _doc("Longest video accepted (seconds, from its header).", _MEDIA)] = 300.0
    max_video_frame_pixels: Annotated[
        int, _doc("Largest video frame (width x height) decoded; bigger ones are refused before decoding.", _MEDIA)
    ] = 3840 * 2160
    max_video_source_frames: Annotated[
        int, _doc("Frames of a video read to reach the last one kept (longer videos are refused).", _MEDIA)
    ] = 18000
    max_video_frames: Annotated[
        int,
        _doc(
            "Frames kept from one video for the model, whatever the sampling rate asks "
            "(mm_processor_kwargs fps and max_frames may ask for fewer).",
            _MEDIA,
        ),
    ] = 256
    max_video_pixels: Annotated[
        int, _doc("Pixels of one video's kept frames at the model's size, all frames together.", _MEDIA)
    ] = 128 * 602112
    allowed_media_domains: Annotated[
        list[str] | None, _doc("Only these hosts may serve remote images (unset: any public host).", _MEDIA)
    ] = None
    allowed_media_networks: Annotated[
        list[str] | None,
        _doc("Non-public networks remote images may come from anyway, e.g. 10.0.0.0/8 (default: none).", _MEDIA),
    ] = None
    allowed_local_media_path: Annotated[
        str | None, _doc("Directory whose files may be sent as file: URLs or paths (unset: no local files).", _MEDIA)
    ] = None

    # --- processes (Granian's; the app reads none of these) ---
    reload: Annotated[
        bool,
        _doc(
            "Restart workers when the package's source changes (development).",
            _PROCESS,
            GranianArg("reload", "--reload"),
        ),
    ] = False
    workers_kill_timeout: Annotated[
        int,
        _doc(
            "Seconds a stopping worker may take (drain, engine shutdown) before it is killed.",
            _PROCESS,
            GranianArg("workers_kill_timeout", "--workers-kill-timeout"),
        ),
    ] = 60
    shared_engine: Annotated[
        bool,
        _doc(
            "The launcher starts ONE engine (after the port check, before Granian forks) and every worker "
            "attaches to it: --workers N shares one model copy, --reload and a worker's respawn keep the "
            "engine loaded, a dead worker's requests are aborted, a dead engine is restarted by the "
            "launcher (--engine-restarts). --no-shared-engine: one engine per worker, as under plain "
            "`granian` (which cannot host one). Not with --data-parallel-size > 1 or the Ray backend: "
            "there the launcher falls back to one engine per worker, and says so.",
        ),
    ] = True
    respawn_failed_workers: Annotated[
        bool,
        _doc(
            "Restart a worker that died (Granian's supervisor).",
            _PROCESS,
            GranianArg("respawn_failed_workers", "--respawn-failed-workers"),
        ),
    ] = False
    access_log: Annotated[
        bool, _doc("Log every request (Granian's access log).", _PROCESS, GranianArg("log_access", "--access-log"))
    ] = False
    backlog: Annotated[int, _doc("Listen backlog.", _PROCESS, GranianArg("backlog", "--backlog"))] = 1024
    backpressure: Annotated[
        int | None,
        _doc(
            "Connections one worker serves at once, idle keep-alive ones included; more wait in the listen "
            "queue (Granian's backpressure; default backlog / workers). Requests beyond "
            "--max-pending-requests are refused with 429 either way.",
            _PROCESS,
            GranianArg("backpressure", "--backpressure"),
        ),
    ] = None
    ssl_certfile: Annotated[
        str | None, _doc("TLS certificate (PEM).", _PROCESS, GranianArg("ssl_cert", "--ssl-certificate", Path))
    ] = None
    ssl_keyfile: Annotated[
        str | None, _doc("TLS private key (PEM).", _PROCESS, GranianArg("ssl_key", "--ssl-keyfile", Path))
    ] = None

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "port",
            "workers",
            "workers_kill_timeout",
            "backlog",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{env_name(name)}: must be at least 1, got {getattr(self, name)}")
        if self.port > 65535:
            problems.append(f"{env_name('port')}: must be at most 65535, got {self.port}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(
                f"{env_name('gpu_memory_utilization')}: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{env_name(name)}: must be at least 1, got {value}")
        for name in (
            "max_image_bytes",
            "max_image_pixels",
            "max_image_side",
            "max_request_image_bytes",
            "max_video_bytes",
            "max_video_frame_pixels",
            "max_video_source_frames",
            "max_video_frames",
            "max_video_pixels",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{env_name(name)}: must be at least 1, got {getattr(self, name)}")
        for name in (
            "max_messages",
            "max_content_parts",
            "max_json_depth",
            "max_batch_prompts",
            "completion_max_tokens",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{env_name(name)}: must be at least 1, got {getattr(self, name)}")
        if self.engine_restarts < 0:
            problems.append(f"{env_name('engine_restarts')}: must not be negative, got {self.engine_restarts}")
        if self.engine_restart_window <= 0:
            problems.append(f"{env_name('engine_restart_window')}: must be positive, got {self.engine_restart_window}")
        for name in ("image_cache_bytes", "media_max_redirects", "processor_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{env_name(name)}: must not be negative, got {getattr(self, name)}")
        if self.max_video_seconds <= 0:
            problems.append(f"{env_name('max_video_seconds')}: must be positive, got {self.max_video_seconds}")
        problems += self._lora_problems()
        if self.sse_keep_alive is not None and self.sse_keep_alive <= 0:
            problems.append(f"{env_name('sse_keep_alive')}: must be positive, got {self.sse_keep_alive}")
        if self.media_fetch_timeout <= 0:
            problems.append(f"{env_name('media_fetch_timeout')}: must be positive, got {self.media_fetch_timeout}")
        for network in self.allowed_media_networks or ():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                problems.append(f"{env_name('allowed_media_networks')}: {exc}")
        for name in ("max_pending_requests", "backpressure"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{env_name(name)}: must be at least 1, got {value}")
        for name in ("request_timeout", "drain_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{env_name(name)}: must be positive, got {value}")
        if self.api_key_file and not os.path.isfile(self.api_key_file):
            problems.append(f"{env_name('api_key_file')}: not a file: {self.api_key_file!r}")
        for name in ("ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value and not os.path.isfile(value):
                problems.append(f"{env_name(name)}: not a file: {value!r}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            problems.append(f"{env_name('ssl_certfile')} and {env_name('ssl_keyfile')} go together")
        if self.allowed_local_media_path and not os.path.isdir(self.allowed_local_media_path):
            problems.append(
                f"{env_name('allowed_local_media_path')}: not a directory: {self.allowed_local_media_path!r}"
            )
        if self.root_path and not self.root_path.startswith("/"):
            problems.append(f"{env_name('root_path')}: must start with '/', got {self.root_path!r}")
        if not 0 <= self.engine_nice <= 19:
            problems.append(
                f"{env_name('engine_nice')}: must be in 0..19 (a priority above normal needs privileges), "
                f"got {self.engine_nice}"
            )
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            problems.append(f"{env_name('enable_auto_tool_choice')}: needs {env_name('tool_call_parser')}")
        if problems:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))

    def _lora_problems(self) -> list[str]:
        problems = []
        try:
            adapters = self.static_adapters()
        except ValueError as exc:
            return [f"{env_name('lora_modules')}: {exc}"]
        if (adapters or self.allow_runtime_lora_updating) and not self.enable_lora:
            problems.append(f"{env_name('lora_modules')} and runtime updating need {env_name('enable_lora')}")
        names = [a.name for a in adapters]
        for name in sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.model_names))):
            problems.append(f"{env_name('lora_modules')}: the name {name!r} is taken (twice, or by the base model)")
        if self.allow_runtime_lora_updating:
            if not self.allowed_lora_path or not os.path.isdir(self.allowed_lora_path):
                problems.append(
                    f"{env_name('allow_runtime_lora_updating')}: needs {env_name('allowed_lora_path')}, a directory"
                )
            if not (self.api_key or self.api_key_file):
                problems.append(f"{env_name('allow_runtime_lora_updating')}: needs an API key (--api-key)")
            if self.workers != 1:
                problems.append(
                    f"{env_name('allow_runtime_lora_updating')}: needs --workers 1 (each worker keeps its own adapters)"
                )
        return problems

    # --- derived views ---

    def static_adapters(self) -> list[AdapterSpec]:
        """--lora-modules as (name, path, base model); raises ValueError naming a malformed one."""
        specs = []
        for item in self.lora_modules or ():
            text = item.strip()
            if text.startswith("{"):
                try:
                    spec = msgspec.json.decode(text, type=AdapterSpec)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    raise ValueError(f"{item!r}: {exc}") from None
            else:
                name, sep, adapter_path = text.partition("=")
                if not sep or not name or not adapter_path:
                    raise ValueError(f"{item!r}: expected NAME=PATH or a JSON object")
                spec = AdapterSpec(name=name, path=adapter_path)
            specs.append(spec)
        return specs

    @property
    def model_names(self) -> list[str]:
        """Names a request may use in `model`; the first is the one reported."""
        if self.served_model_name:
            return list(self.served_model_name)
        return [self.model or DEMO_MODEL_NAME]

    def admission_limit(self, max_num_seqs: int | None) -> int | None:
        """Inference requests a worker admits at once: the setting, else 4 x the engine's batch size
        (requests being prepared, waiting and running), else none until the engine is loaded."""
        if self.max_pending_requests is not None:
            return self.max_pending_requests
        return 4 * max_num_seqs if max_num_seqs else None

    def engine_kwargs(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for vLLM's AsyncEngineArgs: the engine fields that are set."""
        kwargs: dict[str, Any] = {"model": model_path, "served_model_name": self.model_names}
        for name in ENGINE_FIELDS:
            if name in ("model", "engine_args"):
                continue
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        kwargs.update(self.engine_args or {})
        return kwargs

    def to_env(self, only_changed: bool = True, exclude: Collection[str] = ()) -> dict[str, str]:
        """The environment that reproduces these settings (but the `exclude`d fields) in another process."""
        env = {}
        defaults = Settings()
        for name in FIELDS:
            if name in exclude:
                continue
            value = getattr(self, name)
            if only_changed and value == getattr(defaults, name):
                continue
            if value is None:
                continue
            env[env_name(name)] = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        return env


class AdapterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One --lora-modules entry (vLLM's JSON form)."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    path: Annotated[str, msgspec.Meta(min_length=1)]
    base_model_name: str | None = None


DEMO_MODEL_NAME = "qwen-server-demo"


def _field_meta() -> dict[str, tuple[Any, msgspec.Meta]]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    return {name: (hint.__origin__, hint.__metadata__[0]) for name, hint in hints.items()}


def _extra(meta: msgspec.Meta) -> dict[str, Any]:
    """The group and Granian argument that `_doc` gives every field (msgspec types `extra` as optional)."""
    if meta.extra is None:
        raise TypeError("every Settings field is declared with _doc()")
    return meta.extra


# name -> (type, Meta with the help text and group), in declaration order.
FIELDS: dict[str, tuple[Any, msgspec.Meta]] = _field_meta()
ENGINE_FIELDS = tuple(name for name, (_, meta) in FIELDS.items() if _extra(meta)["group"] == "engine")
PROCESS_FIELDS = tuple(name for name, (_, meta) in FIELDS.items() if _extra(meta)["group"] == "process")
# field -> its Granian argument, for the fields Granian takes.
GRANIAN_ARGS: dict[str, GranianArg] = {
    name: _extra(meta)["granian"] for name, (_, meta) in FIELDS.items() if _extra(meta)["granian"]
}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def parse_value(field: str, raw: str) -> Any:
    """Turn one environment string into the value msgspec validates: containers come as JSON,
    and a list may also be given comma-separated."""
    kind = typing.get_origin(strip_optional(FIELDS[field][0]))
    if kind is dict:
        return msgspec.json.decode(raw)
    if kind is list:
        stripped = raw.strip()
        if stripped.startswith("["):
            return msgspec.json.decode(stripped)
        if stripped.startswith("{"):  # one JSON object (a --lora-modules entry): its commas are its own
            return [stripped]
        return [part.strip() for part in stripped.split(",") if part.strip()]
    return raw


def strip_optional(tp: Any) -> Any:
    """`X | None` -> `X`; any other type as it is."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from `QWEN_SERVER_*` variables; every bad value is named in one error."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    unknown = sorted(
        key for key in environ if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() not in FIELDS
    )
    for key in unknown:
        problems.append(f"{key}: not a known setting")
    for name in FIELDS:
        raw = environ.get(env_name(name))
        if raw is None or raw == "":
            continue
        try:
            # Each field is converted alone, so that every bad value gets its own line.
            values[name] = convert_value(name, raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            problems.append(f"{env_name(name)}={raw!r}: {short_error(exc)}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    return Settings(**values)


def convert_value(field: str, raw: Any) -> Any:
    """One field's value from a string (environment, command line) or an already-typed value;
    raises msgspec's ValidationError or DecodeError."""
    parsed = parse_value(field, raw) if isinstance(raw, str) else raw
    return msgspec.convert(parsed, FIELDS[field][0], strict=False)


def short_error(exc: Exception) -> str:
    """msgspec's message without its `- at $...` suffix (the caller names the setting)."""
    return str(exc).split(" - at ")[0]
