# py-spy (raw, 200 Hz, 25 s, --nonblocking; add --native for native frames) on each front end at c1
# (224 px, streaming, openai SDK, 200 requests), after a 320-request c16 warm-up per start.
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
for S in qwen vllm; do
  if [ $S = vllm ]; then
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/pc-vllm.log 2>&1 &
    PORT=18002
  else
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS > /tmp/pc-qwen.log 2>&1 &
    PORT=18001
  fi
  ROOT=$!
  for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
  if [ $S = vllm ]; then FE=$ROOT; else FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1); fi
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 --requests 320 --seed 1 >/dev/null 2>&1
  .venv/bin/py-spy record -p $FE -d 25 -r 200 -f raw -o /tmp/c1-$S.txt --nonblocking >/dev/null 2>&1 &
  SPY=$!
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 1 --requests 200 --client openai --seed 5 --server-pid $ROOT --json /tmp/c1-$S.json >/dev/null 2>&1
  wait $SPY
  python3 -c "
import json;d=json.load(open('/tmp/c1-$S.json'));print('$S', round(d['requests_per_s'],2),'req/s fe %.1f ms/req'%(d['server_cpu_s_by_role']['front_end']*1e3/d['requests']), 'itl p50 %.2f ms'%(d['itl_s']['p50']*1e3))"
  kill -TERM $ROOT; for i in $(seq 60); do kill -0 $ROOT 2>/dev/null || break; sleep 1; done; sleep 2
done
