"""Flow-matching math of Wan training (`docs/training.md#flow-matching-schedule`): shifted sigmas, timestep sampling,
noising, loss weighting and the outlier-guarded loss. Pure functions over explicit generators."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fantasytalk_cli.config.schema import ModelConfig, WeightingScheme
from fantasytalk_cli.config.wan_yaml import load_wan_yaml


@dataclass(frozen=True)
class FlowSchedule:
    """The discrete training schedule: `num_train_timesteps` shifted sigmas, noisiest first."""

    num_train_timesteps: int = 1000
    shift: float = 5.0

    @classmethod
    def of(cls, model: ModelConfig) -> FlowSchedule:
        """The schedule of the model config (`--config_path`, else Wan2.1's defaults)."""
        sched = load_wan_yaml(model.config_path).scheduler_kwargs
        return cls(num_train_timesteps=sched.num_train_timesteps, shift=sched.shift)

    def sigmas(self) -> torch.Tensor:
        """Shifted sigmas s*sigma / (1 + (s-1)*sigma) for sigma = 1000/1000 ... 1/1000 (float64)."""
        n = self.num_train_timesteps
        sigma = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)


def density_u(
    n: int, scheme: WeightingScheme, generator: torch.Generator, logit_mean: float, logit_std: float, mode_scale: float
) -> torch.Tensor:
    """Points in [0, 1) drawn from the timestep density of `scheme` (SD3's sampling densities)."""
    if scheme == "logit_normal":
        u = torch.normal(logit_mean, logit_std, size=(n,), generator=generator, dtype=torch.float64).sigmoid()
    elif scheme == "mode":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return u.clamp(0.0, 1.0 - 1e-12)


def sample_timestep_indices(
    *,
    global_batch: int,
    rank: int,
    local_batch: int,
    num_train_timesteps: int,
    uniform_sampling: bool,
    scheme: WeightingScheme,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Schedule indices for this rank's `local_batch` samples.

    Every rank draws the whole global batch from a generator seeded identically on all ranks and
    keeps its own slice, so `uniform_sampling` stratifies over the GLOBAL batch: sample k of the
    global batch falls in stratum k of [0, 1), and the strata are shuffled over the ranks (the
    reference ties rank 0 to the noisiest slice).
    """
    if uniform_sampling:
        offsets = torch.rand(global_batch, generator=generator, dtype=torch.float64)
        u = (torch.arange(global_batch, dtype=torch.float64) + offsets) / global_batch
        u = u[torch.randperm(global_batch, generator=generator)]
    else:
        u = density_u(global_batch, scheme, generator, logit_mean, logit_std, mode_scale)
    idx = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return idx[rank * local_batch : (rank + 1) * local_batch]


def loss_weights(sigmas: torch.Tensor, scheme: WeightingScheme) -> torch.Tensor:
    """Per-sample loss weights (SD3): `sigma_sqrt` = sigma^-2, `cosmap` = 2 / (pi (1 - 2s + 2s^2))."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return (2 / (math.pi * bot)).float()
    return torch.ones_like(sigmas, dtype=torch.float32)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, sigma broadcast per sample."""
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


@dataclass(frozen=True)
class LossResult:
    """The averaged loss and how many elements the outlier guard zeroed."""

    loss: torch.Tensor
    outliers: int
    elements: int


def flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    outlier_threshold: float,
    cell_weights: torch.Tensor | None = None,
) -> LossResult:
    """Weighted MSE in fp32; elements with |error| > threshold are zeroed before averaging, and counted.
    ``cell_weights`` [B, T_lat, h, w] (the face/lip regions, `data.tracks`) weigh each latent cell, every channel
    alike; None is the plain loss."""
    err = pred.float() - target.float()
    keep = err.abs() <= outlier_threshold
    sq = torch.where(keep, err, torch.zeros_like(err)) ** 2
    if cell_weights is not None:
        sq = sq * cell_weights.float().unsqueeze(1)
    w = weights.float().view(-1, *([1] * (sq.dim() - 1)))
    per_sample = (w * sq).reshape(sq.shape[0], -1).mean(dim=1)
    return LossResult(per_sample.mean(), int((~keep).sum().item()), keep.numel())


def i2v_mask(num_frames: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """The 4 mask channels of Wan I2V: frame 0 known (1), others 0; frame 0 repeated 4x, then folded
    into [4, T_lat, h, w] with T_lat = (num_frames - 1) / 4 + 1 (`height`/`width` are latent sizes)."""
    msk = torch.zeros(num_frames, height, width, device=device)
    msk[0] = 1
    msk = torch.cat([msk[:1].repeat(4, 1, 1), msk[1:]], dim=0)  # [F + 3, h, w]
    return msk.view((num_frames + 3) // 4, 4, height, width).transpose(0, 1).contiguous()
