"""One settings struct feeds the environment, the launcher's options and vLLM's engine arguments."""

from __future__ import annotations

import enum
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwen_server import cli, settings
from qwen_server.settings import Settings, SettingsError


def test_environment_values_are_parsed_in_vllm_formats() -> None:
    s = settings.from_env(
        {
            "QWEN_SERVER_MODEL": "Qwen/Qwen2.5-VL-3B-Instruct",
            "QWEN_SERVER_MAX_MODEL_LEN": "4096",
            "QWEN_SERVER_ENFORCE_EAGER": "true",
            "QWEN_SERVER_LIMIT_MM_PER_PROMPT": '{"image": 4}',
            "QWEN_SERVER_MM_PROCESSOR_KWARGS": '{"max_pixels": 1003520}',
            "QWEN_SERVER_SERVED_MODEL_NAME": "qwen, qwen-vl",
            "QWEN_SERVER_GPU_MEMORY_UTILIZATION": "0.5",
            "QWEN_SERVER_DISTRIBUTED_EXECUTOR_BACKEND": "ray",
            "UNRELATED": "ignored",
        }
    )
    assert s.max_model_len == 4096 and s.enforce_eager is True
    assert s.limit_mm_per_prompt == {"image": 4}
    assert s.served_model_name == ["qwen", "qwen-vl"]
    assert s.model_names == ["qwen", "qwen-vl"]
    assert s.distributed_executor_backend == "ray"


