#!/usr/bin/env bash
# py-spy on our worker (qwen) or vLLM's API server during a c16 (C=...) 224 px streaming run with the openai
# SDK, after a 320-request warm-up; raw stacks to /tmp/prof-$S.txt (NOSPY=1: none), loadgen's figures
# and the front end's CPU per thread (threadcpu.py) to stdout.
#   S=qwen bash benchmarks/results/2026-12-07-profile/prof.sh
cd "$(dirname "$0")/../../.."
source benchmarks/servers.sh
S=${S:-qwen}
if [ $S = qwen ]; then
  start_server qwen $QWEN_FLAGS
  FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1)
else
  start_server vllm
  FE=$ROOT
fi
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
stop_server
