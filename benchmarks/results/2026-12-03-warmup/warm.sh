# One server started, then the same c16 224 px load run several times: the first run after a start costs
# the front end more CPU per request. Also prints the figure the old awk $14+$15 parsing gave.
# SERVER=qwen|vllm RUNS="--stream:httpx --stream:openai ..." bash warm.sh
# Is the first run after a start dearer? Same server, the same run repeated.
cd "$(dirname "$0")/../../.."
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"
cpu() { sed 's/.*) //' /proc/$1/stat | awk '{print $12+$13}'; }
wrong() { awk '{print $14+$15}' /proc/$1/stat; }
flt() { sed 's/.*) //' /proc/$1/stat | awk '{print $8}'; }
SERVER=${SERVER:-qwen}
if [ $SERVER = vllm ]; then
  VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --port 18002 --host 127.0.0.1 $FLAGS > /tmp/w-vllm.log 2>&1 &
  PORT=18002
else
  VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port 18001 $FLAGS > /tmp/w-qwen.log 2>&1 &
  PORT=18001
fi
for i in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
if [ $SERVER = vllm ]; then FE=$(pgrep -f "vllm.entrypoints.openai.api_server" | head -1); else FE=$(pgrep -f "qwen-server 127.0.0.1:18001 worker-1" | head -1); fi
echo FE=$FE comm="$(cat /proc/$FE/comm)"
for spec in ${RUNS:---stream:httpx --stream:httpx --stream:openai --stream:httpx --stream:openai}; do
  st=${spec%%:*}; cl=${spec##*:}
  c0=$(cpu $FE); f0=$(flt $FE); w0=$(wrong $FE)
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 --requests 300 --image-size 224 --max-tokens 16 $st --client $cl --warmup 4 --json /tmp/w.json >/dev/null 2>&1
  c1=$(cpu $FE); f1=$(flt $FE); w1=$(wrong $FE)
  .venv/bin/python -c "
import json;d=json.load(open('/tmp/w.json'));t=d['ttft_s'];n=d.get('requests',300)+4
print('$SERVER $st $cl', round(d.get('requests_per_s',0),2), 'req/s ttft p99 %.0f ms errors %s front-end CPU %.2f ms/req minflt/req %.0f (awk 14+15: %.2f)'%(t['p99']*1e3,d['errors'],($c1-$c0)*10/n,($f1-$f0)/n,($w1-$w0)*10/n))"
done
pkill -TERM -f "vllm.entrypoints.openai.api_server"; pkill -TERM -f "qwen-server 127.0.0.1:18001"
for i in $(seq 30); do pgrep -f "qwen-server 127.0.0.1:18001|vllm.entrypoints.openai.api_server" >/dev/null || break; sleep 1; done
