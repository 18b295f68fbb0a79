# --processor-threads 1 (the new default) against 0 (torch's default, one per core: what every earlier
# figure ran with) against vLLM's server, same engine flags; c16, 224 px, 1 image, 16 tokens, 300
# requests (+4 warm-up) per row, after an uncounted 320-request warm-up run per start (the first few
# hundred requests after a start cost more; see side_by_side.WARM_UP), then 10 s idle, the four c16 rows
# and one c1 row (openai, streaming, 64 requests). Two rounds, order reversed.
# Front-end CPU: loadgen --server-pid on the server's root process, role "front_end" (everything but
# EngineCore and the model worker: our launcher and Granian worker, vLLM's API server process).
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
OUT=${OUT:-/tmp/processor-threads}; mkdir -p $OUT
start() {  # $1: vllm | a --processor-threads value
  if [ $1 = vllm ]; then
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > $OUT/vllm.log 2>&1 &
    PORT=18002
  else
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS --processor-threads $1 > $OUT/qwen-$1.log 2>&1 &
    PORT=18001
  fi
  ROOT=$!
  for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
}
stop() {
  kill -TERM $ROOT
  for i in $(seq 60); do kill -0 $ROOT 2>/dev/null || break; sleep 1; done; sleep 2
}
load() {  # $1 config, $2 --stream|--no-stream, $3 client, $4 requests, $5 seed, $6 label
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency ${CONC:-16} --requests $4 \
    --image-size 224 --max-tokens 16 $2 --client $3 --warmup 4 --seed $5 --server-pid $ROOT --json $OUT/run.json >/dev/null 2>&1
  .venv/bin/python -c "
import json;d=json.load(open('$OUT/run.json'));t=d['ttft_s'];n=d['scenario']['requests']+4
fe=d['server_cpu_s_by_role']['front_end']
print('$6 $1 $2 $3', round(d['requests_per_s'],2), 'req/s  ttft p99 %.0f ms  errors %s  front-end CPU %.2f ms/req'%(t['p99']*1e3,d['errors'],fe*1e3/n))"
}
seed=100
for order in "1 0 vllm" "vllm 0 1"; do for c in $order; do
  start $c
  load $c --stream aiohttp 320 1 warm-up
  .venv/bin/python -c "
import time; from benchmarks.proctree import TreeSampler
s = TreeSampler($ROOT); s.start(); time.sleep(10); r = s.stop()
print('idle $c', 'front-end CPU %.1f ms/s' % (r['server_cpu_s_by_role']['front_end'] * 100), 'engine core %.1f ms/s' % (r['server_cpu_s_by_role']['engine_core'] * 100))"
  for st in --stream --no-stream; do for cl in httpx openai; do
    seed=$((seed+1)); load $c $st $cl 300 $seed row
  done; done
  seed=$((seed+1)); CONC=1 load $c --stream openai 64 $seed row-c1
  stop
done; done
