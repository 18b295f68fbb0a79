"""Route policy declared on each route (`opt`), as the edge applies it in the real app.

Each test builds the app with create_app on a FakeEngine and speaks to it through Litestar's test
client; dummy routes are registered the way a new endpoint would be, declaring nothing.
"""

from __future__ import annotations

import asyncio

from litestar import Request, get, post
from litestar.params import FromPath

from qwen_server.settings import Settings
from tests.unit.conftest import counted

KEY = "unit-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def run(scenario):
    return asyncio.run(scenario())


def undeclared_route():
    """A new route whose author declared no policy (e.g. a /tokenize endpoint)."""

    @get("/tokenize", sync_to_thread=False)
    def tokenize() -> dict:
        return {"tokens": [1, 2, 3]}

    return tokenize


def assert_envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS, body
    return body["error"]


# --- a route that declares nothing ---


def test_a_route_that_declares_nothing_needs_the_key(serve) -> None:
    async def scenario():
        async with serve(Settings(api_key=[KEY]), undeclared_route()) as s:
            missing = await s.client.get("/tokenize")
            wrong = await s.client.get("/tokenize", headers={"Authorization": "Bearer not-the-key"})
            right = await s.client.get("/tokenize", headers=AUTH)
            return missing, wrong, right

    missing, wrong, right = run(scenario)
    for refused in (missing, wrong):
        assert assert_envelope(refused, 401)["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and right.json() == {"tokens": [1, 2, 3]}


def test_without_keys_configured_a_route_that_declares_nothing_is_open(serve) -> None:
    async def scenario():
        async with serve(Settings(), undeclared_route()) as s:
            return await s.client.get("/tokenize")

    assert run(scenario).status_code == 200


def test_a_route_that_declares_nothing_is_not_admitted_like_inference(serve) -> None:
    # While draining, inference routes answer 503; a route that declares nothing still serves.
    async def scenario():
        async with serve(Settings(), undeclared_route()) as s:
            s.drain_signal()
            await asyncio.sleep(0)  # the drain task starts
            return await s.client.get("/tokenize"), await s.client.post("/v1/completions", content=b"{}")

    plain, inference = run(scenario)
    assert plain.status_code == 200
    assert assert_envelope(inference, 503)["code"] == "draining"


# --- inference routes: admission before the body is read ---


def test_inference_is_refused_while_draining_before_its_body_is_decoded(serve) -> None:
    # The body is not JSON: had the handler read it, the answer would be a 400.
    async def scenario():
        async with serve(Settings()) as s:
            before = await s.client.post("/v1/chat/completions", content=b"not json")
            s.drain_signal()
            await asyncio.sleep(0)
            after = await s.client.post("/v1/chat/completions", content=b"not json")
            return before, after

    before, after = run(scenario)
    assert assert_envelope(before, 400)["type"] == "invalid_request_error"
    error = assert_envelope(after, 503)
    assert error["code"] == "draining" and after.headers["retry-after"]


def test_a_new_route_declaring_inference_gets_admission(serve) -> None:
    # (The limit itself, which needs requests in flight at once, is tested at the ASGI level in
    # tests/unit/http/test_edge.py: this test client runs one request at a time.)
    bodies_read = 0

    @post("/v1/embeddings", status_code=200, opt={"inference": True})
    async def embeddings(request: Request) -> dict:
        nonlocal bodies_read
        await request.body()
        bodies_read += 1
        return {"ok": True}

    async def scenario():
        async with serve(Settings(), embeddings) as s:
            served = await s.client.post("/v1/embeddings", content=b"x")
            s.drain_signal()
            await asyncio.sleep(0)
            return served, await s.client.post("/v1/embeddings", content=b"x")

    served, refused = run(scenario)
    assert served.status_code == 200
    assert assert_envelope(refused, 503)["code"] == "draining"
    assert bodies_read == 1  # the refused request's body was never read


# --- probes ---


def _probe_statuses(serve, settings: Settings, headers: dict[str, str] | None = None) -> dict[str, int]:
    async def scenario():
        async with serve(settings) as s:
            return {
                path: (await s.client.get(path, headers=headers or {})).status_code
                for path in ("/live", "/health", "/metrics")
            }

    return run(scenario)


def test_probes_are_open_by_default_even_with_keys(serve) -> None:
    assert _probe_statuses(serve, Settings(api_key=[KEY])) == {"/live": 200, "/health": 200, "/metrics": 200}


def test_protect_probes_closes_health_and_metrics_but_not_live(serve) -> None:
    settings = Settings(api_key=[KEY], protect_probes=True)
    assert _probe_statuses(serve, settings) == {"/live": 200, "/health": 401, "/metrics": 401}
    assert _probe_statuses(serve, settings, AUTH) == {"/live": 200, "/health": 200, "/metrics": 200}


def test_existing_routes_keep_their_policy(serve) -> None:
    # /v1/* needs the key; /version and the documentation stayed open when policy moved to the routes.
    async def scenario():
        async with serve(Settings(api_key=[KEY])) as s:
            return {
                path: (await s.client.get(path)).status_code
                for path in ("/v1/models", "/version", "/docs", "/docs/openapi.json")
            }

    assert run(scenario) == {"/v1/models": 401, "/version": 200, "/docs": 200, "/docs/openapi.json": 200}


# --- requests no route matched ---


def test_404_and_405_carry_the_request_id_and_the_envelope(serve) -> None:
    async def scenario():
        async with serve(Settings()) as s:
            return (
                await s.client.get("/no/such/path", headers={"X-Request-Id": "r-404"}),
                await s.client.get("/v1/chat/completions", headers={"X-Request-Id": "r-405"}),
                await s.client.post("/live"),
            )

    not_found, not_allowed, generated = run(scenario)
    assert_envelope(not_found, 404)
    assert not_found.headers["x-request-id"] == "r-404"
    assert_envelope(not_allowed, 405)
    assert not_allowed.headers["x-request-id"] == "r-405"
    assert set(not_allowed.headers["allow"].split(", ")) == {"OPTIONS", "POST"}
    assert_envelope(generated, 405)
    assert len(generated.headers["x-request-id"]) == 32


def test_unmatched_requests_are_counted_and_logged(serve, access_lines) -> None:
    before = counted("GET", "unmatched", 404), counted("POST", "unmatched", 405)

    async def scenario():
        async with serve(Settings()) as s:
            await s.client.get("/no/such/path")
            await s.client.post("/live")

    run(scenario)
    assert (counted("GET", "unmatched", 404), counted("POST", "unmatched", 405)) == (before[0] + 1, before[1] + 1)
    assert access_lines.levels("GET /no/such/path 404") == ["INFO"]
    assert access_lines.levels("POST /live 405") == ["INFO"]


def test_with_keys_an_unmatched_request_without_the_key_gets_401(serve) -> None:
    # 401, not 404: a client without a key cannot tell which paths exist.
    async def scenario():
        async with serve(Settings(api_key=[KEY])) as s:
            c = s.client
            return (
                (await c.get("/v1/nope")).status_code,
                (await c.get("/nope")).status_code,
                (await c.get("/v1/chat/completions")).status_code,
                (await c.get("/v1/nope", headers=AUTH)).status_code,
                (await c.get("/v1/chat/completions", headers=AUTH)).status_code,
            )

    assert run(scenario) == (401, 401, 401, 404, 405)


# --- metrics and access log ---


def test_the_metrics_label_is_the_routes_path_template(serve) -> None:
    @get("/items/{item_id:int}", sync_to_thread=False)
    def item(item_id: FromPath[int]) -> dict:
        return {"id": item_id}

    before = counted("GET", "/items/{item_id}", 200)

    async def scenario():
        async with serve(Settings(), item) as s:
            for item_id in (7, 8, 9):
                assert (await s.client.get(f"/items/{item_id}")).json() == {"id": item_id}

    run(scenario)
    assert counted("GET", "/items/{item_id}", 200) == before + 3
    assert counted("GET", "/items/7", 200) == 0  # never the concrete path: one series per route


def test_quiet_routes_log_at_debug_and_others_at_info(serve, access_lines) -> None:
    async def scenario():
        async with serve(Settings(log_level="debug"), undeclared_route()) as s:
            for path in ("/live", "/health", "/metrics", "/version", "/tokenize"):
                assert (await s.client.get(path)).status_code == 200, path

    run(scenario)
    expected = {"/live": "DEBUG", "/health": "DEBUG", "/metrics": "DEBUG", "/version": "INFO", "/tokenize": "INFO"}
    assert {path: access_lines.levels(f"GET {path} 200") for path in expected} == {
        path: [level] for path, level in expected.items()
    }
