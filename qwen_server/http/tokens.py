"""vLLM's tokenizer routes, at vLLM's paths. Inference policy: a chat's images are fetched and
decoded to count their tokens, so these are admitted and bounded like the other inference routes."""

from __future__ import annotations

from litestar import post

from qwen_server import protocol as p
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.common import json_response, tokens_of
from qwen_server.http.inference import read_body
from qwen_server.http.openapi import with_json_body
from qwen_server.http.request_log import record_of


@post(
    "/tokenize",
    status_code=200,
    summary="Tokens of a prompt or of a chat (images counted as the engine sees them), as vLLM's",
    operation_class=with_json_body(p.TokenizeRequest),
    opt={"inference": True},
)
async def tokenize(request: AnyRequest) -> AnyResponse:
    service = tokens_of(request)
    req = service.decode_tokenize(await read_body(request))
    return json_response(await service.tokenize(req, record_of(request.scope)))


@post(
    "/detokenize",
    status_code=200,
    summary="Token ids back to text, as vLLM's",
    operation_class=with_json_body(p.DetokenizeRequest),
    opt={"inference": True},
)
async def detokenize(request: AnyRequest) -> AnyResponse:
    service = tokens_of(request)
    return json_response(await service.detokenize(service.decode_detokenize(await read_body(request))))
