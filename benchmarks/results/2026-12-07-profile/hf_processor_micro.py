"""The model's HF processor as vLLM's renderer calls it (the prompt's text and one image together),
against its image processor alone (what session 21's processor_micro.py timed), on one torch thread,
CPU ms per call; `--profile` adds cProfile's top entries for the whole call.

    .venv/bin/python benchmarks/results/2026-12-07-profile/hf_processor_micro.py [--profile]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import numpy as np
import torch
from transformers import AutoProcessor

from qwen_server.demo.model import demo_model_path

PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the picture in detail.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def main() -> None:
    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(str(demo_model_path()))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(8)]
    n = 200
    for _ in range(2):
        t = time.process_time()
        for i in range(n):
            processor.image_processor(images=[images[i % 8]], return_tensors="pt")
        alone = (time.process_time() - t) / n
        t = time.process_time()
        for i in range(n):
            processor(text=[PROMPT], images=[images[i % 8]], return_tensors="pt")
        whole = (time.process_time() - t) / n
        print(f"224 px: image processor alone {alone * 1e3:.2f} ms, text + image {whole * 1e3:.2f} ms of CPU per call")
    if "--profile" in sys.argv:
        profile = cProfile.Profile()
        profile.enable()
        for i in range(n):
            processor(text=[PROMPT], images=[images[i % 8]], return_tensors="pt")
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
