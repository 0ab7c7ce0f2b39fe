#!/usr/bin/env bash
# The cost of the front end -> replica hop: floe serve with the fake engine (no model compute),
# 1 and 2 replicas, 1-item and 16-item requests of 16 tokens, over gRPC and HTTP, 3 runs each.
# Prints one line per run: replicas protocol batch req/s seq/s p50_ms p99_ms.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-bench-results/hop}
mkdir -p "$OUT"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for reps in 1 2; do
  port=$(free_port); gport=$(free_port); sport=$(free_port)
  "$PY" -m floe serve --engine fake --num-replicas "$reps" --port "$port" --grpc-port "$gport" \
      --start-port "$sport" > "$OUT/serve-$reps.log" 2>&1 &
  pid=$!
  until curl -sf "127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
  for run in 1 2 3; do
    for proto in grpc http; do
      server=127.0.0.1:$gport; [ "$proto" = http ] && server=127.0.0.1:$port
      for bs in 1 16; do
        json="$OUT/hop-$reps-$proto-$bs-$run.json"
        "$PY" -m floe.bench --progress off --protocol "$proto" --server "$server" --batch-sizes "$bs" \
            --concurrency 32 --requests 3000 --prompt-length 16 --warmup 50 --seed "$run" \
            --output-json "$json" > /dev/null 2>&1
        "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; l=r['latency_s']; print('$reps $proto $bs', round(r['requests_per_s']), round(r['sequences_per_s']), round(l['p50']*1e3,1), round(l['p99']*1e3,1), r['success_rate'])" "$json"
      done
    done
  done
  kill -TERM "$pid"; wait "$pid" || true
done
