"""SIGTERM-to-exit time of a server: `python stoptime.py qwen|vllm REPEATS` (from the project root).

Starts the server, waits for /v1/models, sends SIGTERM, times Popen.wait() (the process's real exit,
not a zombie waiting to be reaped)."""

import os
import signal
import subprocess
import sys
import time

import httpx

M = "/root/.cache/qwen-server/demo-qwen2_5_vl-v2"
COMMANDS = {
    "qwen": [".venv/bin/python", "launcher.py", "--model", M, "--port", "18001", "--max-model-len", "2048"],
    "vllm": [
        *(".venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", M),
        *("--port", "18001", "--host", "127.0.0.1", "--max-model-len", "2048"),
    ],
}


def main() -> None:
    cmd = [*COMMANDS[sys.argv[1]], "--enforce-eager"]
    for _ in range(int(sys.argv[2])):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if httpx.get("http://127.0.0.1:18001/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        print(sys.argv[1], f"SIGTERM to exit {time.monotonic() - t:.2f} s, exit {p.returncode}", flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main()
