cd /work/main
for rnd in 1 2 3; do for port in $PORTS ; do for st in --no-stream; do for cl in httpx; do
.venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:$port --model tiny --concurrency 1 --requests 150 --image-size 224 --max-tokens 16 $st --client $cl --warmup 4 --json /tmp/lg.json --seed $rnd$port >/dev/null 2>&1
.venv/bin/python -c "
import json;d=json.load(open('/tmp/lg.json'));e=d['e2e_s'];t=d['ttft_s'];print('$rnd $port $st $cl', round(d.get('requests_per_s',0),2), 'e2e p50/p90/p99 %.1f/%.1f/%.1f'%(e['p50']*1e3,e['p90']*1e3,e['p99']*1e3))"
done; done; done; PORTS=$(echo $PORTS | awk '{print $2, $1}'); done
