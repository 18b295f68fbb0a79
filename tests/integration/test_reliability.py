"""Reliability and adversarial suite (issue #8): load, slow and vanishing clients, fuzzed bodies and
killed processes against ONE real server (launcher -> Granian -> Litestar -> vLLM, tiny model),
then the long runs (`-m slow`): a soak under mixed traffic. Nothing may be lost: every request
gets an answer (a result, or an error in OpenAI's envelope), the engine ends with no request left
in it, and no process outlives the server.

The tests run in file order and share the server; the destructive ones come last (faults respawn
the worker, the drain test stops the server). Each prints one report line with what it measured:
run with `-s` to see them. The machine is small (2 shared cores), so the bounds are loose enough
for it, but each one fails on the defect it is about (a stall, a hang, a leak, a 5xx).

Admission bound: 32 per worker (not the README's default of 4 x max_num_seqs = 64), so that the
drain test's 32 streams are all admitted while the burst test stays "10x the bound" (320).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import math
import os
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from qwen_server import procs
from qwen_server.testing.servers import free_port
from tests.helpers.media import chat_body, image_data_url
from tests.helpers.serverproc import ServerProcess, shm_files_of, wait_port_free

LIMIT = 32  # --max-pending-requests: inference requests admitted at once
MAX_SEQS = 16  # --max-num-seqs: sequences the engine runs per step
DRAIN_TIMEOUT = 5.0
MAX_MODEL_LEN = 2048
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def rel(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("reliability") / "server.log"
    srv = ServerProcess.launcher(
        free_port(),
        log,
        "--model",
        str(tiny_model),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--max-num-seqs",
        str(MAX_SEQS),
        "--limit-mm-per-prompt",
        '{"image": 4}',
        "--max-pending-requests",
        str(LIMIT),
        "--respawn-failed-workers",
        "--drain-timeout",
        str(DRAIN_TIMEOUT),
        "--workers-kill-timeout",
        "30",
        # One engine per worker, restarted in place by its worker (what plain `granian` runs): the
        # shared engine's deaths and restarts are test_shared_engine.py's.
        "--no-shared-engine",
    )
    try:
        srv.wait_ready(timeout=400)
        yield srv
    finally:
        srv.stop()  # a no-op when the drain test already stopped it
        assert srv.leftovers() == []
        # Every engine's, the killed ones' too (remembered before each kill): removed by the resource
        # tracker of the worker that started it, which the launcher never kills before it is done.
        assert srv.leaked_shm() == []


# --- helpers ---


def report(line: str) -> None:
    print(f"\n[reliability] {line}")


def post(srv: ServerProcess, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + CHAT, content=content, timeout=timeout, headers={"content-type": "application/json"})


def timed_post(srv: ServerProcess, body: dict | bytes, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = post(srv, body, **kwargs)
    return r, time.perf_counter() - t0


def assert_envelope(r: httpx.Response, status: int | None = None) -> dict:
    """The response is an error in OpenAI's envelope (with `status` if given); returns the error."""
    if status is not None:
        assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def health(srv: ServerProcess, timeout: float = 5) -> tuple[int, dict]:
    r = httpx.get(srv.url + "/health", timeout=timeout)
    return r.status_code, r.json()


def wait_engine_idle(srv: ServerProcess, within: float = 5.0) -> float:
    """Seconds until the engine tracks no request and its scheduler runs and queues none."""
    t0 = time.monotonic()
    while True:
        code, body = health(srv)
        idle = code == 200 and body["requests_in_engine"] == 0 and body["scheduler"] == {"running": 0, "waiting": 0}
        if idle:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"engine not idle after {within} s: {code} {body}"
        time.sleep(0.05)


def metric_sum(srv: ServerProcess, name: str, **labels: str) -> float:
    """The sum of a metric's series (those with all of `labels`) in /metrics."""
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and all(w in line for w in want)
    )


