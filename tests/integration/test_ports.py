"""The socket hand-off to Granian, with a real Granian serving the trivial hello app on loopback
(no engine). The port checks around it are in tests/unit/launcher/test_ports.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from qwen_server.launcher import granian_compat
from qwen_server.testing.servers import free_port
from tests.helpers.serverproc import ROOT, ServerProcess, base_env, port_holder_report

HANDOFF = textwrap.dedent(
    """
    import sys
    from qwen_server.launcher import ports, supervise
    port = int(sys.argv[1])
    sock = ports.take_port("127.0.0.1", port)
    sys.exit(supervise.run_granian(sock, {"target": "tests.helpers.hello_app:app", "address": "127.0.0.1", "port": port,
                                    "interface": "asgi", "workers": 2, "workers_kill_timeout": 5}))
    """
)


def test_granian_serves_the_handed_socket_and_a_second_granian_fails(tmp_path: Path) -> None:
    """Fails loudly if a Granian upgrade changes the private hooks the hand-off relies on (granian_compat.py)."""
    assert granian_compat.granian_version_ok()
    port = free_port()
    srv = ServerProcess([sys.executable, "-c", HANDOFF, str(port)], tmp_path / "handoff.log", port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(srv.url, timeout=2).text == "hello"
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.2)
        srv.remember_tree()
        raw = subprocess.run(
            [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "asgi",
                "--port",
                str(port),
                "tests.helpers.hello_app:app",
            ],
            cwd=ROOT,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert raw.returncode != 0
        assert "Address already in use" in raw.stderr + raw.stdout
        assert httpx.get(srv.url, timeout=2).text == "hello"
    finally:
        assert srv.stop() == 0
    assert srv.leftovers() == []
    assert port_holder_report(port) is None
