"""`audio_windows` reproduces FantasyTalking's window arithmetic exactly (`docs/model.md#audio-windows`)."""

from __future__ import annotations

import random

import pytest
import torch

from fantasytalk_cli.models.audio_adapter import audio_windows


def _formula_windows(num_latent_frames: int, audio_len: int, expand: int = 4, centre_as_sum: bool = True):
    """The windows written straight from the formula, in plain Python: [(in-range positions, padding count)].

    ``centre_as_sum=False`` is the algebraically equal but differently rounded ``int(tpf*(a+b)/2) - 1``.
    """
    num_frames = 4 * (num_latent_frames - 1) + 1
    tpf = audio_len / num_frames
    half = int(2 * tpf)
    ranges = []
    for i in range(1, num_latent_frames):
        a, b = (i - 1) * 4 + 1, i * 4 + 1
        centre = int((tpf * a + tpf * b) / 2) - 1 if centre_as_sum else int(tpf * (a + b) / 2) - 1
        ranges.append((centre - half, centre + half))
    ranges.insert(0, (-(half * 2 - ranges[0][0]), ranges[0][0]))
    windows = []
    for lo, hi in ranges:
        lo, hi = lo - expand, hi + expand
        inside = [p for p in range(lo, hi + 1) if 0 <= p <= audio_len - 1]
        windows.append((inside, (hi - lo + 1) - len(inside)))
    return windows


def _as_formula(indices: torch.Tensor, valid: torch.Tensor):
    """`audio_windows` output in the shape of `_formula_windows`, checking valid slots come first."""
    windows = []
    for row, ok in zip(indices.tolist(), valid.tolist(), strict=True):
        count = sum(ok)
        assert ok == [True] * count + [False] * (len(ok) - count), "padding slots must be at the end"
        windows.append((row[:count], len(ok) - count))
    return windows


def _random_pairs(count: int) -> list[tuple[int, int]]:
    rng = random.Random(20250601)
    return [(rng.randint(2, 40), rng.randint(1, 3000)) for _ in range(count)]


def test_example_81_frames_175_tokens() -> None:
    indices, valid = audio_windows(21, 175)
    assert indices.shape == valid.shape == (21, 17)
    assert indices.dtype == torch.long and valid.dtype == torch.bool
    assert valid.sum(dim=1).tolist() == [6, 14] + [17] * 18 + [14]
    assert indices[0, :6].tolist() == list(range(6))  # range [-11, 5]: front overflow padded at the end
    assert indices[20, :14].tolist() == list(range(161, 175))
    assert not indices[~valid].any(), "padding slots index token 0"


@pytest.mark.parametrize("expand", [4, 0, 2])
def test_matches_formula_on_random_lengths(expand: int) -> None:
    pairs = _random_pairs(1200) if expand == 4 else _random_pairs(300)
    for num_latent_frames, audio_len in pairs:
        got = _as_formula(*audio_windows(num_latent_frames, audio_len, expand))
        assert got == _formula_windows(num_latent_frames, audio_len, expand), (num_latent_frames, audio_len)


def test_summation_order_matters_and_is_caught() -> None:
    """`tpf*(a+b)/2` rounds differently for some lengths; the comparison above would flag such an implementation."""
    differing = [
        pair
        for pair in _random_pairs(1200)
        if _formula_windows(*pair, centre_as_sum=False) != _formula_windows(*pair, centre_as_sum=True)
    ]
    assert len(differing) >= 5, "the random sample must contain lengths where the two orders disagree"
    for pair in differing:
        assert _as_formula(*audio_windows(*pair)) != _formula_windows(*pair, centre_as_sum=False)
    # A pinned 81-frame case: 183 tokens (about 3.7 s of audio).
    assert _as_formula(*audio_windows(21, 183)) != _formula_windows(21, 183, centre_as_sum=False)


def test_rejects_degenerate_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        audio_windows(1, 100)
    with pytest.raises(ValueError, match="audio_len"):
        audio_windows(21, 0)
    with pytest.raises(ValueError, match="expand_length"):
        audio_windows(21, 175, -1)
