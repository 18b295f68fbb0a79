"""Streams N requests one at a time from app.py; prints the server process's CPU and the wall time
per request. Usage: client.py PORT SERVER_PID N LABEL"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


async def main(port: int, pid: int, n: int, label: str) -> None:
    async with httpx.AsyncClient() as client:

        async def one() -> None:
            async with client.stream("GET", f"http://127.0.0.1:{port}/") as r:
                async for _ in r.aiter_bytes():
                    pass

        for _ in range(10):
            await one()
        c0, t0 = cpu(pid), time.perf_counter()
        for _ in range(n):
            await one()
        print(
            f"{label}: {(cpu(pid) - c0) / n * 1e3:.2f} ms CPU/request, {(time.perf_counter() - t0) / n * 1e3:.1f} ms wall/request"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
