"""From a decoded request to the engine and back, with no HTTP: validation, prompts, media, sampling,
and the OpenAI response bodies (whole or streamed)."""
