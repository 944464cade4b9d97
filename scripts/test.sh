#!/usr/bin/env bash
# Set up (idempotent) and run the linters and the whole test suite (what CI runs).
# `--fast`: everything but the multi-process and end-to-end tests (marker `slow`), for a quick local check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "${1:-}" = "--fast" ]; then
  shift
  exec .venv/bin/pytest -q -m "not slow" "${@}"
fi
exec .venv/bin/pytest -q "${@}"
