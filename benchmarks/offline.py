"""The offline engine ceiling: vLLM's `LLM.generate` on pre-decoded images, no server at all.

    .venv/bin/python -m benchmarks.offline --model PATH --shapes '[[224, 1, 16]]' --out offline.json

Each shape is [image size, images per request, output tokens]; prints JSON keyed "size/images/tokens"
with requests/s and output tokens/s, to --out. Images are decoded before the clock starts.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.inputs import TextPrompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shapes", required=True, help="JSON list of [size, images, tokens]")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--out", required=True, help="write the JSON result here (vLLM logs to stdout)")
    args = ap.parse_args()

    import base64

    from PIL import Image
    from vllm import LLM, SamplingParams

    from benchmarks import loadgen

    llm = LLM(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 4},
    )
    tokenizer = llm.get_tokenizer()
    results = {}
    for size, images, tokens in json.loads(args.shapes):
        urls = loadgen.make_images(args.requests * images, size)
        decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]
        content = [{"type": "image"}] * images + [{"type": "text", "text": "Describe the picture in detail."}]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)  # tokenize=False: the prompt text, not token ids
        prompts: list[TextPrompt] = [
            {"prompt": text, "multi_modal_data": {"image": decoded[i * images : (i + 1) * images]}}
            for i in range(args.requests)
        ]
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[f"{size}/{images}/{tokens}"] = {
            "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": generated / elapsed,
        }
        print(f"offline {size}px x{images} {tokens} tok: {len(prompts) / elapsed:.1f} req/s", file=sys.stderr)
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
