#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo on the CPU (again: it replaces its own earlier demo folder).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ftalk demo --overwrite "${@}"  # replaces only a folder an earlier demo made
