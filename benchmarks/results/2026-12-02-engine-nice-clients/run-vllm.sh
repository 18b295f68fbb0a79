cd /work/main
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
while pgrep -f "bash /tmp/nice.sh" >/dev/null; do sleep 5; done
for rep in 1 2; do
VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 --max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt '{"image": 4}' --enforce-eager --served-model-name tiny > /tmp/vllm2.log 2>&1 &
for i in $(seq 120); do curl -sf 127.0.0.1:18002/v1/models >/dev/null && break; sleep 2; done
  for st in --stream --no-stream; do for cl in httpx openai; do
    .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:18002 --model tiny --concurrency 16 --requests 300 --image-size 224 --max-tokens 16 $st --client $cl --warmup 4 --json /tmp/lgv.json >/dev/null 2>&1
    .venv/bin/python -c "
import json;d=json.load(open('/tmp/lgv.json'));e=d['e2e_s'];t=d['ttft_s'];print('vllm $rep $st $cl', round(d.get('requests_per_s',0),2), 'ttft p99 %.0f e2e p99 %.0f errors %s'%(t['p99']*1e3,e['p99']*1e3,d['errors']))"
  done; done
pkill -TERM -f "vllm.entrypoints.openai.api_server"; for i in $(seq 30); do pgrep -f "vllm.entrypoints.openai.api_server" >/dev/null || break; sleep 1; done; sleep 3
done
