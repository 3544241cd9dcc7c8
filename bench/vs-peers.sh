#!/usr/bin/env bash
# Runs the peers' harness (../shared/peers: BullMQ, RQ, Celery, the Kubernetes example's rediswq
# pattern, raw Redis), the Redis-side ceiling of wq's data model (../shared/ceiling, its e2e
# section) and then wq-bench with the same workload, one after the other in this session, and
# prints one table of all (medians over runs, the peers' own report), wq's ratios to each peer,
# and wq's Redis CPU per item beside the ceiling's. Only ratios taken in one session count on a
# shared machine.
#
#   bench/vs-peers.sh                       # N=20000, 1 run, W=1,4,16, every peer
#   bench/vs-peers.sh -n 5000 -r 2 -s "bullmq rediswq" -- --payload 64
#
# wq runs as three systems per run: `wq-worker`, the wq-worker binary with its defaults and the
# no-op handler (`--work-time 0s`) at --concurrency W, the path a Job pod runs; `wq`, the
# library's Worker with its defaults in wq-bench's process; and `wq-prefetch0`, that Worker with
# --prefetch 0 (a slot leases only when free, nothing ahead). Arguments after `--` go to every
# wq-bench run. Output: target/peers/ (combined_raw.csv, combined.csv, wq-run<R>.log,
# ceiling-run<R>/); the peers' harness writes its own files in its folder, as its README says.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${PEERS:-../shared/peers}
ceiling=${CEILING:-../shared/ceiling}
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
[ -x "$ceiling/run.sh" ] || { echo "error: no ceiling harness at $ceiling (set CEILING=...)" >&2; exit 1; }
out=target/peers
mkdir -p "$out"

cargo build --release --quiet -p wq-bench -p wq-worker
"$peers/run.sh" -n "$n" -r "$runs" -w "$workers" -s "$systems"
cp "$peers/results_raw.csv" "$out/combined_raw.csv"
for run in $(seq 1 "$runs"); do
  echo "[vs-peers $(date +%H:%M:%S)] run $run/$runs: ceiling (load avg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$ceiling/run.sh" --sections e2e --rounds 1 --items "$n" --big 0 --no-calibrate \
    --results-dir "$PWD/$out/ceiling-run$run" > "$out/ceiling-run$run.log" 2>&1
  echo "[vs-peers $(date +%H:%M:%S)] run $run/$runs: wq (load avg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  # Bulk enqueue at 1000 items per call, as the peers do; a private Redis and broker per run.
  for variant in wq:auto:enqueue,drain,pod wq-prefetch0:0:enqueue,drain; do
    IFS=: read -r name prefetch phases <<< "$variant"
    target/release/wq-bench -n "$n" -b 1000 -w "$workers" --phases "$phases" \
      --prefetch "$prefetch" --peers-name "$name" --peers-csv "$out/$name-run$run.csv" \
      --json "$out/$name-run$run.json" "$@" > "$out/$name-run$run.log"
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

# Redis CPU per item, over each item's whole life (bulk enqueue, lease, complete), against the
# ceiling's e2e total measured in the same session (medians over runs).
python3 - "$out" "$runs" <<'PY'
import csv, json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
ceiling = [float(r["redis_us_per_item"]) for run in range(1, runs + 1)
           for r in csv.DictReader(open(f"{out}/ceiling-run{run}/raw.csv"))
           if r["section"] == "e2e" and r["op"] == "total"]
ours = {}
for run in range(1, runs + 1):
    for rec in json.load(open(f"{out}/wq-run{run}.json")):
        if rec.get("redis_cpu_us_per_item") is not None:
            ours.setdefault((rec["phase"], rec["workers"]), []).append(rec["redis_cpu_us_per_item"])
if not ceiling:
    sys.exit("no e2e total in the ceiling's results")
floor = statistics.median(ceiling)
print(f"\nRedis CPU per item (fill + lease + complete), ceiling e2e total {floor:.1f} µs")
print("path                                   W   µs/item  over the ceiling")
names = {"drain": "wq-bench Worker, defaults", "pod": "wq-worker binary, defaults"}
for (phase, w), values in sorted(ours.items()):
    us = statistics.median(values)
    print(f"{names.get(phase, phase):<36} {w:>3} {us:>9.1f}  {us / floor:>6.2f}x")
PY