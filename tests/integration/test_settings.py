"""The settings against the installed vLLM: every engine field is one of vLLM's engine arguments.
The settings' own tests need no vLLM: tests/unit/test_settings.py."""

from __future__ import annotations

from qwen_server import settings


def test_engine_fields_are_real_vllm_engine_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = set(AsyncEngineArgs.__dataclass_fields__)
    for name in settings.ENGINE_FIELDS:
        if name != "engine_args":
            assert name in known, name
