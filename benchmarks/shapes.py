"""Response shapes of qwen_server and vLLM's own OpenAI server on the same requests (issue #25).

Starts vLLM's server, sends each request, stops it; then the same for qwen_server (same checkpoint,
same engine flags as side_by_side.py). For every request it prints both statuses and where the JSON
shapes differ (field names and JSON types; values are not compared: the weights are random). For
streams, the shape of every chunk is compared and the choices per chunk counted.

    .venv/bin/python -m benchmarks.shapes          # about 4 minutes here; loopback ports only
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx

from benchmarks.loadgen import make_images
from benchmarks.side_by_side import MODEL_NAME, Server, engine_flags
from qwen_server.testing.servers import free_port

HERE = Path(__file__).resolve().parent

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
IGNORE = {"ignore_eos": True}
TOOL_ASK = {
    "messages": [{"role": "user", "content": "Click."}],
    "tools": [{"type": "function", "function": {"name": "click", "parameters": {"type": "object"}}}],
    "max_tokens": 40,
    "temperature": 1.0,
    "seed": 1,
}
# The same names on both servers.
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--enable-prompt-tokens-details"]
HI = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(150))}]
REQUESTS: list[tuple[str, str, str, dict | None]] = [
    (
        "n=3 streaming chat",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 3, "stream": True, **IGNORE},
    ),
    (
        "n=2 streaming completion",
        "POST",
        CMPL,
        {"prompt": "The cat", "max_tokens": 4, "n": 2, "stream": True, **IGNORE},
    ),
    (
        "echo + logprobs",
        "POST",
        CMPL,
        {"prompt": "Hello, my name is", "max_tokens": 3, "echo": True, "logprobs": 1, **IGNORE},
    ),
    ("logprobs 0", "POST", CMPL, {"prompt": "Hi", "max_tokens": 3, "logprobs": 0, **IGNORE}),
    ("token-id prompt", "POST", CMPL, {"prompt": [40, 41, 42], "max_tokens": 3, **IGNORE}),
    ("batched text prompts", "POST", CMPL, {"prompt": ["The cat", "A dog"], "max_tokens": 3, **IGNORE}),
    ("batched token-id prompts", "POST", CMPL, {"prompt": [[40, 41], [42, 43, 44]], "max_tokens": 2, **IGNORE}),
    ("out-of-vocabulary id", "POST", CMPL, {"prompt": [40, 10**6], "max_tokens": 2}),
    ("model card", "GET", "/v1/models/" + MODEL_NAME, None),
    ("unknown model card", "GET", "/v1/models/nope", None),
    (
        "stream_options without stream",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream_options": {"include_usage": True}},
    ),
    (
        "use_beam_search",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "use_beam_search": True, "n": 2},
    ),
    ("form body", "FORM", CHAT, {"messages": "x"}),
    ("named tool call", "POST", CHAT, {**TOOL_ASK, "tool_choice": {"type": "function", "function": {"name": "click"}}}),
    ("required tool call, streamed", "POST", CHAT, {**TOOL_ASK, "tool_choice": "required", "stream": True}),
    ("tools, auto", "POST", CHAT, {**TOOL_ASK, "max_tokens": 4}),
    (
        "tool result in the history",
        "POST",
        CHAT,
        {
            **TOOL_ASK,
            "tool_choice": "none",
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": "Click."},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "click", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
        },
    ),
    (
        "structured choice",
        "POST",
        CHAT,
        {"messages": HI, "max_tokens": 4, "structured_outputs": {"choice": ["a", "b"]}},
    ),
    ("structured regex", "POST", CMPL, {"prompt": "x", "max_tokens": 8, "structured_outputs": {"regex": "[0-9]{3}"}}),
    ("invalid regex", "POST", CHAT, {"messages": HI, "max_tokens": 4, "structured_outputs": {"regex": "(a"}}),
    (
        "invalid regex, streamed",
        "POST",
        CHAT,
        {"messages": HI, "max_tokens": 4, "stream": True, "structured_outputs": {"regex": "(a"}},
    ),
    ("prompt_tokens_details (first)", "POST", CHAT, {"messages": LONG, "max_tokens": 1}),
    ("prompt_tokens_details (repeat)", "POST", CHAT, {"messages": LONG, "max_tokens": 1}),
    (
        "prompt_tokens_details, image",
        "POST",
        CHAT,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "{image}"}}, {"type": "text", "text": "?"}],
                }
            ],
            "max_tokens": 1,
        },
    ),
    (
        "continuous usage stream",
        "POST",
        CHAT,
        {
            "messages": HI,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **IGNORE,
        },
    ),
    ("cache_salt", "POST", CHAT, {"messages": LONG, "max_tokens": 1, "cache_salt": "tenant-b"}),
    ("bad cache_salt", "POST", CHAT, {"messages": HI, "max_tokens": 1, "cache_salt": "a/b"}),
    ("priority without the policy", "POST", CHAT, {"messages": HI, "max_tokens": 1, "priority": -1}),
    ("model list with an adapter", "GET", "/v1/models", None),
    ("completion on the adapter", "POST", CMPL, {"model": "adapter", "prompt": "Hi", "max_tokens": 3, **IGNORE}),
    ("chat on the adapter", "POST", CHAT, {"model": "adapter", "messages": HI, "max_tokens": 3, **IGNORE}),
    ("unknown adapter", "POST", CHAT, {"model": "nope", "messages": HI, "max_tokens": 3}),
]


def shape(value):
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def diff(a, b, path: str = "$") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only vLLM" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: only qwen" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        return diff(a[0], b[0], path + "[0]") if a and b else []
    if a != b and "NoneType" not in (a, b):  # null against a value is a value's absence, not a shape
        return [f"{path}: vLLM {a}, qwen {b}"]
    return []


def answer(url: str, method: str, path: str, body: dict | None) -> dict:
    body = {"model": MODEL_NAME, **body} if body is not None and method != "FORM" else body  # a body's own model wins
    if body is not None and "{image}" in json.dumps(body):
        body = json.loads(json.dumps(body).replace("{image}", make_images(1, 224)[0]))
    with httpx.Client(timeout=120) as client:
        if method == "GET":
            r = client.get(url + path)
        elif method == "FORM":
            r = client.post(url + path, data={"messages": "x"})
        elif body is None:
            raise ValueError(f"{method} {path}: a body is needed")
        elif body.get("stream"):
            with client.stream("POST", url + path, json=body) as s:
                if s.status_code != 200:  # refused before the stream began: a JSON error
                    return {"status": s.status_code, "body": json.loads(s.read())}
                chunks = [
                    json.loads(line[6:])
                    for line in s.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"
                ]
            return {"status": s.status_code, "chunks": chunks}
        else:
            r = client.post(url + path, json=body)
    try:
        return {"status": r.status_code, "body": r.json()}
    except ValueError:
        return {"status": r.status_code, "body": r.text[:200]}


def collect(name: str, argv: list[str], log_dir: Path) -> dict[str, dict]:
    port = free_port()
    server = Server(name, [a.replace("{port}", str(port)) for a in argv], port, log_dir / f"{name}.log")
    try:
        server.wait_ready()
        return {label: answer(server.url, method, path, body) for label, method, path, body in REQUESTS}
    finally:
        server.stop()


def main() -> None:
    from qwen_server.demo.model import demo_model_path
    from qwen_server.demo.tiny_lora import write_adapter

    model = str(demo_model_path())
    log_dir = Path(tempfile.mkdtemp(prefix="shapes-"))
    adapter = write_adapter(log_dir / "adapter", Path(model), seed=1)
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"adapter={adapter}"]
    flags = [*engine_flags(), *TOOL_FLAGS, *lora]
    vllm = collect(
        "vllm",
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            *flags,
        ],
        log_dir,
    )
    qwen = collect(
        "qwen",
        [sys.executable, str(HERE.parent / "launcher.py"), "--model", model, "--port", "{port}", *flags],
        log_dir,
    )
    for label, *_ in REQUESTS:
        a, b = vllm[label], qwen[label]
        line = f"{label}: status vLLM {a['status']}, qwen {b['status']}"
        if "chunks" in a and "chunks" in b and a["chunks"] and b["chunks"]:
            per = lambda chunks: sorted({len(c.get("choices", [])) for c in chunks})  # noqa: E731
            line += f"; choices per chunk vLLM {per(a['chunks'])}, qwen {per(b['chunks'])}"
            differences = sorted(
                {
                    d
                    for ca in a["chunks"][:1]
                    for cb in b["chunks"]
                    for d in diff(shape(ca), shape(cb))
                    if "choices[0]" not in d
                }
            )
            differences += sorted(set(diff(shape(a["chunks"][-1]), shape(b["chunks"][-1]))))
        elif "chunks" in a or "chunks" in b:  # one streamed, the other refused: the first chunk against the body
            first = lambda x: x["chunks"][0] if x.get("chunks") else x.get("body")  # noqa: E731
            line += f"; vLLM {'streamed' if 'chunks' in a else 'refused'}, qwen {'streamed' if 'chunks' in b else 'refused'}"
            differences = [f"vLLM's first: {json.dumps(first(a))[:300]}", f"qwen's: {json.dumps(first(b))[:300]}"]
        else:
            differences = diff(shape(a.get("body")), shape(b.get("body")))
        print(line)
        for d in differences:
            print("    " + d)
    print(f"(server logs in {log_dir})")


if __name__ == "__main__":
    main()
