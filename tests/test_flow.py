"""Flow-matching math: shifted schedule, stratified timesteps over the global batch, loss guard, I2V mask."""

from __future__ import annotations

import math

import pytest
import torch

from fantasytalk_cli.runtime.flow import (
    FlowSchedule,
    add_noise,
    flow_matching_loss,
    i2v_mask,
    loss_weights,
    sample_timestep_indices,
)


def test_shifted_sigmas_follow_the_formula() -> None:
    sigmas = FlowSchedule(1000, 5.0).sigmas()
    assert sigmas.shape == (1000,)
    raw = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)
    assert torch.allclose(sigmas, 5 * raw / (1 + 4 * raw))
    assert sigmas[0] == 1.0 and torch.all(sigmas[:-1] > sigmas[1:])


def _global_draw(seed: int, world: int, local: int) -> list[torch.Tensor]:
    per_rank = []
    for rank in range(world):
        g = torch.Generator().manual_seed(seed)  # the same seed on every rank, as the loop does
        per_rank.append(
            sample_timestep_indices(
                global_batch=world * local,
                rank=rank,
                local_batch=local,
                num_train_timesteps=1000,
                uniform_sampling=True,
                scheme="none",
                generator=g,
            )
        )
    return per_rank


@pytest.mark.parametrize("world,local", [(1, 4), (4, 1), (8, 2)])
def test_uniform_sampling_stratifies_the_global_batch(world: int, local: int) -> None:
    g_size = world * local
    for seed in range(20):
        idx = torch.cat(_global_draw(seed, world, local))
        for k, i in enumerate(sorted(idx.tolist())):  # one sample per stratum of the global batch
            assert math.floor(k * 1000 / g_size) <= i < math.ceil((k + 1) * 1000 / g_size)


def test_uniform_sampling_does_not_tie_rank_zero_to_the_noisiest_slice() -> None:
    firsts = [int(_global_draw(seed, 4, 1)[0][0]) for seed in range(200)]
    assert min(firsts) < 250 and max(firsts) >= 750  # rank 0 sees the whole range over steps


def test_logit_normal_concentrates_in_the_middle() -> None:
    g = torch.Generator().manual_seed(0)
    idx = sample_timestep_indices(
        global_batch=4000,
        rank=0,
        local_batch=4000,
        num_train_timesteps=1000,
        uniform_sampling=False,
        scheme="logit_normal",
        generator=g,
    )
    middle = ((idx > 250) & (idx < 750)).float().mean()
    assert middle > 0.6


def test_loss_weights() -> None:
    s = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(loss_weights(s, "sigma_sqrt"), torch.tensor([4.0, 16.0]))
    assert torch.allclose(loss_weights(s, "cosmap"), (2 / (math.pi * (1 - 2 * s + 2 * s**2))).float())
    assert torch.equal(loss_weights(s, "none"), torch.ones(2))


def test_add_noise_and_target() -> None:
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    xt = add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])


def test_outlier_guard_zeroes_and_counts() -> None:
    target = torch.zeros(2, 10)
    pred = torch.ones(2, 10)
    pred[0, 0] = 100.0
    res = flow_matching_loss(pred, target, torch.ones(2), outlier_threshold=50.0)
    assert res.outliers == 1 and res.elements == 20
    assert torch.isclose(res.loss, torch.tensor((9 / 10 + 10 / 10) / 2))


def test_i2v_mask_layout() -> None:
    m = i2v_mask(9, 2, 3)
    assert m.shape == (4, 3, 2, 3)
    assert torch.all(m[:, 0] == 1) and torch.all(m[:, 1:] == 0)
