#!/usr/bin/env bash
# #24: the rows session 21's matrix had below vLLM's server (every c1 row; c16 224 px openai
# streaming and httpx non-streaming), again, with more requests per c1 run (N1, default 120; the
# matrix ran 32). Each server is started ROUNDS times (default 2), alternating which goes first
# (vLLM, qwen, then qwen, vLLM), with a 320-request c16 warm-up after each start; the same engine
# flags as side_by_side. Prints one line per run.
#   bash benchmarks/results/2026-12-07-rows/run.sh > benchmarks/results/2026-12-07-rows/results.txt
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
N1=${N1:-120}
N16=${N16:-300}
ROWS=${ROWS:-"1:openai:yes 1:httpx:no 16:openai:yes 16:httpx:no"}
run() {  # server port root concurrency client stream round
  local extra=--stream n=$N16; [ "$6" = no ] && extra=--no-stream; [ "$4" = 1 ] && n=$N1
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$2 --model tiny --concurrency $4 --requests $n \
    --client $5 $extra --seed $((4 + $7)) --server-pid $3 --json /tmp/rows.json >/dev/null 2>&1
  python3 -c "
import json;d=json.load(open('/tmp/rows.json'));p=lambda k,q:(d[k][q] or 0)*1e3
print('r$7 %-4s c%-2s %-6s stream=%-3s %6.2f req/s  fe %5.1f ms/req  ttft p50/p99 %6.1f/%6.1f ms  e2e p50/p99 %6.1f/%6.1f ms  errors %d' % ('$1','$4','$5','$6', d['requests_per_s'], d['server_cpu_s_by_role']['front_end']*1e3/d['requests'], p('ttft_s','p50'), p('ttft_s','p99'), p('e2e_s','p50'), p('e2e_s','p99'), d['errors']))" || echo "r$7 $1 c$4 $5 $6: failed"
}
start() {  # server -> PORT, ROOT
  if [ $1 = vllm ]; then
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/rows-vllm.log 2>&1 &
    PORT=18002
  else
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS > /tmp/rows-qwen.log 2>&1 &
    PORT=18001
  fi
  ROOT=$!
  for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 --requests 320 --seed 1 >/dev/null 2>&1
}
for r in $(seq ${ROUNDS:-2}); do
  if [ $((r % 2)) = 1 ]; then ORDER="vllm qwen"; else ORDER="qwen vllm"; fi
  for S in $ORDER; do
    start $S
    for row in $ROWS; do IFS=: read c client stream <<<"$row"; run $S $PORT $ROOT $c $client $stream $r; done
    kill -TERM $ROOT; for i in $(seq 60); do kill -0 $ROOT 2>/dev/null || break; sleep 1; done; sleep 2
  done
done
