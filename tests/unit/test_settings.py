"""One settings struct feeds the environment, the launcher's options and vLLM's engine arguments."""

from __future__ import annotations

import enum
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from qwen_server import settings
from qwen_server.launcher import cli
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
    for name in (
        "QWEN_SERVER_MAX_MODEL_LEN=",
        "QWEN_SERVER_LIMIT_MM_PER_PROMPT=",
        "QWEN_SERVER_ENFORCE_EAGER=",
        "QWEN_SERVER_MAX_MODEL_LENGTH: not a known setting",
    ):
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
        ({"QWEN_SERVER_SSE_KEEP_ALIVE": "0"}, "QWEN_SERVER_SSE_KEEP_ALIVE: must be positive"),
        ({"QWEN_SERVER_PROCESSOR_THREADS": "-1"}, "QWEN_SERVER_PROCESSOR_THREADS: must not be negative"),
        ({"QWEN_SERVER_LORA_MODULES": "a=/x"}, "need QWEN_SERVER_ENABLE_LORA"),
        ({"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_LORA_MODULES": "noequals"}, "expected NAME=PATH"),
        ({"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_LORA_MODULES": '{"name": "a"}'}, "missing required field"),
        ({"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_LORA_MODULES": "a=/x,a=/y"}, "the name 'a' is taken"),
        (
            {"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_SERVED_MODEL_NAME": "m", "QWEN_SERVER_LORA_MODULES": "m=/x"},
            "the name 'm' is taken",
        ),
        (
            {"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_ALLOW_RUNTIME_LORA_UPDATING": "1"},
            "needs QWEN_SERVER_ALLOWED_LORA_PATH",
        ),
        (
            {
                "QWEN_SERVER_ENABLE_LORA": "1",
                "QWEN_SERVER_ALLOW_RUNTIME_LORA_UPDATING": "1",
                "QWEN_SERVER_WORKERS": "2",
            },
            "needs --workers 1",
        ),
        ({"QWEN_SERVER_ENABLE_LORA": "1", "QWEN_SERVER_ALLOW_RUNTIME_LORA_UPDATING": "1"}, "needs an API key"),
    ],
)
def test_range_checks(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        settings.from_env(env)


def test_to_env_round_trips() -> None:
    s = Settings(
        model="m", max_model_len=10, limit_mm_per_prompt={"image": 2}, served_model_name=["a", "b"], enforce_eager=True
    )
    assert settings.from_env(s.to_env()) == s
    assert Settings().to_env() == {}


def test_engine_kwargs_pass_vllm_names_through() -> None:
    s = Settings(
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        engine_args={"swap_space": 4, "tensor_parallel_size": 4},
    )
    kwargs = s.engine_kwargs("/models/x")
    assert kwargs["model"] == "/models/x"
    assert kwargs["pipeline_parallel_size"] == 2
    assert kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["swap_space"] == 4
    assert kwargs["tensor_parallel_size"] == 4  # engine_args is applied last
    assert "max_model_len" not in kwargs  # unset: vLLM's own default applies
    assert "host" not in kwargs and "port" not in kwargs


def test_cli_overrides_environment() -> None:
    s = cli.resolve_settings(
        {
            "max_model_len": 8192,
            "served_model_name": ("x", "y,z"),
            "limit_mm_per_prompt": '{"image": 3}',
            "enforce_eager": False,
        },
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


def test_several_workers_on_one_gpu_need_a_memory_split_only_with_one_engine_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import click

    monkeypatch.setattr(cli, "_has_nvidia_gpu", lambda: True)
    cli._check_combination(Settings(workers=2))  # the default: one shared engine, one copy of the model
    cli._check_combination(Settings(workers=2, tensor_parallel_size=2))
    with pytest.raises(click.UsageError, match="gpu-memory-utilization"):
        cli._check_combination(Settings(workers=2, shared_engine=False))
    cli._check_combination(Settings(workers=2, gpu_memory_utilization=0.45, shared_engine=False))
    with pytest.raises(click.UsageError, match="one worker"):
        cli._check_combination(
            Settings(workers=2, tensor_parallel_size=2, gpu_memory_utilization=0.4, shared_engine=False)
        )


def test_layouts_the_shared_engine_does_not_cover_fall_back_to_one_engine_per_worker_and_say_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli._shared_engine_fallback(Settings()).shared_engine
    assert cli._shared_engine_fallback(Settings(tensor_parallel_size=2)).shared_engine
    assert not cli._shared_engine_fallback(Settings(data_parallel_size=2)).shared_engine
    assert "--data-parallel-size > 1" in capsys.readouterr().err
    assert not cli._shared_engine_fallback(Settings(distributed_executor_backend="ray")).shared_engine
    assert "Ray backend" in capsys.readouterr().err
    assert not cli._shared_engine_fallback(Settings(shared_engine=False)).shared_engine
    assert capsys.readouterr().err == ""


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


def test_equivalent_command_gives_granian_the_launchers_arguments(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every argument the launcher hands Granian, the equivalent `granian` command hands it too."""
    cert, key = tls_files
    shown, equivalent = _print_config(
        [
            "--port",
            "8123",
            "--workers",
            "2",
            "--log-level",
            "debug",
            "--root-path",
            "/p",
            "--reload",
            "--workers-kill-timeout",
            "30",
            "--respawn-failed-workers",
            "--access-log",
            "--backlog",
            "2048",
            "--backpressure",
            "8",
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ]
    )
    _, argv = _split_command(equivalent)
    from_command = _granian_server_kwargs(argv, monkeypatch)
    differences = {
        name: (value, from_command.get(name, "<not given>"))
        for name, value in shown["granian"].items()
        if from_command.get(name, "<not given>") != value
    }
    assert differences == {}, f"launcher's vs equivalent command's: {differences}\n{equivalent}"


# One value per field, none its default ("<file>", "<dir>": made by the test). A new field must be given one.
NON_DEFAULT: dict[str, Any] = {
    "model": "Qwen/Qwen2.5-VL-3B-Instruct",
    "tokenizer": "Qwen/Qwen2.5-VL-7B-Instruct",
    "revision": "main",
    "dtype": "bfloat16",
    "max_model_len": 4096,
    "tensor_parallel_size": 2,
    "pipeline_parallel_size": 2,
    "data_parallel_size": 2,
    "distributed_executor_backend": "ray",
    "gpu_memory_utilization": 0.5,
    "limit_mm_per_prompt": {"image": 4},
    "mm_processor_kwargs": {"max_pixels": 1003520},
    "enforce_eager": True,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 2048,
    "trust_remote_code": True,
    "seed": 7,
    "enable_prefix_caching": False,
    "quantization": "awq",
    "reasoning_parser": "qwen3",
    "scheduling_policy": "priority",
    "enable_lora": True,
    "max_loras": 4,
    "max_lora_rank": 64,
    "max_video_bytes": 1024,
    "max_video_seconds": 30.5,
    "max_video_frame_pixels": 640 * 480,
    "max_video_source_frames": 900,
    "max_video_frames": 16,
    "max_video_pixels": 1000000,
    "kv_cache_dtype": "fp8",
    "engine_args": {"swap_space": 4, "disable_log_stats": True},
    "served_model_name": ["qwen", "qwen vl"],
    "host": "0.0.0.0",
    "port": 8123,
    "root_path": "/api",
    "workers": 2,
    "max_request_body_bytes": 1024,
    "retry_after_seconds": 9,
    "overload_retry_after_seconds": 3,
    "log_level": "debug",
    "log_format": "json",
    "keep_off_engine_cores": True,
    "engine_nice": 0,
    "processor_threads": 0,
    "api_key": ["sk-one", "sk-two"],
    "api_key_file": "<file>",
    "protect_probes": True,
    "max_pending_requests": 3,
    "request_timeout": 2.5,
    "drain_timeout": 4.5,
    "cors_allow_origins": ["https://app.example.com"],
    "trust_request_mm_kwargs": True,
    "trust_request_chat_template": True,
    "chat_template": "{{ messages[0]['content'] }}",
    "default_chat_template_kwargs": {"enable_thinking": False},
    "enable_auto_tool_choice": True,
    "tool_call_parser": "hermes",
    "tool_strict_level": "parameter",
    "exclude_tools_when_tool_choice_none": True,
    "enable_prompt_tokens_details": True,
    "sse_keep_alive": 15.0,
    "lora_modules": ["sql=/adapters/sql", '{"name": "ocr", "path": "/adapters/ocr"}'],
    "allow_runtime_lora_updating": True,
    "allowed_lora_path": "<dir>",
    "max_messages": 64,
    "max_content_parts": 16,
    "max_batch_prompts": 8,
    "completion_max_tokens": 32,
    "max_json_depth": 16,
    "engine_restarts": 2,
    "engine_restart_window": 60.0,
    "max_image_bytes": 1000,
    "max_image_pixels": 1000,
    "max_image_side": 100,
    "max_request_image_bytes": 2000,
    "image_cache_bytes": 0,
    "media_fetch_timeout": 2.5,
    "media_max_redirects": 0,
    "allowed_media_domains": ["example.com"],
    "allowed_media_networks": ["10.0.0.0/8"],
    "allowed_local_media_path": "<dir>",
    "reload": True,
    "workers_kill_timeout": 30,
    "shared_engine": False,
    "respawn_failed_workers": True,
    "access_log": True,
    "backlog": 2048,
    "backpressure": 8,
    "ssl_certfile": "<file>",
    "ssl_keyfile": "<file>",
}
TOGETHER = {
    "ssl_certfile": ("ssl_keyfile",),
    "ssl_keyfile": ("ssl_certfile",),
    "enable_auto_tool_choice": ("tool_call_parser",),
    "lora_modules": ("enable_lora",),
    "allow_runtime_lora_updating": ("enable_lora", "allowed_lora_path", "api_key"),
}
# Settings that cannot all be set at once: runtime LoRA updating needs one worker.
NOT_WITH_EVERY_FIELD = {"allow_runtime_lora_updating"}


def test_every_field_has_a_non_default_test_value() -> None:
    assert set(NON_DEFAULT) == set(settings.FIELDS)
    defaults = Settings()
    assert [name for name, value in NON_DEFAULT.items() if getattr(defaults, name) == value] == []


def _launcher_argv(values: dict[str, Any]) -> list[str]:
    """The launcher's command line for `values`: each field's flag is its name."""
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [word for item in value for word in (flag, item)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


@pytest.mark.parametrize("changed", [*NON_DEFAULT, "every field at once"])
def test_equivalent_command_round_trips_every_setting(
    changed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each field set to a value not its default, on the launcher's command line: --print-config's
    equivalent command, its QWEN_SERVER_* variables read as the app reads them and its flags parsed
    by Granian's own CLI, resolves to the same settings, and gives Granian what the launcher gives it.
    The API keys are printed redacted: the test checks that, then puts the keys back."""
    for key in [k for k in os.environ if k.startswith(settings.ENV_PREFIX)]:
        monkeypatch.delenv(key)
    if changed == "every field at once":
        names = [name for name in NON_DEFAULT if name not in NOT_WITH_EVERY_FIELD]
    else:
        names = [changed, *TOGETHER.get(changed, ())]
    (tmp_path / "file").write_text("sk-from-file\n")
    made = {"<file>": str(tmp_path / "file"), "<dir>": str(tmp_path)}
    values = {name: made.get(v, v) if isinstance(v := NON_DEFAULT[name], str) else v for name in names}
    expected = Settings(**values)
    assert settings.from_env(expected.to_env()) == expected  # how the launcher hands the workers their settings

    shown, equivalent = _print_config(_launcher_argv(values))
    env, granian_argv = _split_command(equivalent)
    assert all(key.startswith(settings.ENV_PREFIX) for key in env)
    assert not {settings.env_name(name) for name in settings.PROCESS_FIELDS} & set(env), "Granian's flags carry those"
    if expected.api_key:
        assert env[settings.env_name("api_key")] == "<redacted>"
        assert shown["settings"]["api_key"] == ["<redacted>"] * len(expected.api_key)
        assert not any(key in equivalent or key in json.dumps(shown) for key in expected.api_key)
        env[settings.env_name("api_key")] = ",".join(expected.api_key)

    from_command = _granian_server_kwargs(granian_argv, monkeypatch)
    from_flags = {
        name: settings.convert_value(name, from_command[arg.kwarg])
        for name, arg in settings.GRANIAN_ARGS.items()
        if from_command[arg.kwarg] is not None  # not given: the field's default
    }
    from_variables = settings.from_env(env)
    assert msgspec.structs.replace(from_variables, **from_flags) == expected
    for name in set(settings.GRANIAN_ARGS) - set(settings.PROCESS_FIELDS):  # the app reads these from its variables
        assert getattr(from_variables, name) == getattr(expected, name), name
    assert {name: from_command.get(name) for name in shown["granian"]} == shown["granian"]


def test_process_settings_in_the_environment_are_known_and_change_nothing_else(tls_files: tuple[Path, Path]) -> None:
    """The launcher's workers, and a plain `granian` run given these variables, accept them."""
    cert, key = tls_files
    s = settings.from_env(
        {
            "QWEN_SERVER_RELOAD": "true",
            "QWEN_SERVER_BACKLOG": "2048",
            "QWEN_SERVER_SSL_CERTFILE": str(cert),
            "QWEN_SERVER_SSL_KEYFILE": str(key),
        }
    )
    assert (s.reload, s.backlog, s.ssl_certfile) == (True, 2048, str(cert))
    assert s.engine_kwargs("/m") == Settings().engine_kwargs("/m")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--backlog", "0"], "QWEN_SERVER_BACKLOG: must be at least 1"),
        (["--backpressure", "0"], "QWEN_SERVER_BACKPRESSURE: must be at least 1"),
        (["--workers-kill-timeout", "0"], "QWEN_SERVER_WORKERS_KILL_TIMEOUT: must be at least 1"),
        (
            ["--ssl-certfile", "/nonexistent.pem", "--ssl-keyfile", "/nonexistent.pem"],
            "QWEN_SERVER_SSL_CERTFILE: not a file",
        ),
        (["--ssl-certfile", __file__], "QWEN_SERVER_SSL_CERTFILE and QWEN_SERVER_SSL_KEYFILE go together"),
    ],
)
def test_bad_process_options_are_refused(argv: list[str], fragment: str) -> None:
    result = CliRunner().invoke(cli.main, [*argv, "--print-config"])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_version_fences_compare_releases() -> None:
    from qwen_server import versions

    verified = ((0, 32, 0), (0, 33, 0))
    assert versions.within("0.32.0", verified) and versions.within("0.32.9+cpu", verified)
    assert not versions.within("0.33.0", verified) and not versions.within("0.31.9", verified)
    assert not versions.within("0.32.0rc1", verified) and not versions.within(None, verified)  # (0, 32) < (0, 32, 0)
    assert (
        versions.outside_message("vLLM", "0.40.1", verified, "x")
        == "vLLM 0.40.1 is outside the releases x was verified on (0.32.0 to <0.33.0)."
    )


def test_admission_limit_is_the_setting_else_four_times_the_engines_batch() -> None:
    assert Settings().admission_limit(None) is None  # no engine yet: no limit to apply
    assert Settings().admission_limit(8) == 32
    assert Settings(max_pending_requests=3).admission_limit(8) == 3