def gauge_pids(srv: ServerProcess, name: str) -> set[str]:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {
        line.split('pid="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(name + "{") and 'pid="' in line
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def cmdline(pid: int) -> str:
    info = procs.info(pid)
    return info.cmdline if info else ""


def titled(srv: ServerProcess, marker: str) -> list[int]:
    """The server's processes whose title (command line) contains `marker`."""
    return [pid for pid in procs.descendants(srv.proc.pid) if marker in cmdline(pid)]


def worker_pid(srv: ServerProcess) -> int:
    (pid,) = titled(srv, f"qwen-server 127.0.0.1:{srv.port} worker-1")
    return pid


def raw_request(srv: ServerProcess, body: bytes, *, rcvbuf: int | None = None, send_body: bool = True) -> socket.socket:
    """A raw HTTP/1.1 POST on its own socket (headers sent; the body too unless `send_body` is False)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(_request_head(body) + (body if send_body else b""))
    return sock


def _request_head(body: bytes) -> bytes:
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def _response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased) of a response head, its blank line excluded or not."""
    status_line, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """Status and body of one response with a Content-Length (the socket stays open)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _response_head(head)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return status, body


def hang_up(sock: socket.socket, reset: bool) -> None:
    if reset:  # RST instead of FIN: the rudest way to leave
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def sse_events(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def stream_ending(events: list[str]) -> str:
    """How a stream ended: "finished" (a finish_reason), an error event's code, or "cut"."""
    if len(events) < 2 or events[-1] != "[DONE]":
        return "cut"
    last = json.loads(events[-2])
    if "error" in last:
        assert set(last["error"]) == {"message", "type", "param", "code"}, last
        return last["error"]["code"] or "error"
    finished = all(c["finish_reason"] for c in last["choices"]) and last["choices"]
    return "finished" if finished else "no-finish"


# --- 1. load: idle connections ---

IDLE_CONNECTIONS = 1000


def test_idle_keepalive_connections_do_not_block_new_requests(rel: ServerProcess) -> None:
    # Granian admits backlog/workers = 1024 connections per worker at once (--backpressure raises it); a
    # connection holds its slot while open, even silent, so 1000 idle ones leave room for a few more.
    socks: list[socket.socket] = []
    try:
        for i in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", rel.port))
            if i % 2:  # half send one request and keep the connection open; half never send a byte
                sock.sendall(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(sock)
        keepalive = socks[1::2]
        assert all(read_response(s)[0] == 200 for s in keepalive)

        r, chat_latency = timed_post(rel, chat_body(8, image_data_url(color=(10, 20, 30))))
        assert r.status_code == 200, r.text
        t0 = time.perf_counter()
        assert health(rel)[0] == 200
        health_latency = time.perf_counter() - t0
        # The idle connections were not dropped to make room: each still answers its next request.
        for s in keepalive:
            s.sendall(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert all(read_response(s)[0] == 200 for s in keepalive)
    finally:
        for s in socks:
            s.close()
    report(
        f"{IDLE_CONNECTIONS} idle connections ({len(keepalive)} keep-alive, {len(socks) - len(keepalive)} silent): "
        f"image chat answered in {chat_latency:.3f} s, /health in {health_latency:.3f} s"
    )
    # Blocked would mean a hang until the client's timeout (a failure above), not a slow answer: the
    # latencies are reported, not asserted (this machine is shared; speed is measured in benchmarks/).


# --- 2. load: a burst of 10x the admission bound ---

BURST = 10 * LIMIT


async def _burst(srv: ServerProcess, bodies: list[bytes], timeout: float) -> list[tuple[httpx.Response, float]]:
    """The response and latency of each POST, all sent at once from ONE thread on connections opened
    beforehand, so that the clock runs only while the server has the request. (320 httpx clients on 320
    threads spent up to 2 s in their own connection set-up and GIL hand-offs on 2 shared cores, while the
    server answered each in under 10 ms: the test measured its own harness.)"""
    conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in bodies]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes):
        t0 = time.perf_counter()
        writer.write(_request_head(body) + body)
        await writer.drain()
        status, headers = _response_head(await reader.readuntil(b"\r\n\r\n"))
        payload = await reader.readexactly(int(headers["content-length"]))
        return httpx.Response(status, headers=headers, content=payload), time.perf_counter() - t0

    try:
        return await asyncio.wait_for(
            asyncio.gather(*(one(r, w, b) for (r, w), b in zip(conns, bodies, strict=False))), timeout
        )
    finally:
        for _, writer in conns:
            writer.close()


def test_burst_of_ten_times_the_bound_gets_fast_429s_and_admitted_requests_finish(rel: ServerProcess) -> None:
    # Distinct images (colours far apart) so that admitted requests decode each one for real.
    bodies = [
        json.dumps(chat_body(16, image_data_url(color=((37 * i) % 256, (91 * i) % 256, 128)))).encode()
        for i in range(BURST)
    ]
    log_offset = len(rel.log())
    rejected_before = metric_sum(rel, "qwen_server_requests_rejected_total")
    images_before = metric_sum(rel, "qwen_server_images_total")

    results = asyncio.run(_burst(rel, bodies, timeout=120))

    ok = [lat for r, lat in results if r.status_code == 200]
    refused = [lat for r, lat in results if r.status_code == 429]
    assert len(ok) + len(refused) == BURST, sorted({r.status_code for r, _ in results})
    for r, _ in results:
        if r.status_code == 429:
            assert assert_envelope(r, 429)["code"] == "overloaded" and r.headers["retry-after"] == "1"
        else:
            assert r.json()["usage"]["completion_tokens"] == 16
    p50, p99 = percentile(refused, 0.5), percentile(refused, 0.99)
    # The server's own time for each refusal (its access log); the rest is Granian's I/O and this client's loop.
    served = [
        float(line.split("latency_ms=", 1)[1].split()[0]) / 1000
        for line in rel.log()[log_offset:].splitlines()
        if " 429 " in line and "latency_ms=" in line
    ]
    assert len(served) == len(refused)
    report(
        f"burst of {BURST} (bound {LIMIT}): {len(ok)} admitted, all 200, slowest {max(ok):.2f} s; "
        f"{len(refused)} refused with 429, latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms at the client, "
        f"p99 {percentile(served, 0.99) * 1000:.1f} ms in the server"
    )
    # Something was refused, so the bound was reached: at least LIMIT were admitted.
    assert refused and len(ok) >= LIMIT
    # Refusals do not queue behind the engine: every 429 was back before the slowest admitted request.
    assert max(refused) < max(ok), (max(refused), max(ok))
    # The refusals cost no image decoding, and each is counted.
    assert metric_sum(rel, "qwen_server_requests_rejected_total") - rejected_before == len(refused)
    assert metric_sum(rel, "qwen_server_images_total") - images_before == len(ok)
    wait_engine_idle(rel)


# --- 3. slow clients ---

SLOW_BYTE_INTERVAL = 0.2


def _slow_upload(rel: ServerProcess, body: bytes, done: dict) -> None:
    sock = raw_request(rel, body, send_body=False)
    try:
        for i in range(len(body)):
            sock.sendall(body[i : i + 1])
            time.sleep(SLOW_BYTE_INTERVAL)
        done["sent_at"] = time.monotonic()
        done["status"], done["body"] = read_response(sock, timeout=60)
    finally:
        sock.close()


SLOW_READ = (4, 0.5)  # the slow reader takes 4 bytes every 0.5 s


def in_flight(srv: ServerProcess) -> float:
    """HTTP requests the server is serving, not counting the scrape that asks."""
    return metric_sum(srv, "qwen_server_http_requests_in_flight") - 1


def test_a_429_to_a_big_body_reaches_an_asyncio_client(rel: ServerProcess) -> None:
    """Admission refuses before the body is read; the rest of the 5 MB body is read and dropped, so
    an asyncio client that is still sending gets the 429 instead of a reset (ReadError)."""
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5_000_000}], "max_tokens": 1}

    async def run() -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=LIMIT + 1)) as holders_client:

            async def hold() -> None:  # a slow reader of a long stream: admitted until cancelled
                async with holders_client.stream("POST", rel.url + CHAT, json=chat_body(1500, stream=True)) as r:
                    async for _ in r.aiter_lines():
                        await asyncio.sleep(0.05)

            holders = [asyncio.create_task(hold()) for _ in range(LIMIT)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # all LIMIT admitted: in the engine, running or waiting
                scheduler = health(rel)[1].get("scheduler", {})
                if scheduler.get("running", 0) + scheduler.get("waiting", 0) >= LIMIT:
                    break
                await asyncio.sleep(0.1)
            sdk = openai.AsyncOpenAI(base_url=rel.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            try:
                for _ in range(10):
                    try:
                        await sdk.post("/chat/completions", cast_to=dict, body=big)
                        statuses.append(200)
                    except openai.APIStatusError as exc:  # an APIConnectionError (the reset) fails the test
                        statuses.append(exc.status_code)
            finally:
                await sdk.close()
                for task in holders:
                    task.cancel()
                await asyncio.gather(*holders, return_exceptions=True)
        return statuses

    assert asyncio.run(run()) == [429] * 10
    wait_engine_idle(rel, within=30)


def test_slow_uploader_and_slow_reader_do_not_stall_others(rel: ServerProcess) -> None:
    image = image_data_url(color=(200, 100, 0))
    # The engine's first logprobs request costs seconds once (a warm-up, not the slow clients' doing).
    assert post(rel, chat_body(2, n=2, logprobs=True, top_logprobs=20)).status_code == 200
    baseline = [timed_post(rel, chat_body(8, image))[1] for _ in range(5)]

    # A reader of a big stream (2 choices, 20 logprobs per token: megabytes, more than the socket
    # buffers hold, so the server's writes to it block) with a small receive buffer, at 8 B/s.
    big = chat_body(1900, stream=True, n=2, logprobs=True, top_logprobs=20)
    reader = raw_request(rel, json.dumps(big).encode(), rcvbuf=4096)
    reader.settimeout(30)
    read = b""
    # An uploader that sends its (small) body one byte every 0.2 s: about 12 s.
    slow_body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, separators=(",", ":")
    ).encode()
    upload: dict = {}
    uploader = threading.Thread(target=_slow_upload, args=(rel, slow_body, upload))
    uploader.start()
    during: list[float] = []
    next_read = time.monotonic()
    try:
        while uploader.is_alive() and "sent_at" not in upload:
            r, latency = timed_post(rel, chat_body(8, image))
            assert r.status_code == 200, r.text
            during.append(latency)
            if time.monotonic() >= next_read:
                read += reader.recv(SLOW_READ[0])
                next_read += SLOW_READ[1]
        uploader.join(60)
        assert not uploader.is_alive()
        assert upload["status"] == 200, upload
        assert json.loads(upload["body"])["choices"][0]["finish_reason"]
        assert read.startswith(b"HTTP/1.1 200"), read[:200]
        # The engine is done with the reader's request, but the server still holds its response,
        # waiting for the reader: the blocked write held nothing else up (the chats above ran).
        wait_engine_idle(rel, within=60)
        held = in_flight(rel)
    finally:
        hang_up(reader, reset=True)
    # Its hang-up releases the blocked response: nothing left in flight.
    t0 = time.monotonic()
    while in_flight(rel) > 0 and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    released_in = time.monotonic() - t0

    base, worst = sorted(baseline)[2], max(during)
    report(
        f"slow clients: {len(slow_body)}-byte body at {SLOW_BYTE_INTERVAL} s/byte and a reader taking "
        f"{SLOW_READ[0] / SLOW_READ[1]:.0f} B/s of a multi-MB stream; meanwhile {len(during)} image chats: median "
        f"{sorted(during)[len(during) // 2]:.3f} s, worst {worst:.3f} s (#{during.index(worst)}) (alone: median "
        f"{base:.3f} s); responses held after the engine was done: {held:.0f}; released {released_in:.2f} s after "
        f"the reader's hang-up"
    )
    # The normal requests ran, one after another, while both slow clients were connected: a worker
    # stalled by either would have answered none of them until the upload ended.
    assert len(during) >= 5
    assert held == 1  # the reader's response, blocked on its socket
    assert in_flight(rel) == 0


# --- 4. disconnect storm ---

STORM = 200


def _start_and_hang_up(rel: ServerProcess, i: int, timeout: float = 30) -> int:
    """Start a stream, hang up after the response head, the first event or the first token."""
    sock = raw_request(rel, json.dumps(chat_body(1000, stream=True)).encode())
    try:
        sock.settimeout(timeout)
        data = b""
        wanted_events = i % 3  # 0: just the head, 1: the role event, 2: the first content event
        while b"\r\n\r\n" not in data or data.count(b"data: ") < wanted_events:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        return int(data.split(b" ", 2)[1])
    finally:
        hang_up(sock, reset=bool(i % 2))


def test_disconnect_storm_leaves_no_request_in_the_engine(rel: ServerProcess) -> None:
    answered = {"route": CHAT, "status": "200"}
    ok_before = metric_sum(rel, "qwen_server_http_requests_total", **answered)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(MAX_SEQS) as pool:  # below the bound: none refused
        statuses = list(pool.map(lambda i: _start_and_hang_up(rel, i), range(STORM)))
    storm_s = time.monotonic() - t0
    assert statuses == [200] * STORM
    idle_in = wait_engine_idle(rel, within=5)
    assert metric_sum(rel, "vllm:num_requests_running") == 0
    assert metric_sum(rel, "vllm:num_requests_waiting") == 0
    # Every one of them was answered (and logged) by the server, not lost on the way.
    deadline = time.monotonic() + 5
    while (
        metric_sum(rel, "qwen_server_http_requests_total", **answered) - ok_before < STORM
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert metric_sum(rel, "qwen_server_http_requests_total", **answered) - ok_before == STORM
    r, latency = timed_post(rel, chat_body(8))
    assert r.status_code == 200
    report(
        f"disconnect storm: {STORM} streams started and abandoned in {storm_s:.1f} s (half with RST); "
        f"engine empty {idle_in:.2f} s later; next chat {latency:.3f} s"
    )


# --- 5. fuzzing ---


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a size, without pixel data (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


SMALL_PNG = image_data_url((8, 8), fmt="PNG")

# Anything JSON can hold, nested.
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
junk = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)

# Image URLs that never leave the machine: data URLs (good, truncated, garbage, lying about their
# type), loopback hosts in several spellings and file paths the server must refuse, and random text
# that is no http(s) URL (so nothing is ever resolved or fetched off this machine). Private,
# link-local and other non-loopback addresses are never named here, not even to be refused: the
# address policy is tested as a pure function in test_fetch.py.
image_urls = st.one_of(
    st.just(SMALL_PNG),
    st.integers(min_value=1, max_value=len(SMALL_PNG) - 1).map(lambda n: SMALL_PNG[:n]),
    st.binary(max_size=80).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.text(max_size=60).map(lambda t: "data:image/jpeg;base64," + t),
    st.text(max_size=40).map(lambda t: "data:" + t),
    st.sampled_from(
        [
            "data:image/png;base64," + base64.b64encode(_png_header(60000, 60000)).decode(),
            "data:image/png;base64," + base64.b64encode(_png_header(1, 2**31 - 1)).decode(),
            "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
            "data:text/plain;base64,aGVsbG8=",
            "data:,",
            "",
            "http://127.0.0.1:1/x.png",
            "http://[::1]/x.png",
            "http://127.0.0.2/a.jpg",
            "http://127.255.255.254/latest",
            "http://localhost/x.png",
            "https://127.0.0.1/x",
            "http://127.1/x",
            "file:///etc/passwd",
            "/etc/passwd",
            "../../etc/passwd",
            "ftp://127.0.0.1/x",
            "gopher://127.0.0.1/",
            "javascript:alert(1)",
        ]
    ),
    st.text(max_size=60).filter(lambda t: "http" not in t.lower() and "//" not in t),
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=60)})
image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.one_of(
            st.fixed_dictionaries(
                {"url": image_urls}, optional={"detail": st.sampled_from(["auto", "low", "high", "max"])}
            ),
            junk,
        ),
    }
)
odd_part = st.one_of(
    junk, st.fixed_dictionaries({"type": st.text(max_size=10)}, optional={"text": junk, "image_url": junk})
)
content = st.one_of(
    st.none(), st.text(max_size=200), st.lists(st.one_of(text_part, image_part, odd_part), max_size=5), junk
)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant"]), junk)},
    optional={"content": content, "name": st.one_of(st.text(max_size=10), junk)},
)
small_tokens = st.integers(min_value=1, max_value=8)
# Integers of every size, but none that would ask a valid request for minutes of generation.
wild_int = st.one_of(st.integers(max_value=0), st.integers(min_value=10**6), st.just(2**63), st.just(2**64))
wild_float = st.floats(allow_nan=False, allow_infinity=False)
OPTIONAL_FIELDS = {
    "model": st.one_of(st.sampled_from(["tiny", "no-such-model", ""]), junk),
    "max_tokens": st.one_of(small_tokens, wild_int, junk),
    "max_completion_tokens": st.one_of(small_tokens, wild_int),
    "temperature": st.one_of(st.floats(0, 2), wild_float, junk),
    "top_p": st.one_of(st.floats(0, 1), wild_float),
    "top_k": st.one_of(st.integers(-2, 50), wild_int),
    "min_p": wild_float,
    "seed": st.one_of(st.integers(-(2**70), 2**70), junk),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), junk),
    "stop_token_ids": st.lists(st.integers(-(2**70), 2**70), max_size=3),
    "n": st.one_of(st.integers(-2, 20), junk),
    "presence_penalty": wild_float,
    "frequency_penalty": wild_float,
    "repetition_penalty": wild_float,
    "ignore_eos": st.one_of(st.booleans(), junk),
    "min_tokens": st.one_of(st.integers(0, 8), wild_int),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(-10, 10**12).map(str), st.text(max_size=5)), wild_float, max_size=3
    ),
    "logprobs": st.one_of(st.booleans(), junk),
    "top_logprobs": st.one_of(st.integers(-1, 25), junk),
    "response_format": st.one_of(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
            optional={"json_schema": st.one_of(junk, st.fixed_dictionaries({"schema": junk}))},
        ),
        junk,
    ),
    "stream": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "mm_processor_kwargs": st.one_of(
        st.dictionaries(
            st.sampled_from(
                ["max_pixels", "min_pixels", "fps", "x", "temporal_patch_size", "patch_size", "merge_size", "size"]
            ),
            junk,
            max_size=2,
        ),
        junk,
    ),
    "chat_template_kwargs": st.one_of(st.dictionaries(st.text(max_size=12), junk, max_size=2), junk),
    "add_generation_prompt": st.one_of(st.booleans(), junk),
    "continue_final_message": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "user": st.one_of(st.text(max_size=20), junk),
    "extra_unknown_field": junk,
}
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), junk)},
    optional=OPTIONAL_FIELDS,
)
# Well-formed requests with values drawn across their allowed ranges: these reach the engine.
valid_image_part = st.fixed_dictionaries(
    {
        "type": st.just("image_url"),
        "image_url": st.fixed_dictionaries({"url": st.sampled_from([SMALL_PNG, image_data_url(color=(1, 99, 3))])}),
    }
)
valid_message = st.fixed_dictionaries(
    {
        "role": st.just("user"),
        "content": st.one_of(
            st.text(min_size=1, max_size=100), st.lists(st.one_of(text_part, valid_image_part), min_size=1, max_size=3)
        ),
    }
)
VALID_FIELDS = {
    "model": st.just("tiny"),
    "max_tokens": small_tokens,
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "n": st.integers(1, 4),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 2),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "mm_processor_kwargs": st.sampled_from([{}, {"max_pixels": 12544}, {"min_pixels": 3136, "max_pixels": 50176}]),
}
valid_chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(valid_message, min_size=1, max_size=2)},
    optional=VALID_FIELDS,
)
# What goes on the wire: a well-formed body, a generated body (its JSON, sometimes with
# NaN/Infinity, which is not JSON), any JSON value, or raw bytes.
wire_bodies = st.one_of(
    valid_chat_bodies.map(lambda b: json.dumps(b).encode()),
    chat_bodies.map(lambda b: json.dumps(b).encode()),
    chat_bodies.map(lambda b: json.dumps(b).encode()),
    junk.map(lambda j: json.dumps(j).encode()),
    st.binary(max_size=200),
)

