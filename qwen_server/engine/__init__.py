"""The engine: vLLM's AsyncLLM in this worker, its lifecycle (load, watch, restart in place, drain) and
the one module (`vllm_compat`) that imports vLLM."""
