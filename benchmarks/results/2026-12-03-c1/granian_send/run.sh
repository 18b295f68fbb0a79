# Granian (uvloop, multi- and single-threaded runtime) against uvicorn on app.py, chunks 4 ms apart,
# 200 requests one at a time, twice each, alternating.
cd "$(dirname "$0")"
V=../../../../.venv/bin
run() { label=$1; shift; "$@" > /tmp/granian-send.log 2>&1 & P=$!; sleep 3; W=$(pgrep -P $P | head -1); [ -z "$W" ] && W=$P
  $V/python client.py 18111 $W 200 "$label"; kill -TERM $P; wait $P 2>/dev/null; }
export GAP=${GAP:-0.004}
for rep in 1 2; do
  run "granian uvloop mt" $V/granian --interface asgi --host 127.0.0.1 --port 18111 --workers 1 --loop uvloop app:app
  run "granian uvloop st" $V/granian --interface asgi --host 127.0.0.1 --port 18111 --workers 1 --loop uvloop --runtime-mode st app:app
  run "uvicorn" $V/uvicorn --host 127.0.0.1 --port 18111 --log-level warning app:app
done
