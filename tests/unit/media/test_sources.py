"""Local image files (qwen_server/media/sources.py): only from the allowed directory, when enabled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError
from tests.helpers.media import load


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20), (0, 255, 0)).save(root / "sub" / "green.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", root / "link-out.png")
    os.symlink(root / "sub" / "green.png", root / "link-in.png")
    return root


def test_local_files_load_from_the_allowed_directory(media_root: Path) -> None:
    root = str(media_root)
    for url in (f"{root}/sub/green.png", f"file://{root}/sub/green.png", f"{root}/link-in.png"):
        assert load(url, allowed_local_media_path=root).getpixel((1, 1)) == (0, 255, 0), url


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("{root}/../secret.png", "forbidden_path"),
        ("file://{root}/sub/../../secret.png", "forbidden_path"),
        ("{root}/link-out.png", "forbidden_path"),
        ("/etc/passwd", "forbidden_path"),
        ("{root}/sub", "not_found"),
        ("{root}/missing.png", "not_found"),
        ("file://otherhost{root}/sub/green.png", "unsupported_url"),
    ],
)
def test_local_paths_outside_the_directory_are_refused(media_root: Path, path: str, reason: str) -> None:
    with pytest.raises(MediaError) as info:
        load(path.format(root=media_root), allowed_local_media_path=str(media_root))
    assert info.value.reason == reason and info.value.kind is Kind.INVALID


def test_local_files_are_refused_unless_enabled(media_root: Path) -> None:
    with pytest.raises(MediaError, match="not enabled"):
        load(f"{media_root}/sub/green.png")
