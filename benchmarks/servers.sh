# What the hand-run scripts under benchmarks/results/ share (source it from the repository root):
# side_by_side's engine flags on the demo checkpoint, and one server of either kind started, waited
# for, warmed up as side_by_side warms it (WARM_UP: 320 requests, c16, 224 px, streaming) and stopped.
#   start_server vllm|qwen [extra launcher flags]   sets PORT (vllm 18002, qwen 18001) and ROOT (its pid)
#   stop_server                                      SIGTERM to ROOT, then wait for it to exit (60 s at most)
# The log goes to /tmp/bench-<kind>.log.
M=/root/.cache/qwen-server/demo-qwen2_5_vl-v2
FLAGS="--max-model-len 4096 --max-num-seqs 64 --limit-mm-per-prompt {\"image\":4} --enforce-eager --served-model-name tiny"

start_server() {
  local kind=$1
  shift
  if [ "$kind" = vllm ]; then
    PORT=18002
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M \
      --port $PORT --host 127.0.0.1 $FLAGS "$@" > /tmp/bench-vllm.log 2>&1 &
  else
    PORT=18001
    VLLM_CPU_KVCACHE_SPACE=2 setsid .venv/bin/python launcher.py --model $M --port $PORT $FLAGS "$@" \
      > /tmp/bench-qwen.log 2>&1 &
  fi
  ROOT=$!
  for _ in $(seq 150); do curl -sf 127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 2; done
  .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$PORT --model tiny --concurrency 16 \
    --requests 320 --seed 1 >/dev/null 2>&1
}

stop_server() {
  kill -TERM $ROOT
  for _ in $(seq 60); do kill -0 $ROOT 2>/dev/null || break; sleep 1; done
  sleep 2
}
