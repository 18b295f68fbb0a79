"""Build a tiny random-weight Qwen-VL checkpoint that vLLM really loads.

No weights can be downloaded on the machines this project is tested on, so tests, the demo server
and the benchmarks build their own model: a real architecture (vision tower, merger, M-RoPE text
decoder) at toy size, a byte-level BPE tokenizer carrying Qwen's special tokens, the Qwen chat
template and the Qwen image processor configuration. Everything is seeded: the same call gives
the same files, so greedy outputs are stable across runs.

    python -m qwen_server.demo.tiny_model OUT_DIR [--arch qwen2_5_vl|qwen2_vl|qwen3_vl]

Head counts divide by 2 (text KV heads and vision heads) so tensor parallelism of 2 can be tested.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ARCHES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
SEED = 1234

# Qwen's special tokens, in Qwen's order; their ids follow the trained vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB_SIZE = 600  # trained tokens; the model's vocabulary is padded to a multiple of 64
IMAGE_MIN_PIXELS = 28 * 28 * 4
IMAGE_MAX_PIXELS = 28 * 28 * 64  # a 224x224 image becomes 64 image tokens (patch 14, merge 2)

# Qwen's tool and reasoning markers: added tokens that are not special (the detokenizer keeps them
# in the text, where vLLM's hermes and qwen3 parsers look for them), as in Qwen's own tokenizers.
MARKER_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")

# Shared by both templates: a message's content (text, or parts with images and videos, which
# become the vision placeholders vLLM expands to the image's token count), the tools' system block,
# and the history's calls and tool results, as Qwen2.5's and Qwen3-VL's templates write them.
# Jinja source in Qwen's own style: every piece of text is an expression, so the layout is not output.
_TEMPLATE_PARTS = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'video' or 'video' in part -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages[0]['role'] == 'system' -%}
        {{- render_content(messages[0]['content']) -}}
    {%- else -%}
        {{- 'You are a helpful assistant.' -}}
    {%- endif -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' -}}
        {{- tool | tojson -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0]['role'] != 'system' -%}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first or not tools -%}
            {{- '<|im_start|>system\n' + render_content(message['content']) + '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message['role'] == 'user' -%}
        {{- '<|im_start|>user\n' + render_content(message['content']) + '<|im_end|>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if reasoning_in_history and message.get('reasoning_content') -%}
            {{- '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' -}}
        {%- endif -%}
        {{- render_content(message['content']) -}}
        {%- for call in message.get('tool_calls') or [] -%}
            {%- if call['function'] is defined -%}
                {%- set call = call['function'] -%}
            {%- endif -%}
            {%- if not loop.first or message['content'] -%}
                {{- '\n' -}}
            {%- endif -%}
            {{- '<tool_call>\n{"name": "' + call['name'] + '", "arguments": ' -}}
            {%- if call['arguments'] is string -%}
                {{- call['arguments'] -}}
            {%- else -%}
                {{- call['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + render_content(message['content']) + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
"""

# Qwen2-VL / Qwen2.5-VL: the VL template with Qwen2.5's tool calling merged in (Qwen2.5-VL's own
# template has images but no tools, its text model's tools but no images: QwenLM/Qwen3-VL#1093).
CHAT_TEMPLATE = (
    "{%- set reasoning_in_history = false -%}"
    + _TEMPLATE_PARTS
    + r"""
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

# Qwen3-VL, shaped like Qwen3-VL-Thinking's: the answer opens a <think> block for the reasoning
# parser; `enable_thinking: false` closes it empty at once (as Qwen3's hybrid templates do).
THINKING_CHAT_TEMPLATE = (
    "{%- set reasoning_in_history = true -%}"
    + _TEMPLATE_PARTS
    + r"""
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- else -%}
        {{- '<think>\n' -}}
    {%- endif -%}
{%- endif -%}
"""
)


def chat_template(arch: str) -> str:
    return THINKING_CHAT_TEMPLATE if arch == "qwen3_vl" else CHAT_TEMPLATE


# Training text for the toy BPE: enough English to give realistic-looking merges.
_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in one sentence.",
    "What is in the picture? A cat sits on a red chair next to a window.",
    "The quick brown fox jumps over the lazy dog.",
    "Count the objects in the image and tell me their colours.",
    "Hello, how are you today? I am fine, thank you.",
    "Please answer briefly: what colour is the sky on a clear day?",
    "A photograph of a mountain lake at sunrise, with mist over the water.",
    "Read the text in the image and translate it into French.",
    "system user assistant image video text content message role",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] ( ) : ; , . ! ? \" ' - _ / \\",
]


def _text_dims(arch: str) -> dict[str, Any]:
    dims: dict[str, Any] = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    if arch == "qwen3_vl":
        dims["head_dim"] = 64
        # mrope sections sum to head_dim / 2; Qwen3-VL interleaves them.
        dims["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [8, 12, 12],
            "mrope_interleaved": True,
        }
    else:
        dims["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [8, 12, 12],
        }
    return dims


def _vision_dims(arch: str) -> dict[str, Any]:
    if arch == "qwen2_5_vl":
        return {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        }
    if arch == "qwen2_vl":
        return {
            "depth": 2,
            "embed_dim": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "hidden_size": 128,  # Qwen2-VL names the merger's output width hidden_size
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    return {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
    }


def _build_tokenizer(out: Path, arch: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(marker, special=False, normalized=False) for marker in MARKER_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template(arch)
    fast.save_pretrained(out)
    return fast


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _config(arch: str, vocab_size: int, ids: dict[str, int]):
    import transformers

    text = {**_text_dims(arch), "vocab_size": vocab_size}
    # The text config keeps Qwen's own token ids unless told otherwise: set them there too.
    text.update({k: ids[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")})
    config_cls = {
        "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
        "qwen2_vl": transformers.Qwen2VLConfig,
        "qwen3_vl": transformers.Qwen3VLConfig,
    }[arch]
    config = config_cls(
        text_config=text,
        vision_config=_vision_dims(arch),
        tie_word_embeddings=True,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, key, ids[key])
    return config


def _save_processor(out: Path, arch: str, tokenizer) -> None:
    from transformers import AutoProcessor, Qwen2VLImageProcessor

    patch = 16 if arch == "qwen3_vl" else 14
    factor = patch * 2
    image_processor = Qwen2VLImageProcessor(
        size={
            "shortest_edge": IMAGE_MIN_PIXELS * factor**2 // 28**2,
            "longest_edge": IMAGE_MAX_PIXELS * factor**2 // 28**2,
        },
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )
    image_processor.save_pretrained(out)
    # Let transformers write the processor files its own loader expects (video processor included).
    processor = AutoProcessor.from_pretrained(out)
    processor.chat_template = chat_template(arch)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(out_dir: str | os.PathLike[str], arch: str = "qwen2_5_vl") -> Path:
    """Write the checkpoint for `arch` into `out_dir` (created if needed) and return its path."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = _build_tokenizer(out, arch)
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = _config(arch, vocab_size, _special_ids(tokenizer))
    model_cls = {
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    }[arch]
    # transformers wraps `to` in functools.wraps(torch.nn.Module.to), which types `self` as its first argument.
    model = model_cls(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out)
    generation = {"max_new_tokens": 32, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation))
    _save_processor(out, arch, tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHES, default="qwen2_5_vl")
    args = parser.parse_args(argv)
    path = build(args.out_dir, args.arch)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
