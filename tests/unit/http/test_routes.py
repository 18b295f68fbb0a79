"""Routes on a FakeEngine (no vLLM): model cards, refused content types, early answers' bodies."""

from __future__ import annotations

import pytest

from qwen_server.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_one_model_card_or_404_model_not_found(serve) -> None:
    settings = Settings(served_model_name=["tiny", "org/tiny-alias"])
    async with serve(settings) as served:
        card = (await served.client.get("/v1/models/tiny")).json()
        assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 2048
        assert (await served.client.get("/v1/models/org/tiny-alias")).json()["id"] == "org/tiny-alias"
        listed = (await served.client.get("/v1/models")).json()["data"]
        assert [c["id"] for c in listed] == ["tiny", "org/tiny-alias"]
        r = await served.client.get("/v1/models/" + "x" * 5000)
        error = r.json()["error"]
        assert r.status_code == 404 and error["code"] == "model_not_found" and len(error["message"]) < 400


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_a_form_post_is_415_not_parsed_as_json(serve, content_type: str) -> None:
    async with serve(Settings()) as served:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = await served.client.post(path, content=b'{"prompt": "hi"}', headers={"content-type": content_type})
            assert r.status_code == 415, r.text
            assert r.json()["error"]["param"] == "Content-Type"
