"""Each tiny checkpoint loads in vLLM's real AsyncLLM and generates for an image + text prompt.
The builder's own output: tests/unit/demo/test_tiny_model.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from qwen_server.demo import tiny_model as builder

# 224x224 pixels: patch 14 (Qwen2/2.5-VL) or 16 (Qwen3-VL), merged 2x2 into one token.
EXPECTED_IMAGE_TOKENS = {"qwen2_5_vl": (224 // 28) ** 2, "qwen2_vl": (224 // 28) ** 2, "qwen3_vl": (224 // 32) ** 2}


def tiny_model_build(factory: pytest.TempPathFactory, arch: str) -> Path:
    return builder.build(factory.mktemp(arch), arch)


async def _generate(path: Path) -> tuple[list[int], int, str, int]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(model=str(path), max_model_len=1024, enforce_eager=True, max_num_seqs=4)
    )
    try:
        tok = engine.get_tokenizer()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.new("RGB", (224, 224), (40, 120, 200))
        params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0, output_kind=RequestOutputKind.DELTA)
        generated, last = 0, None
        async for out in engine.generate({"prompt": prompt, "multi_modal_data": {"image": [image]}}, params, "t"):
            generated += len(out.outputs[0].token_ids)
            last = out
        prompt_ids = last.prompt_token_ids or []
        return prompt_ids, tok.convert_tokens_to_ids("<|image_pad|>"), last.outputs[0].finish_reason, generated
    finally:
        engine.shutdown()


# With the slow tests (`-m slow`): each boots an engine of its own. In the default run, Qwen3-VL's
# checkpoint is served by test_agents.py's reasoning server and Qwen2.5-VL's by every other server.
@pytest.mark.slow
@pytest.mark.parametrize("arch", builder.ARCHES)
def test_checkpoint_generates_in_vllm(arch: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tiny_model if arch == "qwen2_5_vl" else tiny_model_build(tmp_path_factory, arch)
    prompt_ids, image_pad, finish, generated = asyncio.run(_generate(path))
    # vLLM expanded the single <|image_pad|> placeholder to the image's token count.
    assert prompt_ids.count(image_pad) == EXPECTED_IMAGE_TOKENS[arch]
    assert generated == 8
    assert finish == "length"
