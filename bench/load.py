"""Peak memory of loading the DiT from the original sharded layout, against the size of the weights.

Writes a mid-size FantasyTalking DiT (a wider/shallower Wan config, ~1.6 GB of float32 base weights) in the original
Wan layout (original key names, 7 shards + index, Wan ``config.json``) to a temporary folder, then loads it with
`load_transformer` in a fresh subprocess per dtype and reads that process's peak RSS (`VmHWM`: bench/_memory.py).
The figure that matters is the growth over the process's RSS just before loading, divided by the loaded model's
bytes: about 1.0 means one copy of the model (built on meta, filled shard by shard), 2.0 would mean a full state
dict plus a model.
`fp8` is `--base_weights_dtype fp8` (block linears read straight into float8): its ratio is against the fp8 model's
bytes, so about 1.0 means the load never held the bf16 model.

Run: ``.venv/bin/python -m bench.load [--layers 20 --dim 1024 --ffn 4096 --shards 7]``. Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fantasytalk_cli.models.layout import DIT_SHARD_PREFIX
from fantasytalk_cli.models.state_dict_adapters import dit_name_to_original
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.weights import build_empty, model_shapes

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
"""The child imports `bench._memory` from here."""

_CHILD = r"""
import json, sys, time
import psutil, torch
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.runtime.memory_options import store_in_fp8  # imports done before the baseline is taken
from bench._memory import peak_rss_mb
folder, setting = sys.argv[1], sys.argv[2]
fp8 = setting == "fp8"  # --base_weights_dtype fp8: bf16 load, block linears read straight into float8


def fp8_storage(meta):
    set_trainable(meta, ["processor.", "proj_model."])
    store_in_fp8(meta, torch.bfloat16)


before = psutil.Process().memory_info().rss
start = time.perf_counter()
model = load_transformer(folder, dtype=torch.bfloat16 if fp8 else getattr(torch, setting),
                         on_meta=fp8_storage if fp8 else None)
seconds = time.perf_counter() - start
tensors = list(model.parameters()) + list(model.buffers())
checksum = sum(float(t.float().sum()) for t in tensors)  # touch every page: lazily mapped weights count too
peak = peak_rss_mb() * 2**20
model_bytes = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "model": model_bytes}))
"""


def wan_config(dim: int, layers: int, ffn: int) -> dict[str, object]:
    """The original ``config.json`` of the bench DiT (Wan's own keys; heads of 128 as in the 14B)."""
    return {
        "_class_name": "WanModel",
        "dim": dim,
        "eps": 1e-6,
        "ffn_dim": ffn,
        "freq_dim": 256,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": dim // 128,
        "num_layers": layers,
        "out_dim": 16,
        "text_len": 512,
    }


def write_model(folder: Path, dim: int, layers: int, ffn: int, shards: int) -> int:
    """Write the base DiT (random float32, original names) shard by shard; returns the bytes of weights written."""
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    kwargs = {
        "num_attention_heads": dim // 128,
        "attention_head_dim": 128,
        "in_channels": 36,
        "out_channels": 16,
        "ffn_dim": ffn,
        "num_layers": layers,
        "image_dim": 1280,
        "added_kv_proj_dim": dim,
    }
    shapes, _ = model_shapes(build_empty(lambda: FantasyTalkingTransformer(**kwargs)))
    names = sorted((dit_name_to_original(n), s) for n, s in shapes.items() if not is_adapter_name(n))
    total = sum(math.prod(s) * 4 for _, s in names)
    budget, shard, weight_map, part, size = total / shards, 1, {}, {}, 0
    gen = torch.Generator().manual_seed(0)

    def flush() -> None:
        nonlocal part, size, shard
        file = f"{DIT_SHARD_PREFIX}-{shard:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        part, size, shard = {}, 0, shard + 1

    for name, shape in names:
        part[name] = torch.empty(shape).uniform_(-0.02, 0.02, generator=gen)
        size += part[name].numel() * 4
        if size >= budget and shard < shards:
            flush()
    if part:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{DIT_SHARD_PREFIX}.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(wan_config(dim, layers, ffn)))
    return total


def measure(folder: Path, dtype: str) -> dict[str, float]:
    """Load in a fresh process and return its memory figures."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), dtype], capture_output=True, text=True, check=True,
                         cwd=REPO)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftalk-bench-load-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        weights = write_model(folder, args.dim, args.layers, args.ffn, args.shards)
        print(f"wrote {weights / GIB:.2f} GiB of float32 base weights in {args.shards} shards ", end="")
        print(f"({time.perf_counter() - start:.0f} s)")
        shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
        header = ("load dtype", "model GiB", "RSS before", "peak RSS", "growth", "ratio", "above model", "s")
        print("{:<11} {:>9} {:>10} {:>9} {:>7} {:>6} {:>11} {:>5}".format(*header))
        for dtype in ("float32", "bfloat16", "fp8"):
            r = measure(folder, dtype)
            growth = r["peak"] - r["before"]
            print(
                f"{dtype:<11} {r['model'] / GIB:>9.2f} {r['before'] / GIB:>10.2f} {r['peak'] / GIB:>9.2f} "
                f"{growth / GIB:>7.2f} {growth / r['model']:>6.2f} {(growth - r['model']) / GIB:>11.2f} "
                f"{r['seconds']:>5.1f}"
            )
        print("ratio = (peak RSS - RSS before loading) / loaded model bytes (base + fresh adapter); target <= 1.3")
        print(f"above model = growth - model: the load's transient; the largest shard, mapped while read, is "
              f"{shard / GIB:.2f} GiB (fp8 of a model this small: that shard dominates the ratio)")  # fmt: skip


if __name__ == "__main__":
    main()
