#!/usr/bin/env bash
# The Kubernetes "fine parallel processing using a work queue" walkthrough, on wq, with the real
# binaries: a private Redis (wq-server --dev), `wq seed job2 <fruit>`, two wq-worker processes in
# parallel (as `parallelism: 2`), each printing what it works on and exiting 0 once the queue is
# drained, then `wq state job2`.
#
#   scripts/demo.sh                                   # everything private and temporary
#   WQ_REDIS_URL=redis://host:6379 scripts/demo.sh    # broker on an existing Redis
#   WQ_BROKER=http://host:50051 scripts/demo.sh       # an already running broker
set -euo pipefail
cd "$(dirname "$0")/.."

# A fresh machine may lack redis-server (for --dev) and python3 (to pick a free port).
scripts/system-packages.sh demo
cargo build --quiet --release -p wq-server -p wq-client -p wq-worker
bin=target/release

server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ -z "${WQ_BROKER:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export WQ_BROKER="http://127.0.0.1:$port"
  if [ -n "${WQ_REDIS_URL:-}" ]; then
    "$bin/wq-server" --listen "127.0.0.1:$port" --redis-url "$WQ_REDIS_URL" 2>/tmp/wq-demo-server.log &
  else
    "$bin/wq-server" --listen "127.0.0.1:$port" --dev 2>/tmp/wq-demo-server.log &
  fi
  server_pid=$!
  # The broker answers once it has bound; wq state fails fast until then.
  for _ in $(seq 100); do "$bin/wq" state job2 >/dev/null 2>&1 && break; sleep 0.1; done
  echo "== wq-server running at $WQ_BROKER (log: /tmp/wq-demo-server.log)"
fi

echo "== wq seed job2 apple banana cherry date fig grape lemon melon orange"
"$bin/wq" seed job2 apple banana cherry date fig grape lemon melon orange

echo "== two workers in parallel (parallelism: 2)"
pids=()
for n in 1 2; do
  ( "$bin/wq-worker" --queue job2 --work-time "${WQ_DEMO_WORK_TIME:-1s}" --max-wait "${WQ_DEMO_MAX_WAIT:-5s}" 2>&1 | sed "s/^/[worker-$n] /" ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] && echo "== both workers exited 0"

echo "== wq state job2"
"$bin/wq" state job2
exit "$status"
