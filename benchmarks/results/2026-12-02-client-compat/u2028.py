"""Does a streamed frame with U+2028, U+2029 or U+0085 in its JSON reach a client whole?

`python u2028.py URL`: a completion stream with `echo`, so the prompt's characters are in a frame,
read with httpx's line reader (splits like str.splitlines) and with the openai SDK."""

import json
import sys

import httpx
import openai

url = sys.argv[1]
prompt = "a\u2028b\u2029c\x85d"
body = {"model": "tiny", "prompt": prompt, "echo": True, "max_tokens": 2, "temperature": 0}
bad, frames = [], 0
with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
    for line in r.iter_lines():
        if not line.strip() or line == "data: [DONE]":
            continue
        if line.startswith("data: "):
            try:
                json.loads(line[6:])
                frames += 1
                continue
            except ValueError:
                pass
        bad.append(line[:50])
print(f"{url} httpx iter_lines: {frames} whole frames, {len(bad)} broken lines {bad}")
client = openai.OpenAI(base_url=url + "/v1", api_key="none")
try:
    stream = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=2, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    print(f"{url} openai SDK: text {text!r}")
except Exception as exc:  # noqa: BLE001 - the point is what the client does
    print(f"{url} openai SDK: {type(exc).__name__}: {exc}")
