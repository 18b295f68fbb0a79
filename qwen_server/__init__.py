"""OpenAI-compatible server for vision-language models on Litestar, Granian and vLLM."""

__version__ = "0.1.0"
