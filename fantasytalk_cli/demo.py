"""`ftalk demo`: the whole pipeline on the embedded tiny world, on the CPU.

Steps, each the same library call its command makes: synthetic clips. (Validation, planning,
training and conversion join as they land.)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fantasytalk_cli.data.synthetic import make_demo_dataset


@dataclass
class DemoResult:
    """What the demo did and how long each step took."""

    work_dir: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, name: str, started: float, detail: str) -> None:
        self.steps.append((name, time.perf_counter() - started, detail))


def run_demo(work_dir: Path, seed: int = 0, fresh: bool = True) -> DemoResult:
    """Run every built step of the pipeline in `work_dir` (replaced when `fresh`)."""
    if fresh and work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(work_dir)

    started = time.perf_counter()
    data = make_demo_dataset(work_dir / "data", seed=seed, num_clips=12, overwrite=True)
    result.add("make-demo-data", started, f"{len(data.clips)} clips in {data.out_dir}")
    return result
