"""bench/cache.py runs at its smallest settings (tiny world, two steps, one run per setting): both settings in the
table, the cached run loads no encoder and misses nothing, both train to the same weights, and the 14B estimate
is smaller with a complete cache."""

from __future__ import annotations

import re

import pytest

from bench import cache as bench_cache

NUMBERS = re.compile(r"(\d+\.\d+)\s+(\d+\.\d+)\s+([+-]\d+\.\d+)\s")
"""no cache GB, cached GB, difference GB of a 14B estimate row."""


@pytest.mark.slow
def test_runs_at_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    bench_cache.main(["--steps", "2", "--warmup", "0", "--repeats", "1", "--skip-mid"])
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("tiny ") and "world" not in line}
    assert set(rows) == {"online", "cached"}, out
    assert "umT5" in rows["online"] and "wav2vec2" in rows["online"] and "VAE" in rows["online"]
    cached = rows["cached"].split()
    assert cached[-1] == "none" and cached[-2] == "none", rows["cached"]  # no cache miss, no encoder loaded
    assert all(float(row.split()[3]) > 0 for row in rows.values())  # s/step
    assert "identical losses: yes; bitwise-equal trained weights: yes" in out
    estimates = {line.split(" 512x512x81")[0].strip(): NUMBERS.search(line) for line in out.splitlines()
                 if "512x512x81" in line and NUMBERS.search(line)}  # fmt: skip
    assert set(estimates) == {"seed recipe", "seed recipe, low_vram off"}, out
    for found in estimates.values():
        assert found is not None
        without, cached_gb, diff = (float(v) for v in found.groups())
        assert cached_gb < without and diff < 0
    low_vram_off = next(line for line in out.splitlines() if line.startswith("seed recipe, low_vram off"))
    assert "frozen encoders" in low_vram_off and "-> 0.00" in low_vram_off
    assert "plan-buckets: memory estimated without the encoders the cache stands for (audio, text, video)" in out
