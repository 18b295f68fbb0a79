#!/usr/bin/env bash
# #24, c1: both servers up at once, requests alternating between them (benchmarks/interleaved.py),
# for the scenarios that split a c1 request's time: text only with one token (HTTP + engine round
# trip), a 224 px image with one token (+ the image path and prefill), and 16 tokens streamed and not
# (+ the decode steps).
#   bash benchmarks/results/2026-12-07-interleaved/run.sh > benchmarks/results/2026-12-07-interleaved/results.txt
cd "$(dirname "$0")/../../.."
source benchmarks/servers.sh
start_server vllm
V=$ROOT
start_server qwen $QWEN_FLAGS
Q=$ROOT
IL=".venv/bin/python -m benchmarks.interleaved --url-a http://127.0.0.1:18002 --name-a vllm --url-b http://127.0.0.1:18001 --name-b qwen --requests ${PAIRS:-60}"
$IL --no-image --max-tokens 1
$IL --max-tokens 1
$IL --max-tokens 16 --stream
$IL --max-tokens 16 --no-stream
ROOT=$V stop_server
ROOT=$Q stop_server
