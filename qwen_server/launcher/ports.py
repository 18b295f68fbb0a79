"""Who holds a TCP port, and taking it for the server (Linux /proc; no torch, no vLLM).

A port can be held in two ways that matter here: a LISTEN socket (a server up and serving), or a
socket that is only bound (a Granian master reserves its port that way, and nothing listens while
the workers load the model). Only LISTEN sockets appear in /proc/net/tcp; bound-only ones are
found by duplicating each candidate socket (pidfd_getfd) and asking it for its address.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass, field

from qwen_server import procs

_LISTEN = "0A"
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

SERVER_MARKERS = ("qwen-server", "qwen_server")


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    listening: bool
    proc: procs.ProcInfo
    parent: procs.ProcInfo | None

    @property
    def is_qwen_server(self) -> bool:
        return any(marker in self.proc.cmdline for marker in SERVER_MARKERS)

    @property
    def orphaned(self) -> bool:
        """A qwen_server worker whose supervisor is gone (re-parented to init or a subreaper)."""
        return (
            self.is_qwen_server
            and "worker-" in self.proc.cmdline
            and (self.parent is None or not any(m in self.parent.cmdline for m in SERVER_MARKERS))
        )


@dataclass(slots=True)
class PortReport:
    port: int
    holders: list[Holder] = field(default_factory=list)
    # Connections on the port that no process owns any more (TIME_WAIT, FIN_WAIT2, LAST_ACK...):
    # what is left of closed or killed servers. Harmless: a bind with SO_REUSEADDR succeeds.
    lingering: int = 0

    def describe(self, host: str) -> str:
        lines = [f"Port {self.port} on {host} is already in use."]
        if not self.holders:
            lines.append(
                "  No process holding it could be identified (it may belong to another user or network "
                f"namespace; run as root to see it, or check `ss -ltnp 'sport = :{self.port}'`)."
            )
        for h in self.holders:
            state = (
                "listening"
                if h.listening
                else "bound but NOT listening: typically another server still loading its model"
            )
            lines.append(f"  PID {h.pid} ({state}): {h.proc.short}")
            if h.parent is not None:
                lines.append(f"      parent PID {h.parent.pid}: {h.parent.short}")
            if h.orphaned:
                lines.append(
                    "      This is a qwen_server worker ORPHANED by a dead supervisor: it still holds the port."
                )
        lines.append("What to do:")
        if any(h.is_qwen_server for h in self.holders):
            lines.append("  - run again with --replace to stop that qwen_server gracefully and take its place;")
        pids = " ".join(str(h.pid) for h in self.holders)
        if pids:
            lines.append(f"  - stop it yourself: kill -TERM {pids};")
        lines.append(f"  - serve on another port: --port {self.port + 1}.")
        return "\n".join(lines)


def _proc_net_rows(port: int) -> tuple[set[int], int, set[int]]:
    """(inodes listening on `port`, ownerless connections on `port`, inodes of every listed socket)."""
    listening: set[int] = set()
    listed: set[int] = set()
    lingering = 0
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        try:
            with open(f"/proc/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    inode = int(cols[9])
                    listed.add(inode)
                    if not table.startswith("tcp"):
                        continue
                    local_port = int(cols[1].rsplit(":", 1)[1], 16)
                    if local_port != port:
                        continue
                    if cols[3] == _LISTEN:
                        listening.add(inode)
                    elif inode == 0:
                        lingering += 1
        except FileNotFoundError:
            continue
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) >= 7:
                    listed.add(int(cols[6]))
    except FileNotFoundError:
        pass
    return listening, lingering, listed


def _bound_port(pid: int, fd: int) -> int | None:
    """The local TCP port of another process's socket, through a duplicate of it (pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            return None
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return None
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            return int(s.getsockname()[1])  # typeshed types socket addresses as Any
        except OSError:
            return None
        finally:
            s.close()
    finally:
        os.close(pidfd)


def find_holders(port: int) -> PortReport:
    listening, lingering, listed = _proc_net_rows(port)
    report = PortReport(port=port, lingering=lingering)
    me = os.getpid()
    for pid in procs.all_pids():
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        state = None
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            if inode in listening:
                state = True
                break
            if inode not in listed and _bound_port(pid, int(fd)) == port:
                state = False
        if state is None:
            continue
        proc = procs.info(pid)
        if proc is None:
            continue
        report.holders.append(Holder(pid=pid, listening=state, proc=proc, parent=procs.info(proc.ppid)))
    return report


class PortInUse(RuntimeError):
    def __init__(self, report: PortReport, host: str) -> None:
        super().__init__(report.describe(host))
        self.report = report


def take_port(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen with a plain socket (no SO_REUSEPORT), inheritable by the workers.

    Listening at once closes the window between check and serve, and a socket without SO_REUSEPORT
    makes a second server (even a raw Granian, which binds with SO_REUSEPORT) fail instead of
    silently sharing the port. The first bind is made without SO_REUSEADDR, because with it Linux
    lets two sockets share a port while neither listens, which is exactly how a Granian master
    reserves its port while its workers load a model. Only when the sole obstacle is connections
    no process owns (TIME_WAIT and the like, left by a stopped or killed server) is the bind
    retried with SO_REUSEADDR.
    """
    try:
        return _bind_listen(host, port, backlog, reuse_addr=False)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    report = find_holders(port)
    if report.holders or not report.lingering:
        raise PortInUse(report, host)
    try:
        return _bind_listen(host, port, backlog, reuse_addr=True)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(find_holders(port), host) from None
        raise


def _bind_listen(host: str, port: int, backlog: int, reuse_addr: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Restarts must not wait for TIME_WAIT: set it now that the bind proved the port is ours.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit TCP_NODELAY from the listener, and Granian sets it on no socket
        # it did not bind: without it, Nagle holds each small SSE write until the client ACKs the last,
        # and a client that delays its ACKs (most do) stalls every stream.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
