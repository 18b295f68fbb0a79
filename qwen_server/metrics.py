"""Prometheus metrics: HTTP, admission and images here; the engine's under vLLM's own names.

The engine metrics (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) come from
vLLM's own `PrometheusStatLogger`, so dashboards made for `vllm serve` work unchanged.

Several workers: the launcher gives every worker one `PROMETHEUS_MULTIPROC_DIR` (set before
prometheus_client is imported there) and `/metrics` merges all workers' files, whichever worker
answers the scrape. Counters and histograms add up; gauges, vLLM's included, carry a `pid` label
per live worker (so `sum(vllm:num_requests_running)` is the server's total), except vLLM's gauges
under --shared-engine, which describe the one engine and appear once. Without that
variable (one process, e.g. plain `granian`), the default registry is used.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from qwen_server.engine import vllm_compat
from qwen_server.settings import PROMETHEUS_MULTIPROC_ENV

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_IMAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HTTP_REQUESTS = Counter(
    "qwen_server_http_requests_total", "HTTP requests answered, by route and status.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "qwen_server_http_request_duration_seconds",
    "Seconds from the request to the end of its response body, by route.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "qwen_server_http_requests_in_flight", "HTTP requests being served.", multiprocess_mode="livesum"
)
REJECTED = Counter(
    "qwen_server_requests_rejected_total",
    "Requests refused before any work (unauthorized, overloaded, draining) or cut (timeout, drain_abort).",
    ["reason"],
)
IMAGE_SECONDS = Histogram(
    "qwen_server_image_seconds",
    "Seconds per image, by source and stage (read, decode).",
    ["source", "stage"],
    buckets=_IMAGE_BUCKETS,
)
IMAGE_BYTES = Counter("qwen_server_image_bytes_total", "Encoded image bytes received, by source.", ["source"])
IMAGES = Counter(
    "qwen_server_images_total", "Images served, by result (decoded, or found in the decoded-image cache).", ["result"]
)
IMAGE_REJECTIONS = Counter("qwen_server_image_rejections_total", "Images refused, by reason.", ["reason"])
VIDEO_SECONDS = Histogram(
    "qwen_server_video_seconds",
    "Seconds per video, by source and stage (read, decode).",
    ["source", "stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
VIDEO_BYTES = Counter("qwen_server_video_bytes_total", "Encoded video bytes received, by source.", ["source"])
VIDEOS = Counter(
    "qwen_server_videos_total", "Videos served, by result (decoded, or found in the decoded-media cache).", ["result"]
)
VIDEO_FRAMES = Counter("qwen_server_video_frames_total", "Video frames decoded and kept for the model.")
VIDEO_REJECTIONS = Counter("qwen_server_video_rejections_total", "Videos refused, by reason.", ["reason"])


def render() -> tuple[bytes, str]:
    """The exposition text and its content type: all workers' metrics when multiprocess."""
    if os.environ.get(PROMETHEUS_MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited() -> None:
    """Drop this worker's live gauges from the shared directory (counters stay: they are totals)."""
    if os.environ.get(PROMETHEUS_MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())


def engine_stat_logger(shared_engine: bool) -> Any:
    """vLLM's Prometheus stat logger. One engine per worker: its gauges made per worker (see the
    module docstring), since vLLM's `mostrecent` would report one engine's value for all. Workers
    attached to one shared engine: vLLM's gauges as they are, as under `vllm serve --api-server-count`:
    each engine step's scheduler stats reach one of its clients, and the most recent is the engine's.
    Counters and histograms (tokens, latencies) are per request and add up either way."""
    if shared_engine:
        return vllm_compat.prometheus_stat_logger(Gauge)

    def per_worker_gauge(*args: Any, multiprocess_mode: str = "", **kwargs: Any) -> Gauge:
        return Gauge(*args, **{**kwargs, "multiprocess_mode": "liveall"})

    return vllm_compat.prometheus_stat_logger(per_worker_gauge)
