#!/usr/bin/env bash
# #24, the c1 gap: is it EngineCore's nice? One server of each kind, started once; EngineCore's
# threads are reniced between runs (the model worker, pinned to its core, is left alone, as the
# server does), so every row of a server comes from the same start. c1, 224 px, 16 tokens, after a
# c16 warm-up of 320 requests. Rounds alternate the nice order.
#   bash benchmarks/results/2026-12-07-c1-nice/run.sh > benchmarks/results/2026-12-07-c1-nice/results.txt
cd "$(dirname "$0")/../../.."
source benchmarks/servers.sh
N=${N:-120}
engine_core() { pgrep -f "VLLM::EngineCore" | head -1; }
renice_all() { for t in /proc/$1/task/*; do renice -n $2 -p $(basename $t) >/dev/null; done; }
run() {  # server client stream nice
  local extra=--stream; [ "$3" = no ] && extra=--no-stream
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 1 --requests $N \
    --client $2 $extra --seed 5 --server-pid $ROOT --json /tmp/c1n.json >/dev/null 2>&1
  python3 -c "
import json;d=json.load(open('/tmp/c1n.json'))
print('%-5s %-7s %-6s stream=%-3s nice=%-2s %6.2f req/s  fe %5.1f ms/req  ttft p50 %5.1f  itl p50 %5.2f ms  e2e p50 %6.1f ms' % ('$1','$2','', '$3', '$4', d['requests_per_s'], d['server_cpu_s_by_role']['front_end']*1e3/d['requests'], (d['ttft_s']['p50'] or 0)*1e3, (d['itl_s']['p50'] or 0)*1e3, d['e2e_s']['p50']*1e3))" 2>/dev/null || echo "$1 $2 $3 nice=$4: failed"
}
for S in ${SERVERS:-qwen vllm}; do
  start_server $S
  EC=$(engine_core)
  echo "# $S: EngineCore $EC at nice $(ps -o ni= -p $EC | tr -d ' ') after start"
  for r in 1 2; do
    if [ $r = 1 ]; then ORDER="0 10"; else ORDER="10 0"; fi
    for nice in $ORDER; do
      renice_all $EC $nice
      for c in ${CLIENTS:-openai:yes httpx:no}; do run $S ${c%:*} ${c#*:} $nice; done
    done
  done
  stop_server
done
