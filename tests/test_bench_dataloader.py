"""bench/dataloader.py runs (demo data, one repeat) and prints its per-stage table with the ratio."""

from __future__ import annotations

import re

import pytest

from bench import dataloader


@pytest.mark.slow
def test_dataloader_bench_prints_its_stages_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    dataloader.main(["--repeats", "1", "--demo-clips", "4", "--mix-clips", "0", "--large-clips", "0"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("data set"))
    for part in dataloader.PARTS:
        assert part in header
    row = next(line for line in out.splitlines() if line.startswith("demo"))
    ratio = float(re.search(r"(\d+\.\d+)x \((met|missed)\)", row).group(1))  # type: ignore[union-attr]
    assert 0.3 < ratio < 5  # a ratio of two measured times, not a constant
