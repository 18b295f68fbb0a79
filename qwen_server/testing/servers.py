"""Server tooling shared by the tests and the benchmarks (`qwen_server.testing` is test tooling:
the product never imports it). Both start real servers on loopback and need a port for each."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's pick; free until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
