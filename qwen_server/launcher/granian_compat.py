"""Every use of Granian's private API, in one place, fenced by the versions it was verified on.

Granian 2.8 has no public option to serve a socket someone else bound, nor a hook for its stop
signal or a list of its worker processes. What the launcher needs of them is here and nowhere else:
- the socket hand-off: `MPServer._init_shared_socket` is replaced so that the `SocketHolder` the
  workers inherit (`_shd`, with `_ssp`, `_sfd`, `_sso` as that method leaves them) wraps the
  launcher's socket (and uses `backlog`, the value Granian stores from its argument);
- the stop: `signal_handler_interrupt` (what MPServer runs on SIGINT and SIGTERM) is overridden;
- the workers: `wrks` and each worker's `inner` process;
- the app loader: `granian._internal.load_target`, which the default loader of `serve()` calls.

The 2.8.0 release rewrote this part of Granian: the version fence below refuses any other release,
and `tests/integration/test_ports.py` fails loudly when an upgrade within it breaks the hand-off.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from qwen_server import versions

VERIFIED_GRANIAN = ((2, 8, 7), (2, 9, 0))  # [low, high) of the versions the hand-off was verified on


def granian_version_ok() -> bool:
    import granian

    return versions.within(granian.__version__, VERIFIED_GRANIAN)


def check_granian_version() -> None:
    """Raise RuntimeError unless the installed Granian is one the hand-off was verified on."""
    if not granian_version_ok():
        import granian

        raise RuntimeError(
            versions.outside_message("Granian", granian.__version__, VERIFIED_GRANIAN, "the socket hand-off")
        )


class HandedSocketServer(Protocol):
    """What the launcher uses of Granian's multi-process server."""

    def serve(self, *, target_loader: Callable[[str], Any]) -> None:
        """Run until stopped; `target_loader(target)` runs in each worker and returns the app."""

    def worker_pids(self) -> list[int]:
        """The PIDs of the workers Granian runs now (none before it started them)."""

    def stop(self, signum: int) -> None:
        """Granian's own graceful stop, as on `signum`."""


# Called on SIGINT and SIGTERM instead of Granian's stop; returns True when it took the signal over
# (and will call `server.stop` itself), False to let Granian stop now.
OnInterrupt = Callable[[HandedSocketServer, "int | None"], bool]


def server_on_socket(
    sock: socket.socket, granian_kwargs: dict[str, Any], on_interrupt: OnInterrupt
) -> HandedSocketServer:
    """Granian's multi-process server with `granian_kwargs`, serving on `sock` (bound, listening and
    inheritable) instead of a socket it binds itself."""
    from granian._granian import SocketHolder
    from granian.server.mp import MPServer

    # `serve` is MPServer's own, called as HandedSocketServer declares it (target_loader= only).
    class _HandedSocketServer(MPServer):
        def worker_pids(self) -> list[int]:
            return [w.inner.pid for w in list(getattr(self, "wrks", []))]

        def stop(self, signum: int) -> None:
            super().signal_handler_interrupt(signum)  # type: ignore[no-untyped-call]  # unannotated in Granian

        def signal_handler_interrupt(self, signum: int | None = None, *args: Any, **kwargs: Any) -> None:
            if not on_interrupt(self, signum):
                super().signal_handler_interrupt(signum, *args, **kwargs)  # type: ignore[no-untyped-call]  # as above

        def _init_shared_socket(self) -> None:
            # What MPServer._init_shared_socket leaves behind for a shared (non-REUSEPORT) socket:
            # no per-worker spec, a SocketHolder the workers inherit, and the fd kept open here.
            # Granian's stub declares no SocketHolder constructor (the Rust class takes fd, is_uds,
            # backlog), and its __init__ sets `_shd = None` unannotated, so mypy types `_shd` as None.
            self._ssp = None
            holder = SocketHolder(sock.fileno(), False, self.backlog)  # type: ignore[call-arg]
            self._shd = holder  # type: ignore[assignment]
            self._sfd = holder.get_fd()
            self._sso = sock

    return _HandedSocketServer(**granian_kwargs)


def load_target(target: str) -> Any:
    """The app at `target` ("module:attribute"), imported as Granian's default loader does."""
    from granian._internal import load_target as granian_load_target

    return granian_load_target(target)
