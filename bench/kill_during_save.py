"""The kill -9 campaign, as users can rerun it: `ftalk train` is killed with SIGKILL at a chosen point inside a
checkpoint save, then resumed with `--resume_from_checkpoint latest`; the resumed run must end with weights
bitwise equal to an uninterrupted run's, and no `checkpoint-N/` may ever be partial.

Each trial runs `ftalk train` (tiny world, 6 steps, a checkpoint every 2) in its own process with the save's
file operations counted: the temporary folder made, every `torch.save` (accelerate's optimizer, scheduler
and RNG files, the released `.ckpt`), the safetensors weights, the atomic text writes (`run_state.json`,
`meta.json`, `latest`), the manifest, the folder swapped into place. Trial k kills the process at the
k-th such operation of all saves (by default one trial per operation, so every stage of every save is hit), before
the operation runs. After the kill: every `checkpoint-N/` must verify against its manifest (a partial one is
a failure), `latest` must name a verified checkpoint (or none yet), and the resumed run's `checkpoint-6`
weights must equal the baseline's, the same run measured uninterrupted in this process.

Run from the repository root: ``.venv/bin/python -m bench.kill_during_save [--trials N]`` (about 15 s a trial on
2 cores); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

from bench._world import build_world
from fantasytalk_cli.checkpoints.folder import LATEST_NAME, list_checkpoints
from fantasytalk_cli.checkpoints.manifest import verify_manifest
from tests.tiny_world import world_argv

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2

KILLER = """
import os, signal, sys, torch
import fantasytalk_cli.train.checkpoint as ckpt
target = int(os.environ["FTALK_KILL_AT"])
seen = {"n": 0, "saving": False}
def counted(label, real):
    def call(*args, **kwargs):
        if seen["saving"]:
            seen["n"] += 1
            if seen["n"] == target:
                print(f"KILLED-AT {label}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
real_save = ckpt.save_training_checkpoint
def save(*args, **kwargs):
    seen["saving"] = True
    try:
        return real_save(*args, **kwargs)
    finally:
        seen["saving"] = False
import fantasytalk_cli.train.loop as loop
loop.save_training_checkpoint = save
torch.save = counted("torch.save", torch.save)
ckpt.save_file = counted("safetensors", ckpt.save_file)
ckpt.write_text_atomic = counted("text write", ckpt.write_text_atomic)
ckpt.write_manifest = counted("manifest", ckpt.write_manifest)
ckpt.swap_folder = counted("folder into place", ckpt.swap_folder)
import atexit
atexit.register(lambda: print(f"SAVE-OPERATIONS {seen['n']}", flush=True))
from fantasytalk_cli.cli import main
main(sys.argv[1:])
"""


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", KILLER, "train", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=0, help="kills (default: one at every save operation)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftalk-kill-"))
    world = build_world(root / "world")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FTALK_KILL_AT": "0"}
    t0 = time.perf_counter()
    base = run(world_argv(world, root / "baseline", max_train_steps=STEPS, checkpointing_steps=EVERY), env)
    if base.returncode != 0:
        print(base.stdout[-2000:], base.stderr[-2000:])
        return 1
    baseline_s = time.perf_counter() - t0
    ops = int(next(line.split()[1] for line in base.stdout.splitlines() if line.startswith("SAVE-OPERATIONS")))
    trials = args.trials or ops
    reference = load_file(root / "baseline" / f"checkpoint-{STEPS}" / "trainable.safetensors")
    rows: Counter[tuple[str, str]] = Counter()
    failures: list[str] = []
    for trial in range(1, trials + 1):
        out = root / f"trial-{trial}"
        killed = run(world_argv(world, out, max_train_steps=STEPS, checkpointing_steps=EVERY),
                     {**env, "FTALK_KILL_AT": str((trial - 1) % ops + 1)})  # fmt: skip
        stage = next((line.split(" ", 1)[1] for line in killed.stdout.splitlines() if line.startswith("KILLED-AT")), "")
        if killed.returncode != -signal.SIGKILL:
            rows[("(no kill: fewer operations)", "-")] += 1
            continue
        partial = [str(p) for _, p in list_checkpoints(out) if verify_manifest(p) is not None]
        named = (out / LATEST_NAME).read_text().strip() if (out / LATEST_NAME).is_file() else None
        if named is not None and verify_manifest(out / named) is not None:
            partial.append(f"latest -> {named}")
        resumed = run(world_argv(world, out, max_train_steps=STEPS, checkpointing_steps=EVERY,
                                 resume_from_checkpoint="latest"), env)  # fmt: skip
        final = out / f"checkpoint-{STEPS}" / "trainable.safetensors"
        exact = resumed.returncode == 0 and final.is_file()
        if exact:
            weights = load_file(final)
            exact = weights.keys() == reference.keys() and all(weights[k].equal(reference[k]) for k in reference)
        verdict = "exact" if exact and not partial else "FAILED"
        rows[(stage, verdict)] += 1
        if verdict == "FAILED":
            failures.append(f"trial {trial} ({stage}): partial={partial} resumed rc={resumed.returncode}")
    kills = sum(n for (stage, _), n in rows.items() if not stage.startswith("(no kill"))
    print(f"\nkill -9 during checkpoint saves: {kills} kills in {trials} trials, tiny world, {STEPS} steps")
    print(f"baseline (uninterrupted run): {baseline_s:.1f} s, {ops} file operations in its {STEPS // EVERY} saves\n")
    print(f"{'killed just before':<30} {'verdict':<8} {'trials':>6}")
    for (stage, verdict), n in sorted(rows.items()):
        print(f"{stage:<30} {verdict:<8} {n:>6}")
    print(f"\npartial checkpoints: {sum(1 for f in failures if 'partial=[]' not in f)}; "
          f"resumed runs equal to the baseline: {kills - len(failures)} of {kills}")  # fmt: skip
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
