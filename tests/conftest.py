from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.serverproc import ServerProcess, free_port

# vLLM's CPU backend sizes its KV cache from this (GiB); the tiny model needs little. Set before any
# engine starts, in this process (engine tests) and in the servers the tests launch.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Qwen2.5-VL checkpoint (the demo model), built once and cached."""
    from qwen_server.demo import demo_model_path

    return demo_model_path()


SERVER_OPTIONS = (
    "--max-model-len", "2048",
    "--enforce-eager",
    "--max-num-seqs", "16",
    "--limit-mm-per-prompt", '{"image": 4}',
    "--served-model-name", "tiny",
    "--served-model-name", "tiny-alias",
)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server (launcher -> Granian -> Litestar -> vLLM on the tiny model) for the session."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess.launcher(free_port(), log, "--model", str(tiny_model), *SERVER_OPTIONS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert srv.leftovers() == []


def image_data_url(size: tuple[int, int] = (224, 224), color=(200, 30, 30), fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    mime = {"JPEG": "image/jpeg", "PNG": "image/png"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
