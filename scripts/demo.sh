#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ftalk demo "${@}"
