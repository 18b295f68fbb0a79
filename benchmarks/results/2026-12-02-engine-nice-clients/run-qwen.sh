cd /work/main
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
run_server() {  # $1 nice
  VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 --max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt '{"image": 4}' --enforce-eager --served-model-name tiny --engine-nice $1 > /tmp/qwen-nice$1.log 2>&1 &
  for i in $(seq 120); do curl -sf 127.0.0.1:18001/v1/models >/dev/null && break; sleep 2; done
}
for order in "10 0" "0 10"; do for n in $order; do
  run_server $n
  for st in --stream --no-stream; do for cl in httpx openai; do
    .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:18001 --model tiny --concurrency 16 --requests 300 --image-size 224 --max-tokens 16 $st --client $cl --warmup 4 --json /tmp/lgn.json >/dev/null 2>&1
    .venv/bin/python -c "
import json;d=json.load(open('/tmp/lgn.json'));e=d['e2e_s'];t=d['ttft_s'];print('nice $n $st $cl', round(d.get('requests_per_s',0),2), 'ttft p99 %.0f e2e p99 %.0f errors %s'%(t['p99']*1e3,e['p99']*1e3,d['errors']))"
  done; done
  pkill -TERM -f "qwen-server 127.0.0.1:18001"; for i in $(seq 30); do pgrep -f "qwen-server 127.0.0.1:18001" >/dev/null || break; sleep 1; done; sleep 2
done; done
