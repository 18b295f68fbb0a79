#!/usr/bin/env bash
# #24, c1: both servers up at once (side_by_side's engine flags), requests alternating between them
# (benchmarks/interleaved.py), for the scenarios that split a c1 request's time: text only with one
# token (HTTP + engine round trip), a 224 px image with one token (+ the image path and prefill), and
# 16 tokens streamed and not (+ the decode steps).
#   bash benchmarks/results/2026-12-07-interleaved/run.sh > benchmarks/results/2026-12-07-interleaved/results.txt
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/il-vllm.log 2>&1 &
V=$!
VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS $QWEN_FLAGS > /tmp/il-qwen.log 2>&1 &
Q=$!
for port in 18002 18001; do for i in $(seq 150); do curl -sf 127.0.0.1:$port/v1/models >/dev/null && break; sleep 2; done; done
for port in 18002 18001; do  # the same warm-up as side_by_side, one server at a time
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$port --model tiny --concurrency 16 --requests 320 --seed 1 >/dev/null 2>&1
done
IL=".venv/bin/python -m benchmarks.interleaved --url-a http://127.0.0.1:18002 --name-a vllm --url-b http://127.0.0.1:18001 --name-b qwen --requests ${PAIRS:-60}"
$IL --no-image --max-tokens 1
$IL --max-tokens 1
$IL --max-tokens 16 --stream
$IL --max-tokens 16 --no-stream
kill -TERM $V $Q; for i in $(seq 60); do kill -0 $V 2>/dev/null || kill -0 $Q 2>/dev/null || break; sleep 1; done; sleep 2
