"""Fixtures of the integration tests: one real server for the session (launcher -> Granian ->
Litestar -> vLLM on the tiny model) and the media it may load, from a directory and over HTTP."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from qwen_server.testing.servers import free_port
from tests.helpers.serverproc import ServerProcess

SERVER_OPTIONS = (
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--max-num-seqs",
    "16",
    "--limit-mm-per-prompt",
    '{"image": 4}',
    "--served-model-name",
    "tiny",
    "--served-model-name",
    "tiny-alias",
    # Qwen-VL's tool calling, as an agent deployment runs it (requests without tools are unaffected).
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
    # usage.prompt_tokens_details (cached and media tokens) in every answer, as a metered deployment runs it.
    "--enable-prompt-tokens-details",
)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's allowed local media directory, also served over HTTP by `image_host`."""
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (224, 224), (200, 30, 30)).save(root / "red.jpg")
    Image.new("RGB", (896, 672), (30, 200, 30)).save(root / "big.png")
    (root / "huge.bin").write_bytes(b"\0" * (21 * 1024 * 1024))  # over the 20 MiB image limit
    (tmp_path_factory.getbasetemp() / "outside.jpg").write_bytes((root / "red.jpg").read_bytes())
    return root


@pytest.fixture(scope="session")
def image_host(media_dir: Path) -> Iterator[str]:
    """A loopback HTTP server for `media_dir`: the remote image host of the API tests."""
    handler = functools.partial(_QuietFiles, directory=str(media_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def server(tiny_model: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server (launcher -> Granian -> Litestar -> vLLM on the tiny model) for the session."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    media = ("--allowed-media-networks", "127.0.0.1/32", "--allowed-local-media-path", str(media_dir))
    # --keep-off-engine-cores (opt-in) so that test_engine sees it work against the real engine.
    srv = ServerProcess.launcher(
        free_port(), log, "--model", str(tiny_model), *SERVER_OPTIONS, "--keep-off-engine-cores", *media
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()[-3000:]
        assert srv.leftovers() == []
        assert srv.shm, "the engine's shared memory was not seen: the leak check below would pass blindly"
        assert srv.leaked_shm() == []