# Values the fuzzers once found answered with a 500: integers past 64 bits reaching vLLM's msgpack
# wire (the request then stayed counted in the engine for good, and a stream was cut with no error
# event), and values vLLM's SamplingParams refuses with its own exception type.
REGRESSIONS = (
    ("seed", 2**64, False),
    ("seed", -(2**63) - 1, True),
    ("top_k", 2**70, True),
    ("stop", [""], False),
    ("temperature", 100.0, True),
)


def _check_answer(raw: bytes, r: httpx.Response, seen: dict[int, int]) -> None:
    seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:500], raw[:500])
    if r.status_code >= 400:
        assert_envelope(r)
        return
    assert r.status_code == 200, (r.status_code, r.text[:300])
    if r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text.splitlines())
        assert events and events[-1] == "[DONE]", (r.text[-500:], raw[:500])
        for event in events[:-1]:  # every event is a chunk or an error envelope
            parsed = json.loads(event)
            assert "choices" in parsed or set(parsed.get("error", {})) == {"message", "type", "param", "code"}, event
    else:
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"], body


def test_known_bad_values_are_400_in_the_envelope_and_leave_nothing_in_the_engine(rel: ServerProcess) -> None:
    for field, value, stream in REGRESSIONS:
        r = post(rel, chat_body(4, stream=stream, **{field: value}))
        error = assert_envelope(r, 400)
        assert error["param"] == field or field in error["message"], (field, error)
    assert health(rel)[1]["requests_in_engine"] == 0
    # The edges of the allowed ranges still work.
    for field, value in (("seed", 2**63 - 1), ("seed", -(2**63)), ("top_k", 2**63 - 1), ("temperature", 2.0)):
        assert post(rel, chat_body(2, **{field: value})).status_code == 200, field
    wait_engine_idle(rel)


