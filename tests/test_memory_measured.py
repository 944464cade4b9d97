"""The memory estimate against a measured training step on the CPU (the issue's acceptance: within 25% of the
measured peak RSS increase of a real training step).

What is measured. A fresh subprocess loads the models of the tiny world with a wider DiT (`bench/_world.py`:
dim 512, 8 blocks, FFN 2048, about 42 M parameters / 170 MB in fp32, written in the original Wan layout and loaded
by `load_training_models`) so the step's memory is well above RSS noise, and runs two real steps on a 192x192x17
bucket (720 DiT tokens): `ClipBatchDataset` batch -> `training_step` (VAE, umT5, CLIP and wav2vec2 encodes, the
DiT forward) -> backward -> gradient clipping -> AdamW step -> `zero_grad(set_to_none=True)`, as the loop does.
Only the second step is measured: the first one creates AdamW's moments (lazily, after its backward, when the
activations are already freed) and one-time runtime caches, so it is not the steady state the estimate
describes. Peak = the highest RSS seen by a 1 ms sampling thread during the step, or `ru_maxrss` when the step
raised the process's lifetime peak (then it is exact); the two agree within a MB in practice.

Why `MALLOC_MMAP_THRESHOLD_`. torch's CPU tensors come from glibc malloc. By default glibc's mmap threshold is
dynamic: after a large block is freed the threshold rises (up to 32 MB), later blocks come from the heap, and
freed heap memory is not given back, so RSS stays at an old high-water mark and reflects fragmentation rather than
live tensors. A fixed threshold of 64 KB makes every tensor above it its own mapping, unmapped when freed, so RSS
follows the live bytes and "RSS before the step" is not inflated by the previous step's garbage.

What is compared. The increase of RSS over its value just before the step is compared with the estimate's
step-dependent terms: gradients, activations, backward working memory, inputs/context/head/loss and the VAE
encode above the DiT step. The other terms (frozen and trainable weights, AdamW moments, encoders, runtime
overhead) are resident before the step starts, so they are not in the increase. Comparing the whole estimate
with the whole RSS instead would mostly test the constant `RUNTIME_OVERHEAD_BYTES` (0.45 GB, larger than this
model's step), not the model of a step.

Where the estimate stands (measured on this config): about 0.85 of the estimate is measured. The estimate is
high mainly in two places, both visible with `saved_tensors_hooks`: the cross-attention context is counted as
three tensors (k, v and pre-norm k) of 769 tokens in every block, while autograd keeps only k and v (the frozen
projections of a context that needs no gradient save nothing) and none in block 0; and block 0 is counted as a
full block although its self-attention and text/image attention run before any trainable weight. The per-token
activation model is within about 5% of what blocks 1..7 save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench._world import wide_dit_config, write_wide_model
from fantasytalk_cli.models.tiny import TINY_VAE
from fantasytalk_cli.planning.memory import estimate_memory

REPO = Path(__file__).resolve().parents[1]
DIM, LAYERS, FFN = 512, 8, 2048
SIZE, FRAMES = 192, 17
TOLERANCE = 0.25
RESIDENT = ("frozen DiT weights", "trainable weights", "AdamW moments", "frozen encoders", "runtime overhead")
"""Estimate terms already in RSS before a steady-state step starts."""

_CHILD = r"""
import gc, json, resource, sys, threading, time
from pathlib import Path
import psutil, torch
torch.set_num_threads(1)
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import plan_from_metadata
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.models.audio_adapter import audio_windows
from fantasytalk_cli.runtime.flow import FlowSchedule
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.model_setup import load_training_models
from fantasytalk_cli.train.step import StepContext, training_step
from tests.tiny_world import world_config

spec = json.loads(sys.argv[1])
world = {k: Path(v) for k, v in spec["world"].items()}
cfg = world_config(world, Path(spec["out"]), **spec["flags"])
cpu = torch.device("cpu")
models = load_training_models(cfg.model, cfg.train, device=cpu, uniform_dtype=False)
meta = cfg.data.train_data_meta
plan, _, _ = plan_from_metadata(data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=meta)
dataset = ClipBatchDataset(load_entries(cfg.data.train_data_meta), plan, cfg.data.train_data_dir, seed=cfg.train.seed)
batches = list(BucketBatchSampler(plan, batch_size=1, seed=cfg.train.seed))
ctx = StepContext(train=cfg.train, model_cfg=cfg.model, sigmas=FlowSchedule().sigmas(), world=World(),
                  device=cpu, dtype=models.frozen_dtype, autocast=lambda: torch.autocast("cpu", enabled=False),
                  activation_offload=cfg.model.activation_offload)
