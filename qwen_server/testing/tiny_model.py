"""Alias kept for `python -m qwen_server.testing.tiny_model OUT_DIR`: the builder lives in
`qwen_server.demo.tiny_model`."""

import sys

from qwen_server.demo.tiny_model import ARCHES, build, main

__all__ = ["ARCHES", "build", "main"]

if __name__ == "__main__":
    sys.exit(main())