FUZZ_EXAMPLES = int(os.environ.get("QWEN_FUZZ_EXAMPLES", "150"))


def test_fuzzed_chat_bodies_never_get_a_5xx_and_the_worker_stays_up(rel: ServerProcess) -> None:
    worker, core = worker_pid(rel), titled(rel, "VLLM::EngineCore")
    seen: dict[int, int] = {}
    t0 = time.monotonic()

    with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as client:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(raw=wire_bodies)
        @example(raw=json.dumps({**chat_body(4), "seed": 2**64}).encode())
        @example(raw=json.dumps({**chat_body(4), "top_k": 2**70, "stream": True}).encode())
        @example(raw=json.dumps({**chat_body(4), "stop": [""]}).encode())
        @example(
            raw=json.dumps(
                {**chat_body(2, image=SMALL_PNG), "mm_processor_kwargs": {"temporal_patch_size": 0}}
            ).encode()
        )
        def fuzz(raw: bytes) -> None:
            _check_answer(raw, client.post(rel.url + CHAT, content=raw), seen)

        fuzz()

    elapsed = time.monotonic() - t0
    report(f"fuzz: {sum(seen.values())} bodies in {elapsed:.1f} s, statuses {dict(sorted(seen.items()))}")
    # The generator reached both sides: bodies refused and bodies that ran in the engine.
    assert seen.get(200, 0) >= FUZZ_EXAMPLES // 10 and seen.get(400, 0) >= FUZZ_EXAMPLES // 4, seen
    # Same worker, same engine: nothing crashed and got quietly respawned.
    assert rel.proc.poll() is None and worker_pid(rel) == worker and titled(rel, "VLLM::EngineCore") == core
    assert health(rel)[0] == 200
    wait_engine_idle(rel)


SCHEMA_EXAMPLES = int(os.environ.get("QWEN_SCHEMA_EXAMPLES", "100"))


def _schema_fuzz(operation, counts: dict[int, int]) -> None:
    """Call `operation` with bodies that fit its schema and bodies that break it; count statuses."""
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=SCHEMA_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def fuzz(case) -> None:
        r = case.call(timeout=120)
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        case.validate_response(r, checks=[not_a_server_error])
        if r.status_code >= 400:
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body

    fuzz()


def test_bodies_generated_from_the_servers_openapi_schema_never_get_a_5xx(rel: ServerProcess) -> None:
    # Schemathesis reads the server's own schema and generates bodies that fit it (positive) and
    # that break it (negative). Its pytest integration (`from_fixture`) fails on pytest 9, so its
    # strategies run under a plain Hypothesis test here.
    schema = schemathesis.openapi.from_url(rel.url + "/docs/openapi.json")
    worker = worker_pid(rel)
    seen: dict[str, dict[int, int]] = {}
    t0 = time.monotonic()
    for path in (CHAT, "/v1/completions"):
        _schema_fuzz(schema[path]["POST"], seen.setdefault(path, {}))
    report(
        f"schema fuzz: {sum(sum(c.values()) for c in seen.values())} cases in {time.monotonic() - t0:.1f} s, "
        f"statuses {seen}"
    )
    for path, counts in seen.items():
        assert counts.get(200, 0) > 0 and counts.get(400, 0) > 0, (path, counts)
    assert rel.proc.poll() is None and worker_pid(rel) == worker
    wait_engine_idle(rel)


# --- 5b. hostile single requests (issue #19): none may crash, stall or flood the worker ---


