"""The deployment recipes in deploy/ are checked, not just written.

Structure checks always run: the stop budget covers the drain, probes hit /live and /health on the
served port, every QWEN_SERVER_* variable and --option exists, and each command line resolves with
`--print-config`. The tools' own checks run where the tool is installed (offline, no cluster):
`systemd-analyze verify`, and kubectl decoding each object into its typed API struct.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from qwen_server.launcher.cli import main
from qwen_server.settings import ENV_PREFIX, FIELDS, env_name

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "qwen-server.service"
MANIFEST = DEPLOY / "kubernetes" / "deployment.yaml"
README = DEPLOY / "README.md"
ENGINE_SHUTDOWN_S = 10  # what vLLM's EngineCore may take to stop after the drain
DRAIN_ENV = env_name("drain_timeout")


# --- reading the recipes ---


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}: keys repeat (Environment=), order kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None  # the last assignment wins, as in systemd


def timespan_s(text: str) -> float:
    """A systemd time span ("60", "90s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"time span {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def unit_env(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    env = {}
    for key, value in unit["Service"]:
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
    return env


def unit_exec(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    return shlex.split(unit_value(unit, "Service", "ExecStart") or "")


def manifest() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == name]
    assert len(found) == 1, f"expected one {name} in {MANIFEST.name}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "qwen-server"]
    return c


def container_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def drain_timeout_s(args: list[str], env: dict[str, str]) -> float:
    """The recipe's drain timeout: --drain-timeout wins over the variable, as in the launcher."""
    value = option_value(args, "--drain-timeout") or env.get(DRAIN_ENV)
    assert value is not None, f"the recipe must state its drain timeout ({DRAIN_ENV} or --drain-timeout)"
    return float(value)


def served_port(args: list[str]) -> int:
    return int(option_value(args, "--port") or 8000)


# --- structure checks (always run) ---


def test_every_qwen_server_variable_named_in_the_recipes_is_a_setting() -> None:
    known = {env_name(f) for f in FIELDS}
    for path in (UNIT, MANIFEST, README):
        named = set(re.findall(ENV_PREFIX + r"[A-Z0-9_]+", path.read_text()))
        assert named <= known, f"{path.relative_to(DEPLOY)}: not settings: {sorted(named - known)}"


def test_every_option_in_the_command_lines_is_a_launcher_option() -> None:
    known = {o for p in main.params for o in (*p.opts, *p.secondary_opts)}
    c = container(manifest())
    command_lines = {
        "ExecStart": unit_exec(parse_unit(UNIT.read_text())),
        "container": c["command"] + c.get("args", []),
    }
    for where, argv in command_lines.items():
        used = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
        assert used <= known, f"{where}: not launcher options: {sorted(used - known)}"


@pytest.mark.parametrize("recipe", ["systemd", "kubernetes"])
def test_each_command_line_resolves(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's options and QWEN_SERVER_* values pass the launcher's own checks (--print-config:
    resolve and print, start nothing)."""
    if recipe == "systemd":
        unit = parse_unit(UNIT.read_text())
        argv, env = unit_exec(unit), unit_env(unit)
    else:
        c = container(manifest())
        argv, env = c["command"] + c.get("args", []), container_env(c)
    assert Path(argv[0]).name == "qwen-server", f"{recipe}: the launcher must be the process started: {argv[0]}"
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            # Files named here (API keys) exist only where the recipe is installed: stand one in.
            if key.endswith("_FILE"):
                value = str(tmp_path / Path(value).name)
                Path(value).write_text("sk-deploy-test\n")
            monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, [*argv[1:], "--print-config"])
    assert result.exit_code == 0, f"{recipe}: {result.output}"
    resolved = json.loads(result.output.split("\nequivalent:")[0])["settings"]
    assert resolved["host"] == "0.0.0.0" and resolved["port"] == served_port(argv)
    assert float(resolved["drain_timeout"]) == drain_timeout_s(argv, env)


def test_systemd_unit_stops_gracefully_and_restarts_on_failure() -> None:
    unit = parse_unit(UNIT.read_text())

    def svc(key: str) -> str | None:
        return unit_value(unit, "Service", key)

    # SIGTERM to the launcher only (it drains, then stops its workers and engines).
    assert svc("KillMode") == "mixed"
    drain = drain_timeout_s(unit_exec(unit), unit_env(unit))
    assert timespan_s(svc("TimeoutStopSec")) >= drain + ENGINE_SHUTDOWN_S
    assert timespan_s(svc("TimeoutStartSec")) >= 600, "model loading takes minutes"
    assert svc("Restart") == "on-failure" and svc("Type") == "exec"
    assert svc("User") not in (None, "root")
    assert int(svc("LimitNOFILE")) >= 65536
    assert (svc("EnvironmentFile") or "").startswith("-"), "the settings file must be optional"
    assert "HF_HOME" in unit_env(unit)
    # Hardening that would break CUDA (device nodes) or torch/Triton JIT (W+X memory).
    assert svc("MemoryDenyWriteExecute") in (None, "no") and svc("PrivateDevices") in (None, "no")
    assert svc("NoNewPrivileges") == "yes" and svc("PrivateTmp") == "yes"


def test_kubernetes_probes_hit_live_and_health_on_the_served_port() -> None:
    docs = manifest()
    c = container(docs)
    port = served_port(c["command"] + c.get("args", []))
    named = {p["name"]: p["containerPort"] for p in c["ports"] if "name" in p}
    assert port in {p["containerPort"] for p in c["ports"]}

    def probe(name: str) -> tuple[str, int]:
        get = c[name]["httpGet"]
        return get["path"], named.get(get["port"], get["port"])

    # Liveness must not be /health: a pod still loading its model would be killed in a loop.
    assert probe("livenessProbe") == ("/live", port)
    assert probe("readinessProbe") == ("/health", port)
    assert probe("startupProbe") in {("/live", port), ("/health", port)}
    startup = c["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 300

    service = kind(docs, "Service")
    pod = kind(docs, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]} == {port}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port


def test_kubernetes_grace_period_covers_prestop_drain_and_engine_shutdown() -> None:
    docs = manifest()
    spec = kind(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["command"][0] == "qwen-server", "the launcher must be PID 1 (a shell would not pass SIGTERM on)"
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre_stop:
        assert pre_stop["exec"]["command"][0] == "sleep"
        sleep = float(pre_stop["exec"]["command"][1])
    elif "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    drain = drain_timeout_s(c["command"] + c.get("args", []), container_env(c))
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + ENGINE_SHUTDOWN_S


def test_kubernetes_pod_has_gpu_shared_memory_cache_and_key_file() -> None:
    docs = manifest()
    spec = kind(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    env = container_env(c)

    def mounted(path: str) -> dict[str, Any]:
        (volume,) = [v for mount, v in mounts.items() if Path(path).is_relative_to(mount)]
        return volume

    assert "secret" in mounted(env[env_name("api_key_file")])
    mounted(env["HF_HOME"])  # the model download goes to a volume, not the container's layer


# --- the tools' own checks (where installed) ---


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _systemd_verify(tool: str, unit: Path) -> str:
    proc = subprocess.run(
        [tool, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else f"\n(exit {proc.returncode})")


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    # verify checks that ExecStart's binary exists: point it at this checkout's launcher (or, in an
    # environment without the console script, at this interpreter), and change nothing else.
    launcher = Path(sys.executable).with_name("qwen-server")
    real = str(launcher if launcher.exists() else Path(sys.executable))
    original = UNIT.read_text()
    text, n = re.subn(r"^(ExecStart=)(\S+)", lambda m: m[1] + real, original, flags=re.MULTILINE)
    assert n == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    assert _systemd_verify(tool, unit) == ""
    # verify reports a mistyped key as a warning only (exit 0): make sure it does report it here.
    unit.write_text(text.replace("KillMode=", "KillMod="))
    assert "Unknown key" in _systemd_verify(tool, unit)


def _kubectl_decode(tool: str, doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """The object as kubectl decodes it into its typed API struct, with no cluster (--local).
    `create --dry-run=client` needs a server for discovery; `set ... --local` does not."""
    path.write_text(yaml.safe_dump(doc))
    if doc["kind"] == "Service":
        selector = ",".join(f"{k}={v}" for k, v in doc["spec"]["selector"].items())
        cmd = [tool, "set", "selector", "--local", "-o", "json", "-f", str(path), selector]
    else:  # pod templates; an added variable makes it print the object (unchanged: no output)
        cmd = [tool, "set", "env", "--local", "-o", "json", "-f", str(path), "KUBECTL_DECODE_PROBE=1"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl could not decode {doc['kind']}: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


def _dropped(given: Any, decoded: Any, path: str = "") -> list[str]:
    """Fields of `given` missing or different in `decoded`: typed decoding drops unknown fields."""
    if isinstance(given, dict):
        if not isinstance(decoded, dict):
            return [path]
        missing = [f"{path}.{k}" for k in given if k not in decoded]
        return missing + [p for k, v in given.items() if k in decoded for p in _dropped(v, decoded[k], f"{path}.{k}")]
    if isinstance(given, list):
        if not isinstance(decoded, list) or len(decoded) < len(given):
            return [path]
        return [p for i, (g, d) in enumerate(zip(given, decoded, strict=False)) for p in _dropped(g, d, f"{path}[{i}]")]
    return [] if given == decoded or str(given) == str(decoded) else [path]  # quantities: 1 -> "1"


def test_kubectl_decodes_every_object_without_unknown_fields(tmp_path: Path) -> None:
    tool = _tool("kubectl")
    for i, doc in enumerate(manifest()):
        decoded = _kubectl_decode(tool, doc, tmp_path / f"{i}.yaml")
        assert _dropped(doc, decoded) == [], f"{doc['kind']}: fields kubectl does not know (typos?)"
    # Typed decoding, not YAML pass-through: a wrongly typed field is refused.
    broken = kind(manifest(), "Deployment")
    broken["spec"]["replicas"] = "one"
    with pytest.raises(AssertionError, match="cannot unmarshal"):
        _kubectl_decode(tool, broken, tmp_path / "broken.yaml")
