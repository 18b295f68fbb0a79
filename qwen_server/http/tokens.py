"""vLLM's tokenizer routes, at vLLM's paths. Inference policy: a chat's images are fetched and
decoded to count their tokens, so these are admitted and bounded like the other inference routes."""

from __future__ import annotations

from qwen_server import protocol as p
from qwen_server.http.asgi import AnyRequest, AnyResponse
from qwen_server.http.common import inference_post, json_response, tokens_of
from qwen_server.http.inference import read_body
from qwen_server.http.request_log import record_of


@inference_post(
    "/tokenize",
    "Tokens of a prompt or of a chat (images counted as the engine sees them), as vLLM's",
    p.TokenizeRequest,
)
async def tokenize(request: AnyRequest) -> AnyResponse:
    service = tokens_of(request)
    req = service.decode_tokenize(await read_body(request))
    return json_response(await service.tokenize(req, record_of(request.scope)))


@inference_post("/detokenize", "Token ids back to text, as vLLM's", p.DetokenizeRequest)
async def detokenize(request: AnyRequest) -> AnyResponse:
    service = tokens_of(request)
    return json_response(await service.detokenize(service.decode_detokenize(await read_body(request))))
