#!/usr/bin/env bash
# Runs the peers' harness (../shared/peers: BullMQ, RQ, Celery, the Kubernetes example's rediswq
# pattern, raw Redis) and then wq-bench with the same workload, one after the other in this
# session, and prints one table of both (medians over runs, the peers' own report) and wq's
# ratios to each peer. Only ratios taken in one session count on a shared machine.
#
#   bench/vs-peers.sh                       # N=20000, 1 run, W=1,4,16, every peer
#   bench/vs-peers.sh -n 5000 -r 2 -s "bullmq rediswq" -- --payload 64
#
# wq runs twice per run: `wq` with the worker's defaults (no prefetch, like BullMQ's worker) and
# `wq-prefetch64` with --prefetch 64 (items leased ahead of the free slots, the way Celery
# prefetches). Arguments after `--` go to both wq-bench runs. Output: target/peers/ (combined_raw.csv, combined.csv,
# wq-run<R>.log); the peers' harness writes its own files in its folder, as its README says.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${PEERS:-../shared/peers}
n=20000 runs=1 workers=1,4,16 systems="redis-raw rediswq rediswq-lua bullmq rq celery"
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    -r) runs=$2; shift 2 ;;
    -w) workers=$2; shift 2 ;;
    -s) systems=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [-n N] [-r RUNS] [-w W,...] [-s \"SYSTEMS\"] [-- wq-bench args]" >&2; exit 2 ;;
  esac
done
[ -x "$peers/run.sh" ] || { echo "error: no peers harness at $peers (set PEERS=...)" >&2; exit 1; }
out=target/peers
mkdir -p "$out"

cargo build --release --quiet -p wq-bench
"$peers/run.sh" -n "$n" -r "$runs" -w "$workers" -s "$systems"
cp "$peers/results_raw.csv" "$out/combined_raw.csv"
for run in $(seq 1 "$runs"); do
  echo "[vs-peers $(date +%H:%M:%S)] run $run/$runs: wq (load avg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  # Bulk enqueue at 1000 items per call, as the peers do; a private Redis and broker per run.
  for variant in wq:0 wq-prefetch64:64; do
    name=${variant%%:*}
    target/release/wq-bench -n "$n" -b 1000 -w "$workers" --phases enqueue,drain \
      --prefetch "${variant##*:}" --peers-name "$name" --peers-csv "$out/$name-run$run.csv" "$@" \
      > "$out/$name-run$run.log"
    sed "s/^RESULT,/$run,/" "$out/$name-run$run.csv" >> "$out/combined_raw.csv"
  done
done
python3 "$peers/report.py" "$out/combined_raw.csv" "$out/combined.csv"

python3 - "$out/combined.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rate = {(r["system"], r["phase"], r["W"]): float(r["items_per_s"])
        for r in rows if r["items_per_s"] not in ("", None)}
systems = list(dict.fromkeys(s for (s, _, _) in rate))
ours_all = [s for s in systems if s.startswith("wq")]
peers = [s for s in systems if not s.startswith("wq") and s != "redis-raw"]
for wq in ours_all:
    keys = sorted({(p, w) for (s, p, w) in rate if s == wq}, key=lambda k: (k[0], len(k[1]), k[1]))
    print(f"\n{wq}'s throughput over each peer's (same phase and W; >1 means {wq} is faster)")
    print("phase          W    items/s  " + "  ".join(f"{p:>11}" for p in peers))
    for phase, w in keys:
        ours = rate[(wq, phase, w)]
        cells = []
        for p in peers:
            theirs = rate.get((p, phase, w))
            cells.append(f"{ours / theirs:>10.2f}x" if theirs else f"{'-':>11}")
        print(f"{phase:<13} {w:>3} {ours:>9.0f}  " + "  ".join(cells))
PY
