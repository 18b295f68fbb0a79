#!/usr/bin/env bash
# py-spy on our worker (qwen) or vLLM's API server during a c16 (C=...) 224 px streaming run with the openai
# SDK, after a 320-request warm-up; raw stacks to /tmp/prof-$S.txt (NOSPY=1: none), loadgen's figures
# and the front end's CPU per thread (threadcpu.py) to stdout.
#   S=qwen bash benchmarks/results/2026-12-07-profile/prof.sh
cd "$(dirname "$0")/../../.."
S=${S:-qwen}
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
if [ $S = vllm ]; then
  VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/prof-vllm.log 2>&1 &
  PORT=18002
else
  VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS $QWEN_FLAGS > /tmp/prof-qwen.log 2>&1 &
  PORT=18001
fi
ROOT=$!
for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
if [ $S = vllm ]; then FE=$ROOT; else FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1); fi
.venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 --requests 320 --seed 1 >/dev/null 2>&1
if [ -z "$NOSPY" ]; then
  .venv/bin/py-spy record -p $FE -d ${SECS:-30} -r 200 -f raw -o /tmp/prof-$S.txt --nonblocking $SPY_FLAGS >/dev/null 2>&1 &
  SPY=$!
fi
python3 benchmarks/results/2026-12-07-profile/threadcpu.py snap $FE /tmp/threads-$S.json
.venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency ${C:-16} --requests ${N:-600} \
  --client openai --stream --seed 5 --server-pid $ROOT --json /tmp/prof-$S.json >/dev/null 2>&1
[ -n "$SPY" ] && wait $SPY
echo "# $S front end's threads (NOSPY=$NOSPY)"
python3 benchmarks/results/2026-12-07-profile/threadcpu.py diff /tmp/threads-$S.json $FE ${N:-600}
python3 -c "
import json;d=json.load(open('/tmp/prof-$S.json'))
print('$S', round(d['requests_per_s'],2),'req/s fe %.2f ms/req'%(d['server_cpu_s_by_role']['front_end']*1e3/d['requests']))"
kill -TERM $ROOT; for i in $(seq 60); do kill -0 $ROOT 2>/dev/null || break; sleep 1; done; sleep 2
