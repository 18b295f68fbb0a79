"""A vLLM general plugin (entry point `vllm.general_plugins`, run by vLLM in each of its processes,
its spawned engine and workers included): what those processes need that vLLM does not do.

AMX on Linux: a process must ask the kernel for the AMX tile state (arch_prctl
ARCH_REQ_XCOMP_PERM) before its first AMX instruction, and the permission does not survive exec,
so vLLM's spawned workers start without it. vLLM 0.32's CPU attention kernel uses AMX for bf16
and never asks: it runs only because oneDNN's bf16 GEMMs, which ask, usually run first. With
--enable-lora the projections are not oneDNN's, attention comes first and the worker dies of
SIGILL on its first request (measured: vLLM's own server, the tiny Qwen2.5-VL checkpoint, this
machine's AVX-512/AMX CPU). Asking once when the process starts costs one system call.
"""

from __future__ import annotations


def register() -> None:
    try:
        import torch
    except ImportError:  # not an engine process
        return
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        cpu._init_amx()