params = [p for p in models.transformer.parameters() if p.requires_grad]
t = cfg.train
optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                              weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
proc = psutil.Process()

def step(number):
    batch = dataset[batches[number]]
    out = training_step(models.transformer, models.encoders, models.wav2vec, batch, ctx, number)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch

step(0)  # creates the AdamW moments and one-time caches
gc.collect()
before = proc.memory_info().rss
maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak, stop = [before], threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
batch = step(1)
stop.set()
sampler.join()
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
height, width, frames = batch["shape"]
t_lat = (frames - 1) // 4 + 1
window = audio_windows(t_lat, models.wav2vec.num_tokens(len(batch["audio"][0])))[0].shape[1]
print(json.dumps({"before": before, "sampled_peak": peak[0], "maxrss_peak": maxrss if maxrss > maxrss_before else 0,
                  "shape": [height, width, frames], "batch": len(batch["audio"]), "audio_window": window}))
"""


def _measure_step(world: dict[str, Path], out: Path, options: dict[str, object]) -> dict:
    spec = {
        "world": {k: str(v) for k, v in world.items()},
        "out": str(out),
        "flags": {"video_sample_size": SIZE, "video_sample_n_frames": FRAMES, "max_upscale": 2.0, **options},
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning and Linux ru_maxrss units")
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gradient_checkpointing": True},
        {"gradient_checkpointing": True, "base_weights_dtype": "fp8"},
        {"gradient_checkpointing": True, "activation_offload": True},
    ],
    ids=["plain", "checkpointing", "fp8", "activation-offload"],
)
def test_estimate_is_within_25_percent_of_a_measured_step(
    options: dict[str, object], tiny_world: dict, tmp_path: Path
) -> None:
    """Plain, with checkpointing, with fp8 base weights and with activation offload (which on the CPU moves nothing:
    the estimate says so and counts it as off). With checkpointing the DiT step shrinks below the video encode
    (measured 58 MB against 187 MB), so those three compare the encode phase's model: the same peak whatever the
    DiT's options, as measured."""
    kwargs = wide_dit_config(DIM, LAYERS, FFN)
    write_wide_model(tiny_world["model"], tmp_path / "wide_model", kwargs)
    got = _measure_step({**tiny_world, "model": tmp_path / "wide_model"}, tmp_path / "run", options)
    assert got["shape"] == [SIZE, SIZE, FRAMES] and got["batch"] == 1

    est = estimate_memory(
        kwargs,
        (SIZE, SIZE, FRAMES),
        batch_size=1,
        strategy="ddp",
        devices=1,
        mixed_precision="no",
        gradient_checkpointing=bool(options.get("gradient_checkpointing")),
        base_weights_dtype=str(options.get("base_weights_dtype", "bf16")),
        activation_offload=bool(options.get("activation_offload")),
        device="cpu",
        encoders={},  # resident before the step: not compared
        audio_window_tokens=got["audio_window"],
        vae_base_dim=TINY_VAE["base_dim"],
        vae_mini_batch=1,
    )
    step_terms = [term for term in est.terms if not term.name.startswith(RESIDENT)]
    estimated = sum(term.bytes for term in step_terms)
    measured = max(got["sampled_peak"], got["maxrss_peak"]) - got["before"]
    lines = [f"{term.name}: {term.bytes / 1e6:.1f} MB" for term in step_terms]
    report = "\n".join(
        [
            *lines,
            f"estimated step memory {estimated / 1e6:.1f} MB, measured peak RSS increase {measured / 1e6:.1f} MB "
            f"(sampled {(got['sampled_peak'] - got['before']) / 1e6:.1f}, ru_maxrss "
            f"{(got['maxrss_peak'] - got['before']) / 1e6 if got['maxrss_peak'] else float('nan'):.1f}), "
            f"measured / estimated = {measured / estimated:.3f}",
        ]
    )
    print(report)
    assert estimated > 100e6, report  # the step must dominate RSS noise for the comparison to mean anything
    assert abs(measured / estimated - 1) <= TOLERANCE, report
