"""Images for the tests, made in memory."""

from __future__ import annotations

import base64
import io

from PIL import Image


def image_data_url(size: tuple[int, int] = (224, 224), color=(200, 30, 30), fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    mime = {"JPEG": "image/jpeg", "PNG": "image/png"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