def _same_processes(rel: ServerProcess, worker: int, core: list[int]) -> None:
    assert rel.proc.poll() is None and worker_pid(rel) == worker and titled(rel, "VLLM::EngineCore") == core
    assert health(rel)[0] == 200


def test_processor_options_that_crash_the_model_are_refused_and_the_engine_lives(rel: ServerProcess) -> None:
    worker, core = worker_pid(rel), titled(rel, "VLLM::EngineCore")
    cases = [
        ({"temporal_patch_size": 0}, "mm_processor_kwargs.temporal_patch_size"),  # killed EngineCore (patch_embed)
        ({"patch_size": 1}, "mm_processor_kwargs.patch_size"),
        ({"merge_size": 0}, "mm_processor_kwargs.merge_size"),
        ({"min_pixels": 2**70}, "mm_processor_kwargs.min_pixels"),  # a 500 (OverflowError in the resize)
        ({"min_pixels": 400_000_000, "max_pixels": 500_000_000}, "mm_processor_kwargs.max_pixels"),  # 20020 px sides
        ({"max_pixels": 0}, "mm_processor_kwargs.max_pixels"),
        ({"do_resize": False}, "mm_processor_kwargs.do_resize"),
    ]
    figures = []
    for kwargs, param in cases:
        r, elapsed = timed_post(rel, chat_body(2, image=SMALL_PNG, mm_processor_kwargs=kwargs))
        error = assert_envelope(r, 400)
        assert error["param"] == param, (kwargs, error)
        # Refused up front by the budget check (the param says so), not after a 20020x20020 resize.
        figures.append(f"{param} {elapsed:.2f} s")
    report("processor options refused: " + ", ".join(figures))
    # A lower budget is the client's to choose: fewer image tokens.
    small = post(rel, chat_body(2, image=image_data_url((448, 448)), mm_processor_kwargs={"max_pixels": 112 * 112}))
    full = post(rel, chat_body(2, image=image_data_url((448, 448))))
    assert small.status_code == full.status_code == 200, (small.text[:300], full.text[:300])
    assert small.json()["usage"]["prompt_tokens"] < full.json()["usage"]["prompt_tokens"]
    _same_processes(rel, worker, core)
    wait_engine_idle(rel)


def test_values_that_reach_the_engine_cannot_kill_it(rel: ServerProcess) -> None:
    """Accepted-looking values for every path into the engine (schemas, grammars, sampling, stop
    strings, logit_bias, template options, completions): each is answered, none kills EngineCore."""
    worker, core = worker_pid(rel), titled(rel, "VLLM::EngineCore")
    schemas = [
        {"$ref": "#"},
        {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
        {"type": "string", "pattern": "("},
        {"type": "string", "minLength": 100_000_000},
        {"type": "array", "minItems": 100_000_000, "items": {"type": "integer"}},
        {"type": "string", "pattern": "(a|aa)*b" * 50},
        {"type": "integer", "minimum": 10, "maximum": 1},
        {"enum": []},
        {"type": "nonsense"},
        {"anyOf": [{"type": "string"}] * 2000},
        {"not": {}},
    ]
    chats = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}} for s in schemas]
    chats += [
        {"stop": ["x" * 100_000]},
        {"logit_bias": {"0": 100, "1": -100}},
        {"logit_bias": {"-1": 1}},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": [10**9]},
        {"min_tokens": 1000},
        {"n": 16, "logprobs": True, "top_logprobs": 20},
        {"presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 10},
        {"top_k": 0},
        {"top_p": 1e-300},
        {"temperature": 1e-300},
        {"seed": -1},
        {"chat_template_kwargs": {"enable_thinking": {"a": [1]}}},
        {"chat_template_kwargs": {"messages": 5}},
        {"chat_template_kwargs": {"tools": "x"}},
        {
            "messages": [{"role": "assistant", "content": "hi"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
    ]
    completions = [
        {"prompt": ""},
        {"prompt": "\x00" * 100},
        {"prompt": "a" * 20_000},
        {"prompt": "hi", "echo": True, "logprobs": 20},
        {"prompt": "hi", "max_tokens": 2047},
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}},
        # token-id prompts: the vocabulary's edges, past them, and a batch of long ones
        {"prompt": [0]},
        {"prompt": [575]},
        {"prompt": [576]},
        {"prompt": [-1]},
        {"prompt": [2**63 - 1]},
        {"prompt": [[0] * 2000, [575] * 2000]},
        {"prompt": [[]]},
    ]
    seen: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:
        for extra in chats:
            r = client.post(rel.url + CHAT, json={**chat_body(4), **extra})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400), (extra, r.status_code, r.text[:300])
        for extra in completions:
            r = client.post(rel.url + "/v1/completions", json={"model": "tiny", "max_tokens": 4, **extra})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400), (extra, r.status_code, r.text[:300])
    report(f"values into the engine: statuses {seen}")
    _same_processes(rel, worker, core)
    wait_engine_idle(rel)


def test_json_nested_too_deep_anywhere_is_a_400_naming_the_body(rel: ServerProcess) -> None:
    deep = "[" * 5000 + "]" * 5000
    head = json.dumps(chat_body(2))[:-1]
    for field in ("extra_unknown", "mm_processor_kwargs", "chat_template_kwargs"):
        r = post(rel, f'{head}, "{field}": {{"a": {deep}}}}}'.encode())
        error = assert_envelope(r, 400)  # was a 500: RecursionError in msgspec
        assert error["param"] == "body" and error["code"] == "too_deep", (field, error)
    schema = {"type": "json_schema", "json_schema": {"schema": {"a": json.loads("[" * 100 + "]" * 100)}}}
    error = assert_envelope(post(rel, chat_body(2, response_format=schema)), 400)
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "too_deep", error
    assert "unhandled" not in rel.log()


def _raw_exchange(rel: ServerProcess, data: bytes, half_close: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", rel.port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and not half_close:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def test_truncated_and_badly_chunked_bodies_are_400s_not_500s(rel: ServerProcess) -> None:
    log_before = len(rel.log())
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    cases = {
        "content-length longer than the body": (head + "Content-Length: 1000\r\n\r\n" + '{"messages": [').encode(),
        **{
            f"chunk size {size}": (
                head + "Transfer-Encoding: chunked\r\n\r\n" + f"{size}\r\nabcdef\r\n0\r\n\r\n"
            ).encode()
            for size in ("zz", "-5", "ffffffffffffffffffffffff", "3")
        },
    }
    statuses = {}
    for name, data in cases.items():
        answer = _raw_exchange(rel, data, half_close=True)
        status = _response_head(answer.partition(b"\r\n\r\n")[0])[0] if answer else None
        statuses[name] = status
        assert status in (400, None), (name, answer[:300])  # None: the connection closed, no answer
    report(f"broken bodies: {statuses}")
    new_log = rel.log()[log_before:]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-3000:]
    assert health(rel)[0] == 200


def _live_during(rel: ServerProcess, work) -> tuple[object, float, int]:
    """`work()`'s result, the slowest /live answer while it ran (polled on one connection) and how
    many /live requests were both sent and answered while it ran."""
    worst, answered, stop = [0.0], [0], threading.Event()
    window: list[float] = []

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert client.get(rel.url + "/live").status_code == 200
                t1 = time.perf_counter()
                worst[0] = max(worst[0], t1 - t0)
                if window and t0 >= window[0] and not stop.is_set():
                    answered[0] += 1
                time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    try:
        window.append(time.perf_counter())
        result = work()
    finally:
        stop.set()
        poller.join()
    return result, worst[0], answered[0]


