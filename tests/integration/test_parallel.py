"""vLLM's own parallelism through the pass-through options: tensor parallelism of 2 on the CPU build."""

from __future__ import annotations

import signal
from pathlib import Path

import openai
import pytest

from qwen_server.testing.servers import free_port
from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess, base_env


# Two ranks on the 2 cores of the CI machine take 100 s or more: with the slow tests (`-m slow`).
@pytest.mark.slow
def test_tensor_parallel_2_answers_a_chat_with_an_image(tiny_model: Path, tmp_path: Path) -> None:
    # One CPU core per rank: vLLM's CPU backend cannot bind 2 ranks' threads without it.
    env = base_env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    port = free_port()
    srv = ServerProcess.launcher(
        port,
        tmp_path / "tp2.log",
        "--model",
        str(tiny_model),
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--max-num-seqs",
        "4",
        env=env,
    )
    try:
        srv.wait_ready()
        assert "world_size=2" in srv.log()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model=str(tiny_model),
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url()}},
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        assert r.usage.completion_tokens == 5
        assert r.usage.prompt_tokens > 64
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0
    assert srv.leftovers() == []
