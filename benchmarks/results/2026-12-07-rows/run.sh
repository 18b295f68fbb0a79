#!/usr/bin/env bash
# #24: the rows session 21's matrix had below vLLM's server (every c1 row; c16 224 px openai
# streaming and httpx non-streaming), again, with more requests per c1 run (N1, default 120; the
# matrix ran 32). Each server is started ROUNDS times (default 2), alternating which goes first
# (vLLM, qwen, then qwen, vLLM), with side_by_side's warm-up after each start. One line per run.
#   bash benchmarks/results/2026-12-07-rows/run.sh > benchmarks/results/2026-12-07-rows/results.txt
cd "$(dirname "$0")/../../.."
source benchmarks/servers.sh
N1=${N1:-120}
N16=${N16:-300}
ROWS=${ROWS:-"1:openai:yes 1:httpx:no 16:openai:yes 16:httpx:no"}
run() {  # server concurrency client stream round
  local extra=--stream n=$N16; [ "$4" = no ] && extra=--no-stream; [ "$2" = 1 ] && n=$N1
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency $2 --requests $n \
    --client $3 $extra --seed $((4 + $5)) --server-pid $ROOT --json /tmp/rows.json >/dev/null 2>&1
  python3 -c "
import json;d=json.load(open('/tmp/rows.json'));p=lambda k,q:(d[k][q] or 0)*1e3
print('r$5 %-4s c%-2s %-6s stream=%-3s %6.2f req/s  fe %5.1f ms/req  ttft p50/p99 %6.1f/%6.1f ms  e2e p50/p99 %6.1f/%6.1f ms  errors %d' % ('$1','$2','$3','$4', d['requests_per_s'], d['server_cpu_s_by_role']['front_end']*1e3/d['requests'], p('ttft_s','p50'), p('ttft_s','p99'), p('e2e_s','p50'), p('e2e_s','p99'), d['errors']))" || echo "r$5 $1 c$2 $3 $4: failed"
}
for r in $(seq ${ROUNDS:-2}); do
  if [ $((r % 2)) = 1 ]; then ORDER="vllm qwen"; else ORDER="qwen vllm"; fi
  for S in $ORDER; do
    start_server $S
    for row in $ROWS; do IFS=: read c client stream <<<"$row"; run $S $c $client $stream $r; done
    stop_server
  done
done