def test_big_bodies_are_refused_without_stalling_the_event_loop(rel: ServerProcess) -> None:
    """The issue's 300,000 messages (10 MB) held /live for 7 s; a body at the 64 MiB limit is the
    worst case. The target is 100 ms; the bound is loose for this shared 2-core machine."""
    message = {"role": "user", "content": "hello there"}
    limit = 64 * 1024 * 1024
    bodies = {
        "300k messages": json.dumps({"model": "tiny", "messages": [message] * 300_000, "max_tokens": 2}).encode(),
        "64 MiB of messages": json.dumps({"model": "tiny", "messages": [message] * 1_500_000}).encode(),
        "64 MiB of parts": json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2_000_000}]}
        ).encode(),
        "64 MiB of text": json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 11_000_000}], "max_tokens": 2}
        ).encode(),
    }
    figures = []
    for name, body in bodies.items():
        assert len(body) < limit, (name, len(body))
        (r, elapsed), worst, answered = _live_during(rel, lambda body=body: timed_post(rel, body, timeout=300))
        error = assert_envelope(r, 400)
        figures.append(
            f"{name} ({len(body) / 2**20:.1f} MiB): 400 {error['code']} in {elapsed:.2f} s, "
            f"/live answered {answered} times meanwhile, worst {worst * 1000:.0f} ms"
        )
        # The loop served others while this body was handled. How long /live waited is reported, not
        # asserted: speed belongs in benchmarks/, and this machine is shared.
        assert answered >= 1, figures[-1]
    report("big bodies: " + "; ".join(figures))


def test_a_clients_own_template_is_refused_unless_trusted(rel: ServerProcess) -> None:
    loop = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x"
    (r, elapsed), worst, _ = _live_during(
        rel, lambda: timed_post(rel, chat_body(2, chat_template_kwargs={"chat_template": loop}))
    )
    error = assert_envelope(r, 400)  # it ran for ~3 s on the event loop
    assert (
        error["param"] == "chat_template_kwargs.chat_template" and "--trust-request-chat-template" in error["message"]
    )
    error = assert_envelope(post(rel, chat_body(2, chat_template_kwargs={"tokenize": True})), 400)
    assert error["param"] == "chat_template_kwargs.tokenize"
    report(f"client template: 400 in {elapsed:.2f} s, /live worst {worst * 1000:.0f} ms")


def test_error_messages_quote_client_input_cut_short(rel: ServerProcess) -> None:
    r = post(rel, chat_body(2, model="m" * 1_000_000))
    assert assert_envelope(r, 404)["code"] == "model_not_found" and len(r.content) < 1000, len(r.content)  # was 1 MB
    r = post(rel, chat_body(2, logit_bias={str(10**6 + i): 1.0 for i in range(100_000)}))
    error = assert_envelope(r, 400)
    assert len(r.content) < 3000 and "characters" in error["message"], len(r.content)  # was 1.37 MB


# --- 6. faults (destructive: the worker is respawned) ---


