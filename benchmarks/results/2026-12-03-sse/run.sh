# The SSE sender (qwen_server/http/sse.py + one write per engine output) against the code before it
# (Litestar's Stream, one write per event), same launcher flags; vLLM's server is not re-run here.
# c16, 224 px, 16 tokens, 300 requests per run, streaming, httpx and openai clients; order
# new, old, old, new. Front-end CPU = CPU seconds of our Granian worker over the run, per request.
# OLD=/path/to/checkout-before (a worktree at 8e4cb46), run from the new checkout.
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
# utime+stime, counted after the ')' that ends the process name: our worker's name has a space in it
# ("qwen-server 127...."), so counting fields from the start (as this script did until 2026-12-03) read
# cmajflt+utime for our worker, leaving its system time out, and the whole of vLLM's (named "python").
cpu() { sed 's/.*) //' /proc/$1/stat | awk '{print $12+$13}'; }
start() {  # $1: new|old
  src=$PWD; [ $1 = old ] && src=$OLD
  (cd $src && VLLM_CPU_KVCACHE_SPACE=2 PYTHONPATH=$src setsid $OLDPWD/.venv/bin/python launcher.py --model $M --port 18001 $FLAGS > /tmp/sse-$1.log 2>&1 &)
  for i in $(seq 150); do curl -sf 127.0.0.1:18001/v1/models >/dev/null && break; sleep 2; done
  FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1)
}
stop() {
  pkill -TERM -f "qwen-server 127.0.0.1:18001"
  for i in $(seq 30); do pgrep -f "qwen-server 127.0.0.1:18001" >/dev/null || break; sleep 1; done; sleep 2
}
for c in new old old new; do
  start $c
  for cl in httpx openai; do
    c0=$(cpu $FE)
    .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:18001 --model tiny --concurrency 16 --requests 300 --image-size 224 --max-tokens 16 --stream --client $cl --warmup 4 --json /tmp/sse.json >/dev/null 2>&1
    c1=$(cpu $FE)
    .venv/bin/python -c "
import json;d=json.load(open('/tmp/sse.json'));e=d['e2e_s'];t=d['ttft_s'];n=d.get('requests',300)+4
print('$c $cl', round(d.get('requests_per_s',0),2), 'req/s  ttft p99 %.0f ms  e2e p99 %.0f ms  errors %s  front-end CPU %.2f ms/req'%(t['p99']*1e3,e['p99']*1e3,d['errors'],($c1-$c0)*10/n))"
  done
  stop
done
