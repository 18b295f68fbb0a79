"""The model's HF image processor (the one vLLM builds: transformers' default, torchvision backend) on
a one-thread executor as vLLM's renderer runs it, at 1 torch thread and at torch's default, per
image: CPU seconds of the whole process (torch's OpenMP workers included) and wall time.

    .venv/bin/python benchmarks/results/2026-12-03-processor-threads/processor_micro.py
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import AutoProcessor

from qwen_server.demo.model import demo_model_path


def _set_threads(count: int) -> None:
    torch.get_num_threads()  # the thread's first-use setup first (it would undo the count otherwise)
    torch.set_num_threads(count)


def main() -> None:
    processor = AutoProcessor.from_pretrained(str(demo_model_path())).image_processor
    print(type(processor).__name__, "torch default threads:", torch.get_num_threads(), file=sys.stderr)
    rng = np.random.default_rng(0)
    default = torch.get_num_threads()
    for threads in (1, 0, 1, 0):  # twice each, alternating
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Set either way: torch hands a new thread the count last set anywhere in the process.
            count = threads or default
            pool.submit(_set_threads, count).result()
            assert pool.submit(torch.get_num_threads).result() == count
            for side in (224, 1024):
                images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(8)]
                n = 400 if side == 224 else 40
                pool.submit(processor, images=[images[0]], return_tensors="pt").result()  # warm
                cpu, wall = time.process_time(), time.perf_counter()
                for i in range(n):
                    pool.submit(processor, images=[images[i % 8]], return_tensors="pt").result()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                label = f"{threads} thread" if threads else f"default ({default})"
                print(
                    f"{side:5d} px  {label:12s}  CPU {cpu / n * 1e3:6.3f} ms/image  wall {wall / n * 1e3:6.3f} ms/image"
                )


if __name__ == "__main__":
    main()
