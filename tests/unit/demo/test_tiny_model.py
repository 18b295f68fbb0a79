"""The tiny checkpoint builder (qwen_server/demo/tiny_model.py), without vLLM: its output. Loading
each checkpoint in vLLM's engine: tests/integration/test_tiny_models.py."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_server.demo import tiny_model as builder


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = builder.build(tmp_path / "a")
    b = builder.build(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    config = json.loads((a / "config.json").read_text())
    # Head counts that tensor parallelism of 2 needs.
    assert config["text_config"]["num_key_value_heads"] % 2 == 0
    assert config["vision_config"]["num_heads"] % 2 == 0