def test_every_bad_value_is_named() -> None:
    with pytest.raises(SettingsError) as info:
        settings.from_env(
            {
                "QWEN_SERVER_MAX_MODEL_LEN": "lots",
                "QWEN_SERVER_LIMIT_MM_PER_PROMPT": "{image: 4}",
                "QWEN_SERVER_ENFORCE_EAGER": "maybe",
                "QWEN_SERVER_MAX_MODEL_LENGTH": "1",
            }
        )
    text = str(info.value)
    for name in ("QWEN_SERVER_MAX_MODEL_LEN=", "QWEN_SERVER_LIMIT_MM_PER_PROMPT=", "QWEN_SERVER_ENFORCE_EAGER=",
                 "QWEN_SERVER_MAX_MODEL_LENGTH: not a known setting"):
        assert name in text


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"QWEN_SERVER_PORT": "0"}, "QWEN_SERVER_PORT: must be at least 1"),
        ({"QWEN_SERVER_GPU_MEMORY_UTILIZATION": "1.5"}, "QWEN_SERVER_GPU_MEMORY_UTILIZATION: must be in (0, 1]"),
        ({"QWEN_SERVER_ROOT_PATH": "api"}, "QWEN_SERVER_ROOT_PATH: must start with '/'"),
        ({"QWEN_SERVER_TENSOR_PARALLEL_SIZE": "0"}, "QWEN_SERVER_TENSOR_PARALLEL_SIZE: must be at least 1"),
        ({"QWEN_SERVER_ENGINE_NICE": "-5"}, "QWEN_SERVER_ENGINE_NICE: must be in 0..19"),
        ({"QWEN_SERVER_ENGINE_NICE": "20"}, "QWEN_SERVER_ENGINE_NICE: must be in 0..19"),
    ],
)
def test_range_checks(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        settings.from_env(env)


def test_to_env_round_trips() -> None:
    s = Settings(model="m", max_model_len=10, limit_mm_per_prompt={"image": 2}, served_model_name=["a", "b"], enforce_eager=True)
    assert settings.from_env(s.to_env()) == s
    assert Settings().to_env() == {}


def test_engine_kwargs_pass_vllm_names_through() -> None:
    s = Settings(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray",
                 engine_args={"swap_space": 4, "tensor_parallel_size": 4})
    kwargs = s.engine_kwargs("/models/x")
    assert kwargs["model"] == "/models/x"
    assert kwargs["pipeline_parallel_size"] == 2
    assert kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["swap_space"] == 4
    assert kwargs["tensor_parallel_size"] == 4  # engine_args is applied last
    assert "max_model_len" not in kwargs  # unset: vLLM's own default applies
    assert "host" not in kwargs and "port" not in kwargs


def test_engine_fields_are_real_vllm_engine_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = set(AsyncEngineArgs.__dataclass_fields__)
    for name in settings.ENGINE_FIELDS:
        if name != "engine_args":
            assert name in known, name


def test_cli_overrides_environment() -> None:
    s = cli.resolve_settings(
        {"max_model_len": 8192, "served_model_name": ("x", "y,z"), "limit_mm_per_prompt": '{"image": 3}', "enforce_eager": False},
        {"QWEN_SERVER_MAX_MODEL_LEN": "1024", "QWEN_SERVER_ENFORCE_EAGER": "1", "QWEN_SERVER_DTYPE": "bfloat16"},
    )
    assert s.max_model_len == 8192
    assert s.served_model_name == ["x", "y", "z"]
    assert s.limit_mm_per_prompt == {"image": 3}
    assert s.enforce_eager is False
    assert s.dtype == "bfloat16"  # from the environment, not overridden


def test_cli_bad_option_is_named() -> None:
    with pytest.raises(SettingsError, match="--limit-mm-per-prompt"):
        cli.resolve_settings({"limit_mm_per_prompt": "{image: 3}"}, {})


def test_print_config_starts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--print-config", "--model", "m", "--limit-mm-per-prompt", '{"image":4}', "--port", "1"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert '"limit_mm_per_prompt": {\n      "image": 4' in out
    assert "QWEN_SERVER_LIMIT_MM_PER_PROMPT='{\"image\":4}'" in out
    assert out.rstrip().endswith("qwen_server.app:app")


def test_backpressure_reaches_granian(capsys: pytest.CaptureFixture[str]) -> None:
    """Granian's per-worker connection cap is an option; unset, Granian's default applies."""
    with pytest.raises(SystemExit):
        cli.main(["--print-config", "--model", "m", "--port", "1", "--backpressure", "4096"])
    assert "--backpressure 4096 " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--print-config", "--model", "m", "--port", "1"])
    assert "--backpressure" not in capsys.readouterr().out


def test_several_workers_on_one_gpu_need_a_memory_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import click

    monkeypatch.setattr(cli, "_has_nvidia_gpu", lambda: True)
    with pytest.raises(click.UsageError, match="gpu-memory-utilization"):
        cli._check_combination(Settings(workers=2))
    cli._check_combination(Settings(workers=2, gpu_memory_utilization=0.45))
    with pytest.raises(click.UsageError, match="one worker"):
        cli._check_combination(Settings(workers=2, tensor_parallel_size=2, gpu_memory_utilization=0.4))


# --- --print-config's equivalent command, read back by Granian's own CLI ---


def _print_config(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The launcher's --print-config: (its JSON, its equivalent command)."""
    result = CliRunner().invoke(cli.main, [*argv, "--print-config"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shown, equivalent = result.output.split("\nequivalent: ")
    return json.loads(shown), equivalent.strip()


def _split_command(command: str) -> tuple[dict[str, str], list[str]]:
    """`VAR=value ... granian ARGS` -> ({VAR: value}, ARGS)."""
    words = shlex.split(command)
    at = words.index("granian")
    return dict(w.split("=", 1) for w in words[:at]), words[at + 1 :]


def _plain(value: Any) -> Any:
    """Granian's CLI hands its Server paths and enums; the launcher's JSON shows their text."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def _granian_server_kwargs(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `granian ARGV` would hand Granian's Server: its own click CLI parses, a recorder stands in
    for the Server."""
    import granian.cli

    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, target: str, **kwargs: Any) -> None:
            seen.update(target=target, **kwargs)

        def serve(self) -> None:
            pass

    monkeypatch.setattr(granian.cli, "Server", Recorder)
    monkeypatch.setattr(sys, "path", list(sys.path))  # Granian's CLI puts the working directory first
    result = CliRunner().invoke(granian.cli.cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {k: _plain(v) for k, v in seen.items()}


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not read by --print-config\n")
    key.write_text("not read by --print-config\n")
    return cert, key


@pytest.mark.xfail(strict=True, reason="issue #18: the equivalent command drops Granian arguments")
def test_equivalent_command_gives_granian_the_launchers_arguments(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every argument the launcher hands Granian, the equivalent `granian` command hands it too."""
    cert, key = tls_files
    shown, equivalent = _print_config(
        ["--port", "8123", "--workers", "2", "--log-level", "debug", "--root-path", "/p", "--reload",
         "--workers-kill-timeout", "30", "--respawn-failed-workers", "--access-log", "--backlog", "2048",
         "--backpressure", "8", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    )
    _, argv = _split_command(equivalent)
    from_command = _granian_server_kwargs(argv, monkeypatch)
    differences = {
        name: (value, from_command.get(name, "<not given>"))
        for name, value in shown["granian"].items()
        if from_command.get(name, "<not given>") != value
    }
    assert differences == {}, f"launcher's vs equivalent command's: {differences}\n{equivalent}"
