#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine with Rust lacks for one of the README's two
# commands, and nothing it already has: `scripts/system-packages.sh demo` (redis-server,
# python3) or `scripts/system-packages.sh test` (also redis-tools, redis-sentinel,
# python3-venv, npm, kubectl, and the rustfmt and clippy components). Uses apt-get, through
# sudo when not root; says what it installs before it does.
set -euo pipefail

want="${1:-test}"
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ "$want" = "test" ]; then
  # The cluster and Sentinel tests: redis-cli joins the cluster, redis-sentinel watches a master.
  command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
  command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
  command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (apt-get)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "error: ${need[*]} missing and no sudo to install them; run: apt-get install -y ${need[*]}" >&2
      exit 1
    }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

if [ "$want" = "test" ]; then
  command -v rustfmt >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
