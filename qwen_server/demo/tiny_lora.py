"""Random LoRA adapters for the tiny checkpoints (tests, benchmarks/shapes.py), written as PEFT saves
them (adapter_config.json + adapter_model.safetensors, q_proj and v_proj of every language-model
layer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_adapter(out: Path, base: Path, *, rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config", config)
    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(text["num_hidden_layers"]):
        for name, width in (("q_proj", heads * head_dim), ("v_proj", kv * head_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[prefix + ".lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * scale
            tensors[prefix + ".lora_B.weight"] = torch.randn(width, rank, generator=generator) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(peft))
    return out
