"""The app module: importing it and serving on a FakeEngine imports neither vLLM nor torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter: in the test session another module may have imported vLLM already.
SCRIPT = """
import asyncio, sys
from litestar.testing import AsyncTestClient
from qwen_server import drain
import qwen_server.app
from qwen_server.app import create_app
from qwen_server.settings import Settings
from tests.helpers.fake_engine import FakeEngine

drain.arm = lambda loop, handler: None  # no process-wide signal handler from a test

async def main():
    async with AsyncTestClient(create_app(Settings(), engine_factory=FakeEngine)) as client:
        assert (await client.get("/health")).json() == {"status": "ready"}
        assert (await client.get("/v1/models")).json()["data"]

asyncio.run(main())
print(sorted(name for name in ("vllm", "torch") if name in sys.modules))
print(qwen_server.app.__file__)
"""


def test_importing_and_serving_the_app_imports_no_vllm_nor_torch() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    imported, app_file = out.stdout.splitlines()[-2:]
    assert imported == "[]"
    assert Path(app_file).is_relative_to(ROOT)  # this checkout's package, not another one on the path
