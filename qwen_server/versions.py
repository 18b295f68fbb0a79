"""Version fences for the dependencies whose private APIs the adapters use (granian_compat, vllm_compat)."""

from __future__ import annotations

Release = tuple[int, ...]


def release(version: str) -> Release:
    """'0.32.0+cpu' -> (0, 32, 0); parts that are not plain numbers end it ('0.32.0rc1' -> (0, 32))."""
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def within(version: str | None, verified: tuple[Release, Release]) -> bool:
    """Whether `version` lies in [low, high) of the releases an adapter was verified on."""
    return version is not None and verified[0] <= release(version) < verified[1]


def outside_message(name: str, version: str | None, verified: tuple[Release, Release], what: str) -> str:
    low, high = (".".join(map(str, r)) for r in verified)
    return f"{name} {version} is outside the releases {what} was verified on ({low} to <{high})."
