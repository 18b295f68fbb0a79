"""Media in: from a request's URLs to pixels sized for the model, safely and fast.

`sources`: the bytes behind `data:`, `file:` and (through `fetch`: SSRF guard, byte and time limits)
`http(s)://` URLs, with a content digest; modality-agnostic. `image`: the format whitelist, the
model's pixel budget (`Geometry`) and decoding. `loader`: one worker's cache and de-duplication of
decodes. No HTTP server code here: errors are `MediaError`s naming the request field.
"""
