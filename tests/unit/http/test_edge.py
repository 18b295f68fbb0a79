"""The HTTP layer's logic (request log, route policy, admission) against FAKE ASGI apps (no engine, no server): deadlines, drain cuts,
admission, API keys and request IDs at the ASGI level. The same behaviours run against the real
engine behind Granian in test_ops.py; these pin the exact messages sent in each case. The scope
carries a fake matched route, as Litestar's router leaves it; test_edge_policy.py and test_routes.py run the real app."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from qwen_server.http.admission import Admission
from qwen_server.http.auth import ApiKeys
from qwen_server.http.policy import RoutePolicy
from qwen_server.http.request_log import RequestLog, record_of
from qwen_server.settings import Settings

PATH = "/v1/chat/completions"
INFERENCE = {"inference": True}


class Edge:
    """The HTTP layer's pieces around the routes, assembled as app.py does."""

    def __init__(self, settings: Settings) -> None:
        self.log = RequestLog(settings)
        self.admission = Admission(settings)
        self.policy = RoutePolicy(ApiKeys(settings), self.admission)


def fake_app(delay_before: float, chunks: int = 0, delay_between: float = 0.0):
    """A fake endpoint: waits, then answers 200 with `chunks` SSE chunks spaced `delay_between`."""

    async def app(scope, receive, send):
        await asyncio.sleep(delay_before)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(chunks):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(delay_between)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def call(edge: Edge, app, path: str = PATH, headers: list | None = None, opt: dict | None = None) -> list[dict]:
    """One request through the edge to `app`, as the route at `path` declaring `opt` (default: inference)."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    def route(app):  # what Litestar's router does before the route's middleware runs
        async def routed(scope, receive, send):
            scope["route_handler"] = SimpleNamespace(opt=INFERENCE if opt is None else opt)
            scope["path_template"] = path
            await app(scope, receive, send)

        return routed

    scope = {"type": "http", "path": path, "method": "POST", "headers": headers or [], "app": None}
    await edge.log.wrap(route(edge.policy.middleware(app)))(scope, receive, send)
    return sent


def status_and_body(sent: list[dict]) -> tuple[int, bytes]:
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_deadline_before_the_response_is_a_504_envelope() -> None:
    edge = Edge(Settings(request_timeout=0.2, max_pending_requests=4))
    status, body = status_and_body(asyncio.run(call(edge, fake_app(5))))
    assert status == 504
    assert json.loads(body)["error"]["code"] == "timeout"
    assert edge.admission.admitted == 0


def test_deadline_mid_stream_ends_with_an_error_event_and_done() -> None:
    edge = Edge(Settings(request_timeout=0.3, max_pending_requests=4))
    status, body = status_and_body(asyncio.run(call(edge, fake_app(0, chunks=100, delay_between=0.05))))
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[0] == "data: 0" and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "timeout"


def test_drain_waits_for_short_requests_and_cuts_long_ones() -> None:
    async def scenario():
        edge = Edge(Settings(max_pending_requests=4))
        short = asyncio.ensure_future(call(edge, fake_app(0.2)))
        long = asyncio.ensure_future(call(edge, fake_app(0, chunks=1000, delay_between=0.01)))
        await asyncio.sleep(0.05)
        cut = await edge.admission.drain(0.5)
        refused = await call(edge, fake_app(0))
        return cut, await short, await long, refused

    cut, short, long, refused = asyncio.run(scenario())
    assert cut == 1
    assert status_and_body(short) == (200, b"data: [DONE]\n\n")
    status, body = status_and_body(long)
    assert status == 200 and json.loads(body.decode().split("\n\n")[-3][6:])["error"]["code"] == "drain_abort"
    assert status_and_body(refused)[0] == 503


def test_admission_refuses_beyond_the_limit_without_calling_the_app() -> None:
    calls = 0

    def counting(app):
        async def wrapped(scope, receive, send):
            nonlocal calls
            calls += 1
            await app(scope, receive, send)

        return wrapped

    async def scenario():
        edge = Edge(Settings(max_pending_requests=2, overload_retry_after_seconds=7))
        return await asyncio.gather(*(call(edge, counting(fake_app(0.2))) for _ in range(5)))

    results = asyncio.run(scenario())
    statuses = sorted(status_and_body(sent)[0] for sent in results)
    assert statuses == [200, 200, 429, 429, 429]
    assert all((b"retry-after", b"7") in sent[0]["headers"] for sent in results if sent[0]["status"] == 429)
    assert calls == 2


def test_keys_and_request_ids() -> None:
    edge = Edge(Settings(api_key=["k1", "k2"]))
    ok = asyncio.run(call(edge, fake_app(0), headers=[(b"authorization", b"Bearer k2"), (b"x-request-id", b"abc")]))
    assert ok[0]["status"] == 200 and (b"x-request-id", b"abc") in ok[0]["headers"]
    for header in (b"Bearer k3", b"Bearer ", b"k1", b"bearer k1 extra"):
        assert asyncio.run(call(edge, fake_app(0), headers=[(b"authorization", header)]))[0]["status"] == 401
    assert asyncio.run(call(edge, fake_app(0), path="/live", opt={"auth": False}))[0]["status"] == 200  # open
    assert asyncio.run(call(edge, fake_app(0), path="/new", opt={}))[0]["status"] == 401  # declares nothing


def test_the_request_record_is_on_the_scope_for_the_routes() -> None:
    seen = []

    async def app(scope, receive, send):
        seen.append(record_of(scope))
        await fake_app(0)(scope, receive, send)

    asyncio.run(call(Edge(Settings()), app, headers=[(b"x-request-id", b"r-1")]))
    assert seen[0].request_id == "r-1"
