"""The layers' boundaries, as imports: only `http/` (and the app that assembles it) imports Litestar;
only `engine/vllm_compat.py` imports vLLM (tests/integration/test_vllm_compat.py checks that one); the
launcher imports none of the serving side's heavy packages (tests/unit/launcher/test_ports.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qwen_server"
HTTP_FREE = ["errors", "logs", "protocol", "settings", "metrics", "service", "engine", "media", "demo"]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_module_outside_http_imports_litestar_or_the_http_layer() -> None:
    offenders = []
    for name in HTTP_FREE:
        target = PACKAGE / name
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]:
            for module in _imported_modules(path):
                if module.split(".")[0] == "litestar" or module.startswith("qwen_server.http"):
                    offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def test_the_service_and_media_layers_import_without_litestar() -> None:
    """The same, as Python sees it: importing them pulls in no Litestar through any chain."""
    code = (
        "import sys\n"
        "import qwen_server.service.chat, qwen_server.service.completion, qwen_server.media.loader, qwen_server.errors\n"
        "print(sorted(m for m in ('litestar', 'qwen_server.http') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[]"
