"""The launcher process: options, the port, and Granian's supervision (`python launcher.py`).

It answers about the port before anything heavy loads, so nothing here imports Litestar, torch or
vLLM; the serving side (the app Granian's workers import) lives in the rest of `qwen_server`.
"""