def _wait_ready_again(rel: ServerProcess, old_worker: int | None, within: float = 200) -> float:
    """Seconds until a worker (other than `old_worker`, if given) answers /health 200."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        assert rel.proc.poll() is None, "the launcher exited instead of respawning:\n" + rel.log()[-3000:]
        try:
            if health(rel, timeout=2)[0] == 200 and worker_pid(rel) != old_worker:
                rel.remember_tree()
                return time.monotonic() - t0
        except (httpx.HTTPError, ValueError):
            pass  # no worker accepting yet (the launcher's socket queues the connection)
        time.sleep(0.25)
    raise AssertionError(f"service did not return within {within} s:\n{rel.log()[-3000:]}")


def _long_stream(rel: ServerProcess, out: list, request_id: str) -> None:
    with httpx.stream(
        "POST", rel.url + CHAT, json=chat_body(1500, stream=True), timeout=60, headers={"x-request-id": request_id}
    ) as r:
        out.append((r.status_code, sse_events(r.iter_lines())))


def _refused_connections(port: int, stop: threading.Event, refused: list) -> None:
    """Connect to `port` every 50 ms until `stop`; record each connection refused (the port let go)."""
    while not stop.is_set():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            refused.append(time.monotonic())
        except OSError:
            pass  # a full listen queue on a busy machine is not a closed port
        time.sleep(0.05)


def test_sigkill_of_the_engine_core_is_recovered_in_place(rel: ServerProcess) -> None:
    """The engine dies (a vLLM bug, an OOM, a kill): the worker restarts it by itself, /health says
    dead, then loading, then ready; in-flight requests end with engine_dead; the port stays held."""
    worker = worker_pid(rel)
    (core,) = titled(rel, "VLLM::EngineCore")
    old_engine = [core, *procs.descendants(core)]
    assert any("VLLM::Worker" in cmdline(p) for p in old_engine), [cmdline(p) for p in old_engine]
    rel.remember_tree()  # its shared memory, for the leak check at the end

    # Requests in flight when the engine dies: two streams and one plain request.
    streams: list = []
    plain: list = []
    threads = [threading.Thread(target=_long_stream, args=(rel, streams, f"doomed-stream-{i}")) for i in range(2)]
    threads.append(
        threading.Thread(
            target=lambda: plain.append(
                httpx.post(rel.url + CHAT, json=chat_body(1500), timeout=60, headers={"x-request-id": "doomed-plain"})
            )
        )
    )
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while health(rel)[1].get("scheduler", {}).get("running", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)

    stop, refused = threading.Event(), []
    watcher = threading.Thread(target=_refused_connections, args=(rel.port, stop, refused))
    watcher.start()
    statuses: list[str] = []
    try:
        with httpx.Client(timeout=5) as client:
            assert client.get(rel.url + "/health").status_code == 200
            os.kill(core, signal.SIGKILL)
            t0 = time.monotonic()
            reasons: list[str] = []
            dead_after = math.inf
            while time.monotonic() - t0 < 5 and "dead" not in statuses:
                body = client.get(rel.url + "/health").json()
                if not statuses or statuses[-1] != body["status"]:
                    statuses.append(body["status"])
                if body["status"] == "dead":
                    dead_after = time.monotonic() - t0
                    reasons.append(body["reason"])
                time.sleep(0.02)
            assert "dead" in statuses, f"/health said {statuses} in the 5 s after EngineCore was killed"
            late = client.post(rel.url + CHAT, json=chat_body(4), timeout=60)
            assert assert_envelope(late, 503)["code"] in ("engine_dead", "loading")
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a request in flight hung after the engine died"
            while time.monotonic() - t0 < 300:
                r = client.get(rel.url + "/health")
                code, body = r.status_code, r.json()
                if statuses[-1] != body["status"]:
                    statuses.append(body["status"])
                if code == 200:
                    break
                assert body["status"] in ("dead", "loading"), body
                if body["status"] == "dead":
                    reasons.append(body["reason"])
                time.sleep(0.25)
            ready_after = time.monotonic() - t0
    finally:
        stop.set()
        watcher.join()
    assert statuses[-3:] == ["dead", "loading", "ready"], statuses
    assert all("died" in r for r in reasons) and any("restarting in" in r for r in reasons), reasons
    assert refused == [], f"the port was let go {len(refused)} time(s) during the restart"
    assert len(streams) == 2 and len(plain) == 1  # each got an answer (a failed client records none)
    for status, events in streams:
        assert status == 200 and stream_ending(events) == "engine_dead", events[-3:]
    assert assert_envelope(plain[0], 503)["code"] == "engine_dead"
    # Same worker, a new engine, nothing of the old one left; the log names the requests it hit.
    assert worker_pid(rel) == worker
    cores = titled(rel, "VLLM::EngineCore")
    assert len(cores) == 1 and cores != [core]
    gone = [p for p in old_engine if procs.alive(p)]
    assert gone == [], [(p, cmdline(p)) for p in gone]
    in_flight_line = next(line for line in rel.log().splitlines() if "engine requests in flight then" in line)
    assert all(rid in in_flight_line for rid in ("doomed-stream-0", "doomed-stream-1", "doomed-plain")), in_flight_line
    rel.remember_tree()
    report(
        f"EngineCore SIGKILL: /health {' -> '.join(statuses)}; dead after {dead_after:.2f} s, ready again "
        f"after {ready_after:.1f} s (same worker), port held throughout"
    )
    assert post(rel, chat_body(4)).status_code == 200


def test_sigkill_of_the_worker_is_respawned_and_leaves_no_orphan(rel: ServerProcess) -> None:
    _wait_ready_again(rel, None)  # a fault test before this one that failed may have left a worker loading
    old_worker = worker_pid(rel)
    old_tree = [old_worker, *procs.descendants(old_worker)]
    (core,) = titled(rel, "VLLM::EngineCore")
    assert gauge_pids(rel, "vllm:num_requests_running") == {str(old_worker)}
    old_shm = set().union(*(shm_files_of(p) for p in old_tree))
    assert old_shm, "the engine's shared memory was not seen: the leak check below would pass blindly"

    os.kill(old_worker, signal.SIGKILL)
    t0 = time.monotonic()
    # The orphaned EngineCore (re-parented to the launcher, a subreaper) is ended: the launcher's
    # reaper looks every second and gives each orphan 3 s for SIGTERM; a process that big takes
    # seconds more to exit on a busy machine.
    while any(procs.alive(p) for p in old_tree) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    orphans_gone = time.monotonic() - t0
    assert [p for p in old_tree if procs.alive(p)] == [], [cmdline(p) for p in old_tree if procs.alive(p)]
    # The dead worker's resource tracker (spared by the reaper) removed its engine's shared memory.
    assert sorted(f for f in old_shm if os.path.exists(f)) == []
    ready_in = _wait_ready_again(rel, old_worker)
    new_worker = worker_pid(rel)
    assert titled(rel, "VLLM::EngineCore") not in ([], [core])
    assert post(rel, chat_body(4)).status_code == 200
    # The killed worker's gauges are dropped: /metrics reports the live worker only.
    assert gauge_pids(rel, "vllm:num_requests_running") == {str(new_worker)}
    report(
        f"worker SIGKILL: its engine processes gone after {orphans_gone:.2f} s, "
        f"service back (new worker ready) after {ready_in:.1f} s"
    )


# --- 7. SIGTERM with streams in flight (stops the server: last) ---

DRAIN_STREAMS = LIMIT
SHORT_TOKENS = 400  # ~2.5 s at 16 at once here (150-200 tokens/s each); the long ones start before their first token
LONG_TOKENS = 1900  # far beyond what the drain timeout lets a stream produce
SHORT_LEFT_AT_SIGTERM = 1.0  # seconds of the short streams' measured pace left when SIGTERM goes


def test_sigterm_with_32_streams_in_flight_loses_none(rel: ServerProcess) -> None:
    _wait_ready_again(rel, None)  # a fault test before this one that failed may have left a worker loading
    # 16 short streams hold the engine's 16 running slots; 16 long ones queue behind them. SIGTERM goes
    # when the leading short stream is about a second from its end at the pace measured so far, so
    # short streams are certainly in flight and can finish within the drain; the long ones cannot.
    # Short streams ask for logprobs: one entry per token, so the client counts tokens exactly.
    short = DRAIN_STREAMS // 2
    results: dict[int, tuple[str, float]] = {}
    started = [threading.Event() for _ in range(DRAIN_STREAMS)]
    tokens = [0] * DRAIN_STREAMS
    first_token_at = [math.inf] * DRAIN_STREAMS
    first_tokens = [0] * DRAIN_STREAMS  # tokens in a stream's first chunk with any

    def stream(i: int) -> None:
        body = chat_body(SHORT_TOKENS, stream=True, logprobs=True) if i < short else chat_body(LONG_TOKENS, stream=True)
        with httpx.stream("POST", rel.url + CHAT, json=body, timeout=90) as r:
            assert r.status_code == 200
            # Admitted: the 200 came. A queued stream's first event comes with its first token, as vLLM's
            # does, so the long ones have none until a short one leaves a running slot.
            started[i].set()
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if i < short and line != "data: [DONE]":
                        for choice in json.loads(line[6:]).get("choices", []):
                            tokens[i] += len((choice.get("logprobs") or {}).get("content") or [])
                        if tokens[i] and first_token_at[i] == math.inf:
                            first_token_at[i], first_tokens[i] = time.monotonic(), tokens[i]
        results[i] = (stream_ending(events), time.monotonic())

    def short_left_seconds() -> float:
        """Seconds the leading short stream has left at the pace it has kept since its first token
        (measured over half a second at least: one chunk's tokens over a few ms say nothing)."""
        lead = max(range(short), key=lambda i: tokens[i])
        since = time.monotonic() - first_token_at[lead]
        if not since >= 0.5:
            return math.inf
        pace = (tokens[lead] - first_tokens[lead]) / since
        return (SHORT_TOKENS - tokens[lead]) / pace if pace > 0 else math.inf

    with concurrent.futures.ThreadPoolExecutor(DRAIN_STREAMS) as pool:
        futures = [pool.submit(stream, i) for i in range(short)]
        assert all(e.wait(30) for e in started[:short])
        futures += [pool.submit(stream, i) for i in range(short, DRAIN_STREAMS)]
        assert all(e.wait(30) for e in started)  # all 32 admitted
        deadline = time.monotonic() + 60
        while short_left_seconds() > SHORT_LEFT_AT_SIGTERM and time.monotonic() < deadline:
            time.sleep(0.01)
        streaming = DRAIN_STREAMS - len(results)
        left = [SHORT_TOKENS - tokens[i] for i in range(short)]
        rel.remember_tree()  # for the leftovers check: once the launcher is gone, its tree is unknowable
        t0 = time.monotonic()
        rel.proc.send_signal(signal.SIGTERM)
        for f in futures:
            f.result(timeout=90)  # re-raises a client-side failure
    code = rel.proc.wait(60)
    stopped_in = time.monotonic() - t0
    rel.stop()  # only closes the log: the launcher has exited

    endings = [results[i][0] for i in range(DRAIN_STREAMS)]
    during_drain = [i for i in range(short) if results[i][0] == "finished" and results[i][1] > t0]
    report(
        f"SIGTERM with {streaming} of {DRAIN_STREAMS} streams in flight (short ones {min(left)}-{max(left)} of "
        f"{SHORT_TOKENS} tokens from their end): {endings.count('finished')} finished ({len(during_drain)} during "
        f"the drain), {endings.count('drain_abort')} cut with an error event; launcher exited {code} after "
        f"{stopped_in:.1f} s"
    )
    assert set(endings) <= {"finished", "drain_abort"}, endings  # none cut silently
    assert streaming == DRAIN_STREAMS, f"{DRAIN_STREAMS - streaming} short streams ended before SIGTERM"
    assert during_drain, "no stream in flight at SIGTERM was let finish"
    assert endings[short:] == ["drain_abort"] * (DRAIN_STREAMS - short), endings
    assert code == 0, rel.log()[-3000:]
    assert rel.leftovers() == []
    wait_port_free(rel.port, within=5)


# --- long run: soak (`-m slow`; QWEN_SOAK_SECONDS, default 1800) ---

SOAK_SECONDS = float(os.environ.get("QWEN_SOAK_SECONDS", "1800"))
SOAK_CLIENTS = 6  # concurrent clients, below the admission bound: every refusal would be a defect


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process below it (shared pages counted per process)."""
    total = 0
    for pid in [root, *procs.descendants(root)]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SoakTraffic:
    """Mixed traffic from SOAK_CLIENTS threads: each request's kind is drawn from a seeded generator,
    and its answer is checked against what that kind must get."""

    KINDS = ("chat", "stream", "image224", "image1024", "completion", "disconnect", "bad_body", "bad_image")

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        # A fixed palette (so vLLM's multimodal cache stops growing after the warm-up); the server's
        # own decoded-image cache is off, so every image is decoded on every request.
        self.images = {
            "image224": [image_data_url((224, 224), color=(20 * i, 255 - 20 * i, 90)) for i in range(12)],
            "image1024": [image_data_url((1024, 768), color=(90, 20 * i, 255 - 20 * i)) for i in range(12)],
        }
        self.counts: dict[tuple[str, int], int] = {}
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def run(self, seconds: float, seed: int) -> None:
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(seed * 100 + i, stop_at)) for i in range(SOAK_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, seed: int, stop_at: float) -> None:
        import random

        rng = random.Random(seed)
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop_at:
                kind = rng.choices(self.KINDS, weights=(3, 3, 3, 2, 1, 2, 1, 1))[0]
                t0 = time.monotonic()
                try:
                    status = self._one(client, kind, rng)
                except Exception as exc:  # noqa: BLE001 - recorded and failed on at the end
                    status = -1
                    with self._lock:
                        self.failures.append(f"{kind}: {exc!r}")
                with self._lock:
                    self.counts[kind, status] = self.counts.get((kind, status), 0) + 1
                    self.latencies.append(time.monotonic() - t0)

    def _one(self, client: httpx.Client, kind: str, rng) -> int:
        url = self.srv.url
        if kind in ("chat", "image224", "image1024"):
            image = rng.choice(self.images[kind]) if kind != "chat" else None
            r = client.post(url + CHAT, json=chat_body(rng.randint(1, 24), image))
            self._expect(kind, r.status_code == 200 and r.json()["choices"][0]["finish_reason"], r)
        elif kind == "stream":
            with client.stream("POST", url + CHAT, json=chat_body(rng.randint(1, 48), stream=True)) as r:
                ending = stream_ending(sse_events(r.iter_lines()))
            self._expect(kind, r.status_code == 200 and ending == "finished", r, ending)
        elif kind == "completion":
            r = client.post(url + "/v1/completions", json={"prompt": "Once upon", "max_tokens": rng.randint(1, 16)})
            self._expect(kind, r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r)
        elif kind == "disconnect":
            return _start_and_hang_up(self.srv, rng.randint(0, 5), timeout=120)
        elif kind == "bad_body":
            r = client.post(url + CHAT, json={"messages": [], "max_tokens": 4})
            self._expect(kind, r.status_code == 400 and assert_envelope(r)["param"] == "messages", r)
        else:  # bad_image
            r = client.post(url + CHAT, json=chat_body(4, "data:image/png;base64,bm90IGFuIGltYWdl"))
            self._expect(kind, r.status_code == 400 and assert_envelope(r)["code"].startswith("image_"), r)
        return r.status_code

    def _expect(self, kind: str, ok, r: httpx.Response, detail: str = "") -> None:
        if not ok:
            with self._lock:
                self.failures.append(
                    f"{kind}: {r.status_code} {detail} {r.text[:200] if not r.is_stream_consumed or not detail else ''}"
                )

    def total(self) -> int:
        return sum(self.counts.values())


def _quiescent(srv: ServerProcess) -> dict[str, float]:
    """Figures with no traffic: engine idle, connections closed, RSS settled (median of 5 samples)."""
    wait_engine_idle(srv, within=30)
    time.sleep(2.0)
    samples = []
    for _ in range(5):
        samples.append(tree_rss(srv.proc.pid))
        time.sleep(0.5)
    return {
        "rss": sorted(samples)[2],
        "fds": open_fds(worker_pid(srv)),
        "in_engine": health(srv)[1]["requests_in_engine"],
    }


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 600)  # the run itself, plus start and stop
def test_soak_mixed_traffic_keeps_memory_fds_and_engine_flat(tiny_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess.launcher(
        free_port(),
        tmp_path / "soak.log",
        "--model",
        str(tiny_model),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--max-num-seqs",
        str(MAX_SEQS),
        "--max-pending-requests",
        str(LIMIT),
        "--image-cache-bytes",
        "0",
    )
    try:
        srv.wait_ready(timeout=400)
        traffic = SoakTraffic(srv)
        # Warm-up: caches, allocator pools and lazily created threads reach their working size.
        warmup = max(20.0, 0.2 * SOAK_SECONDS)
        traffic.run(warmup, seed=1)
        base = _quiescent(srv)

        samples: list[tuple[float, int]] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop_sampling.wait(5.0):
                samples.append((time.monotonic() - t0, tree_rss(srv.proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        warm_requests = traffic.total()
        t0 = time.monotonic()
        traffic.run(SOAK_SECONDS - warmup, seed=2)
        elapsed = time.monotonic() - t0
        stop_sampling.set()
        sampler.join()
        end = _quiescent(srv)
        assert srv.proc.poll() is None
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert srv.leftovers() == []

    mib = 2**20
    growth = end["rss"] / base["rss"] - 1
    counts = {f"{kind}:{status}": n for (kind, status), n in sorted(traffic.counts.items())}
    peak = max((rss for _, rss in samples), default=end["rss"])
    report(
        f"soak {SOAK_SECONDS:.0f} s (warm-up {warmup:.0f} s): {traffic.total()} requests "
        f"({(traffic.total() - warm_requests) / elapsed:.1f}/s after warm-up) {counts}; latency p50 "
        f"{percentile(traffic.latencies, 0.5) * 1000:.0f} ms, p99 {percentile(traffic.latencies, 0.99) * 1000:.0f} ms, "
        f"max {max(traffic.latencies):.1f} s; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
        f"tree RSS {base['rss'] / mib:.0f} -> {end['rss'] / mib:.0f} MiB ({growth * 100:+.2f}%), "
        f"peak {peak / mib:.0f} MiB under load; worker fds {base['fds']} -> {end['fds']}; "
        f"requests left in engine {end['in_engine']}"
    )
    assert traffic.failures == [], traffic.failures[:20]
    assert all(status in (200, 400) for (_, status) in traffic.counts), counts
    assert growth < 0.05
    # At rest the worker holds its listener, engine pipes and pools: any per-request leak over
    # thousands of requests would show; 2 of slack for a pooled socket opened lazily.
    assert end["fds"] <= base["fds"] + 2
    assert end["in_engine"] == 0
