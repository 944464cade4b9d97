#!/usr/bin/env bash
# The device check of issue 15, ready for a session that is lent a GPU (run there from the repository root, with the
# wheelhouse built here by ../shared/tools/device-wheelhouse and carried as .wheelhouse):
#   bash ../shared/tools/device-setup .wheelhouse && bash bench/gpu_check.sh
# Writes under $OUT (or ./gpu-check): the card, bench/gpu_step.py's table at the 14B block dims for every memory
# setting (peak memory against the plan's estimate: the <= 15% check), and a resize/loader check of the data path.
set -euo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.csv"
timeout 420 python3 -m bench.gpu_step --steps 3 2>&1 | tee "$out/gpu_step.txt"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/resize.txt"
# the step's resize of 81 source frames (480x832 into the 384x672 bucket) on the GPU, against the CPU's uint8 route
import time, torch
from fantasytalk_cli.data.dataset import to_model_pixels
frames = [torch.randint(0, 256, (81, 480, 832, 3), dtype=torch.uint8).pin_memory()]
cpu = to_model_pixels(frames, 384, 672, torch.device("cpu"))
for _ in range(3):
    torch.cuda.synchronize(); start = time.perf_counter()
    gpu = to_model_pixels(frames, 384, 672, torch.device("cuda"))
    torch.cuda.synchronize(); took = time.perf_counter() - start
levels = ((gpu.cpu() - cpu).abs().max() * 127.5).item()
print(f"to_model_pixels on the GPU: {took * 1e3:.1f} ms for 81 frames; max difference to the CPU route {levels:.2f} grey levels")
PY
