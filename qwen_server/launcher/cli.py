"""The launcher: check and take the port, then hand the app's import path and that socket to Granian.

    python launcher.py [OPTIONS]        (also installed as `qwen-server`)

Every option but the launcher's own actions (--replace, --replace-timeout, --print-config) is
generated from the Settings struct: vLLM's names and value formats for the engine, so a `vllm serve`
command line carries over, and Granian's for the processes. Settings reach Granian's workers through
QWEN_SERVER_* environment variables, the same ones `granian ... qwen_server.app:app` reads; the
fields Granian takes reach it as the arguments they declare. Nothing here imports torch or vLLM:
the port answer comes first and fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import msgspec

from qwen_server import settings as settings_mod
from qwen_server.launcher import ports, supervise
from qwen_server.settings import GranianArg, Settings

APP_TARGET = "qwen_server.app:app"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # qwen_server/, what --reload watches
_DEFAULTS = Settings()
_F = TypeVar("_F", bound=Callable[..., Any])


def _option_for(name: str) -> click.Option:
    tp, meta = settings_mod.FIELDS[name]
    flag = "--" + name.replace("_", "-")
    base = settings_mod.strip_optional(tp)
    # The option itself defaults to None: unset, the environment's value (or else the field's default) applies.
    default = getattr(_DEFAULTS, name)
    shown = [f"env: {settings_mod.env_name(name)}"]
    if default not in (None, "") and not isinstance(default, bool):
        shown.append(f"default: {default}")
    help_text = (meta.description or "") + f"  [{'; '.join(shown)}]"
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if typing.get_origin(base) is list:
        return click.Option([flag, name], multiple=True, help=help_text + " (repeatable, or comma-separated)")
    if typing.get_origin(base) is typing.Literal:
        return click.Option([flag, name], type=click.Choice(typing.get_args(base)), default=None, help=help_text)
    click_type = {int: int, float: float}.get(base, str)
    return click.Option([flag, name], type=click_type, default=None, help=help_text)


def _settings_options(func: _F) -> _F:
    """Every Settings field as an option of `func`, attached as click's own @option attaches one."""
    params: list[click.Parameter] = getattr(func, "__click_params__", [])
    params.extend(_option_for(name) for name in reversed(list(settings_mod.FIELDS)))
    func.__click_params__ = params  # type: ignore[attr-defined]  # click's attribute; click ignores it alike
    return func


