# --frontend-torch-threads 1 vs 0 (torch's default: one per core, 2 here) vs vLLM's server.
# Same engine flags for both servers; c16, 224 px, 16 tokens, 300 requests per run; two rounds,
# order reversed in the second. Front-end CPU = CPU seconds of the process that owns the engine
# client (our Granian worker, vLLM's API server process) over the run, per request.
cd /work/main
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
# utime+stime, counted after the ')' that ends the process name: our worker's name has a space in it
# ("qwen-server 127...."), so counting fields from the start (as this script did until 2026-12-03) read
# cmajflt+utime for our worker, leaving its system time out, and the whole of vLLM's (named "python").
cpu() { sed 's/.*) //' /proc/$1/stat | awk '{print $12+$13}'; }
start() {  # $1 config
  case $1 in
    vllm) VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/tt-vllm.log 2>&1 &
          PORT=18002 ;;
    *)    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS --frontend-torch-threads $1 > /tmp/tt-$1.log 2>&1 &
          PORT=18001 ;;
  esac
  for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
  if [ $1 = vllm ]; then FE=$(pgrep -f "vllm.entrypoints.openai.api_server" | head -1); else FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1); fi
}
stop() {
  pkill -TERM -f "vllm.entrypoints.openai.api_server"; pkill -TERM -f "qwen-server 127.0.0.1:18001"
  for i in $(seq 30); do pgrep -f "qwen-server 127.0.0.1:18001|vllm.entrypoints.openai.api_server" >/dev/null || break; sleep 1; done; sleep 2
}
for order in "1 0 vllm" "vllm 0 1"; do for c in $order; do
  start $c
  for st in --stream --no-stream; do for cl in httpx openai; do
    c0=$(cpu $FE)
    .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 --requests 300 --image-size 224 --max-tokens 16 $st --client $cl --warmup 4 --json /tmp/tt.json >/dev/null 2>&1
    c1=$(cpu $FE)
    .venv/bin/python -c "
import json;d=json.load(open('/tmp/tt.json'));e=d['e2e_s'];t=d['ttft_s'];n=d.get('requests',300)+4
print('$c $st $cl', round(d.get('requests_per_s',0),2), 'req/s  ttft p99 %.0f ms  e2e p99 %.0f ms  errors %s  front-end CPU %.2f ms/req'%(t['p99']*1e3,e['p99']*1e3,d['errors'],($c1-$c0)*10/n))"
  done; done
  stop
done; done
