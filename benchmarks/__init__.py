"""Benchmarks: stand-alone scripts, not tests. Run them as modules from the project root
(`.venv/bin/python -m benchmarks.side_by_side --help`); they import `qwen_server` and each other
as packages, and nothing from `tests/`."""