def resolve_settings(cli_values: dict[str, Any], environ: dict[str, str]) -> Settings:
    """Defaults, then QWEN_SERVER_* variables, then command-line options (the last one wins)."""
    base = settings_mod.from_env(environ)
    values = msgspec.structs.asdict(base)
    problems = []
    for name, raw in cli_values.items():
        if raw is None or raw == ():
            continue
        if isinstance(raw, tuple):  # repeatable list option: each may be comma-separated (or one JSON object)
            raw = [part for item in raw for part in settings_mod.parse_value(name, item)]
        try:
            values[name] = settings_mod.convert_value(name, raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            problems.append(f"--{name.replace('_', '-')}={raw!r}: {settings_mod.short_error(exc)}")
    if problems:
        raise settings_mod.SettingsError("invalid options:\n  " + "\n  ".join(problems))
    return Settings(**values)


def _granian_args(s: Settings) -> list[tuple[GranianArg, Any]]:
    """Granian's arguments, each with the value Granian's server class takes: those of the fields
    that declare one (unset or off: Granian's default applies), then the launcher's own."""
    args: list[tuple[GranianArg, Any]] = [(GranianArg("interface", "--interface"), "asgi")]
    args += [
        (arg, arg.convert(value) if arg.convert else value)
        for name, arg in settings_mod.GRANIAN_ARGS.items()
        if (value := getattr(s, name)) is not None and value is not False and value != ""
    ]
    # The title starts with one of ports.SERVER_MARKERS: how --replace recognises this server.
    args.append((GranianArg("process_name", "--process-name"), f"qwen-server {s.host}:{s.port}"))
    if s.reload:  # the package only: Granian's default, the working directory, may hold log files
        args.append((GranianArg("reload_paths", "--reload-paths"), [PACKAGE_DIR]))
    return args


def _granian_kwargs(s: Settings) -> dict[str, Any]:
    return {"target": APP_TARGET, **{arg.kwarg: value for arg, value in _granian_args(s)}}


def _equivalent_command(s: Settings) -> str:
    """A `granian` command that serves these settings: the fields Granian takes as its flags, every
    other changed one as its QWEN_SERVER_* variable (the API keys redacted)."""
    env_vars = s.to_env(exclude=settings_mod.PROCESS_FIELDS)
    if s.api_key:
        env_vars[settings_mod.env_name("api_key")] = "<redacted>"
    words = []
    for arg, value in _granian_args(s):
        if value is True:
            words.append(arg.flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                words += [arg.flag, str(item)]
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(env_vars.items())]
    return " ".join([*env, "granian", *map(shlex.quote, words), APP_TARGET])


def _shared_engine_fallback(s: Settings) -> Settings:
    """Layouts the shared engine does not cover yet get one engine per worker, with the reason said."""
    why = None
    if s.data_parallel_size > 1:
        why = "--data-parallel-size > 1 (several EngineCores and vLLM's coordinator)"
    elif s.distributed_executor_backend == "ray":
        why = "the Ray backend (its engine is no local process the launcher can watch)"
    if not s.shared_engine or why is None:
        return s
    click.echo(
        f"qwen-server: one engine per worker (not shared): the shared engine does not support {why} yet", err=True
    )
    return msgspec.structs.replace(s, shared_engine=False)


def _check_combination(s: Settings) -> None:
    """Refuse process layouts that cannot work, before anything is started."""
    workers = s.workers
    if s.shared_engine:  # one engine whatever the number of workers
        return
    if workers > 1 and _has_nvidia_gpu() and s.gpu_memory_utilization * workers > 1.0:
        raise click.UsageError(
            f"--workers {workers} would start {workers} engines on the same GPU, each taking "
            f"--gpu-memory-utilization {s.gpu_memory_utilization} of its memory. Use "
            f"--gpu-memory-utilization {round(0.9 / workers, 2)} or less, or one worker with "
            "--data-parallel-size for several GPUs."
        )
    if workers > 1 and s.tensor_parallel_size * s.pipeline_parallel_size > 1:
        raise click.UsageError(
            "--workers > 1 with tensor or pipeline parallelism would start one parallel group per worker "
            "on the same devices; use one worker (vLLM parallelizes inside it)."
        )


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_settings_options
@click.option("--replace", is_flag=True, help="If a qwen_server holds the port, stop it gracefully and take its place.")
@click.option(
    "--replace-timeout",
    type=float,
    default=90.0,
    show_default=True,
    help="Seconds to wait for the replaced server (its drain, then its engine shutdown) before it is killed.",
)
@click.option(
    "--print-config", is_flag=True, help="Print the resolved settings and the Granian invocation, start nothing."
)
def main(**opts: Any) -> None:
    """Serve a vision-language model over an OpenAI-compatible HTTP API (Litestar + Granian + vLLM).

    With no --model, a tiny random-weight demo model is built and served (its answers are noise).
    """
    t0 = time.monotonic()
    cli_values = {name: opts.pop(name) for name in settings_mod.FIELDS}
    try:
        s = resolve_settings(cli_values, dict(os.environ))
    except settings_mod.SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    granian_kwargs = _granian_kwargs(s)
    if opts["print_config"]:
        shown = msgspec.to_builtins(s)
        if s.api_key:  # printed configs end up in tickets and logs: never the keys
            shown["api_key"] = ["<redacted>"] * len(s.api_key)
        click.echo(
            json.dumps(
                {
                    "settings": shown,
                    "granian": {k: str(v) if isinstance(v, Path) else v for k, v in granian_kwargs.items()},
                },
                indent=2,
                default=str,
            )
        )
        click.echo("equivalent: " + _equivalent_command(s))
        return
    s = _shared_engine_fallback(s)
    _check_combination(s)

    sock = _take_port(s, opts)
    click.echo(f"qwen-server: port {s.host}:{s.port} taken in {1000 * (time.monotonic() - t0):.0f} ms", err=True)

    # Workers read their settings from the environment: make it exactly these settings.
    for key in [k for k in os.environ if k.startswith(settings_mod.ENV_PREFIX)]:
        del os.environ[key]
    os.environ.update(s.to_env())
    run_dir = supervise.make_run_dir()
    try:
        engine_host = _start_engine_host(s, sock, run_dir) if s.shared_engine else None
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    code = supervise.run_granian(sock, granian_kwargs, s.drain_timeout, engine_host, run_dir)
    if engine_host is None:
        sys.exit(code)
    if engine_host.died:
        code = code or 1
    _exit_without_teardown(code)


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit once everything is stopped, without the interpreter's teardown of torch, vLLM and the
    engine config this process holds: that alone took 3-4 s after every stop of the shared engine
    (measured: SIGTERM to exit 4.2 s, of which the engine's stop 0.15 s). Nothing is left for it to
    do: the children are gone and the resource tracker has finished (supervise.run_granian)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _start_engine_host(s: Settings, sock: socket.socket, run_dir: str) -> Any:
    """--shared-engine: the one engine, started here (after the port is ours, before Granian forks the
    workers, which inherit its imports and attach to it). Its module is the serving side's: imported
    only now, so that the port answer above never waits for torch or vLLM."""
    # Litestar too (not the app): forked workers then import the app in ~0.03 s instead of ~0.5 s.
    import litestar  # noqa: F401

    from qwen_server import logs
    from qwen_server.engine import host

    logs.configure(s.log_level, s.log_format)
    t0 = time.monotonic()
    try:
        engine_host = host.EngineHost.start(s, run_dir)
    except host.EngineStartError as exc:
        sock.close()
        click.echo(f"qwen-server: {exc}", err=True)
        sys.exit(1)
    except BaseException:
        sock.close()
        raise
    # The model goes on loading in the background; the workers answer /health meanwhile.
    click.echo(f"qwen-server: shared engine started in {time.monotonic() - t0:.1f} s (loading)", err=True)
    return engine_host


def _take_port(s: Settings, opts: dict[str, Any]) -> socket.socket:
    try:
        return ports.take_port(s.host, s.port, s.backlog)
    except ports.PortInUse as exc:
        if not opts["replace"]:
            click.echo(f"qwen-server: {exc}", err=True)
            sys.exit(1)
        report = exc.report
    except OSError as exc:
        click.echo(f"qwen-server: cannot bind {s.host}:{s.port}: {exc}", err=True)
        sys.exit(1)
    return _replace(s, opts, report)


def _replace(s: Settings, opts: dict[str, Any], report: ports.PortReport) -> socket.socket:
    foreign = [h for h in report.holders if not h.is_qwen_server]
    if foreign or not report.holders:
        click.echo(
            "qwen-server: --replace stops only qwen_server processes, and this port is held by others:\n"
            + report.describe(s.host),
            err=True,
        )
        sys.exit(1)
    roots = sorted({supervise.tree_root(h.pid) for h in report.holders})
    click.echo(f"qwen-server: replacing the qwen_server tree(s) rooted at PID {', '.join(map(str, roots))}", err=True)
    supervise.stop_trees(roots, timeout=opts["replace_timeout"])
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return ports.take_port(s.host, s.port, s.backlog)
        except ports.PortInUse as exc:
            if time.monotonic() > deadline:
                click.echo(f"qwen-server: the port is still held after the replaced server stopped:\n{exc}", err=True)
                sys.exit(1)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
