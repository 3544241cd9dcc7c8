#!/usr/bin/env bash
# The whole test suite: formatting, lints, proto lint, and every Rust test (unit and end-to-end,
# including the grpcurl and generated-Python-client tests). On a fresh Debian/Ubuntu machine
# with Rust it first installs what is missing (redis-server, python3-venv, npm, kubectl, rustfmt,
# clippy: scripts/system-packages.sh), then grpcurl, grpcio-tools, kubernetes-validate and buf
# into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/system-packages.sh test

echo "==> tools"
scripts/install-tools.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> buf lint (STANDARD + COMMENTS)"
.tools/node_modules/.bin/buf lint

echo "==> wq-bench at a tiny size (so it cannot rot; figures meaningless)"
# Its pod phase runs the wq-worker binary built beside it.
cargo build --quiet -p wq-worker
cargo run --quiet -p wq-bench -- -n 300 -w 1,4 --idle-seconds 0.5 --idle-leases 100

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary, so the total is plain to read.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
