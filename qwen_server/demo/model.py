"""The built-in demo model: the tiny random-weight checkpoint, built once into a cache directory."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_server")

DEMO_ARCH = "qwen2_5_vl"
# Bump when the builder's output changes, so that old caches are not served.
DEMO_VERSION = "2"

NOISE_WARNING = (
    "Serving the built-in DEMO model: a tiny Qwen2.5-VL with RANDOM weights. Its answers are noise; "
    "it exists to try the server without downloading anything. To serve a real model, pass "
    "--model Qwen/Qwen2.5-VL-3B-Instruct (or a local checkpoint path), or set QWEN_SERVER_MODEL."
)


def engine_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine settings that make the demo start fast anywhere: a short context, no compilation
    (pointless for a toy model) and, on vLLM's CPU build, a 1 GiB KV cache instead of 90% of RAM
    (which fails when anything else uses memory). Options the user set explicitly are kept."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = dict(kwargs)
    out.setdefault("max_model_len", 4096)
    out["enforce_eager"] = True
    return out


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen-server"


def demo_model_path() -> Path:
    """Return the demo checkpoint, building it on first use (once, even with several workers)."""
    target = cache_dir() / f"demo-{DEMO_ARCH}-v{DEMO_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        from qwen_server.demo.tiny_model import build

        log.info("building the demo checkpoint into %s (first use only)", target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            build(staging, DEMO_ARCH)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
