"""Audio reliance: does the model use the audio? On each held-out clip, the training loss at fixed, stratified
timesteps and fixed noise, computed three ways: with the clip's own audio, with another held-out clip's audio (a
fixed derangement: clip i takes clip i + 1's, the last the first's) and with the audio off (``audio_scale = 0``).

The **mismatch gap** (loss with the wrong audio minus loss with its own) is positive when the model follows its
audio; the **off gap** (audio off minus own) says how much the audio helps at all. A zero-initialised adapter adds
exactly nothing, so both gaps are exactly 0. Each is reported as the mean over clips with a bootstrap confidence
interval (clips resampled), over the whole latent and, on clips with a face/mouth track, over the mouth's cells.

Everything a clip's numbers depend on is drawn from generators seeded by (seed, the clip's position in the held-out
metadata): the window, the posterior sample, the noise. So a clip scores the same on whichever rank computes it,
and a 2-process validation equals a 1-process `ftalk evaluate` of the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fantasytalk_cli.checkpoints.metrics import MetricRow
from fantasytalk_cli.config.schema import BucketConfig, DataConfig, TrainConfig
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.entry_facts import Share, with_probe_facts
from fantasytalk_cli.data.metadata import MetadataEntry, load_entries, resolve_media_path
from fantasytalk_cli.data.plan import build_plan, facts_from_entries, metadata_hash
from fantasytalk_cli.data.sampler import PlannedBatch
from fantasytalk_cli.data.tracks import latent_weights, read_track
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.audio import Wav2Vec2Features
from fantasytalk_cli.models.encoders import FrozenEncoders
from fantasytalk_cli.runtime.flow import add_noise, i2v_mask, loss_weights
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.step import StepContext, audio_features, stream_seed, text_conditions, video_conditions

CONDITIONS = ("own", "mismatch", "off")
"""The three audio conditions each clip is scored under, in the order of `ClipLosses.losses`' rows."""
EVAL_SEED = 20250407
"""Seed of the held-out clips' windows, posterior samples and noise (not the training seed: never a training draw)."""


class EvaluationError(FtalkUsageError):
    """The held-out data cannot be evaluated as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class HeldOut:
    """The held-out clips, each as a batch of one at its planned bucket, in metadata order."""

    path: Path
    entries: list[MetadataEntry]
    dataset: ClipBatchDataset
    batches: list[PlannedBatch]
    left_out: dict[str, list[int]] = field(default_factory=dict)
    """Entry indices the plan could not use, by reason (too short, too small, ...)."""

    @property
    def tracked(self) -> int:
        return sum(1 for b in self.batches if self.entries[b[0]].extra.get("track"))


def held_out_clips(
    eval_meta: Path,
    data: DataConfig,
    buckets: BucketConfig,
    train: TrainConfig,
    *,
    world: World | None = None,
    share: Share | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> HeldOut:
    """Read, probe and plan ``eval_meta`` with the run's bucket settings (relative paths are joined to the held-out
    file's folder, or to ``data.eval_data_dir``). Needs at least 2 planned clips (one derangement)."""
    eval_data = data.model_copy(update={"train_data_meta": Path(eval_meta), "train_data_dir": data.eval_data_dir})
    entries = load_entries(Path(eval_meta))
    with_probe_facts(entries, eval_data, world or World(), share, say)
    plan = build_plan(
        facts_from_entries(entries),
        buckets,
        train.model_copy(update={"train_batch_size": 1}),
        1,
        metadata_hash=metadata_hash(Path(eval_meta)),
        metadata_path=str(eval_meta),
    )
    assignment = plan.assignment(0)
    batches = []
    for index in np.flatnonzero(assignment >= 0).tolist():
        height, width, frames = plan.bucket_shape(int(assignment[index]))
        batches.append(PlannedBatch([index], bucket=int(assignment[index]), height=height, width=width,
                                    frames=frames, epoch=0, number=index))  # fmt: skip
    left_out = {reason: found.tolist() for reason, found in plan.dropped().items() if len(found)}
    if len(batches) < 2:
        raise EvaluationError(
            f"{eval_meta}: {len(batches)} of {len(entries)} held-out clips can be planned at these bucket settings "
            f"(left out: {left_out or 'none'}); audio reliance needs at least 2 (one clip's audio for another's)"
        )
    dataset = ClipBatchDataset(entries, plan, eval_data.media_root(), seed=EVAL_SEED, policy="fail",
                               fixed_window=True)  # fmt: skip
    return HeldOut(Path(eval_meta), entries, dataset, batches, left_out)


def overlap_with_training(held: HeldOut, training_meta: Path, training_root: Path | None) -> list[str]:
    """Held-out media files that the training metadata also uses (resolved paths), for a warning."""
    train_entries = load_entries(training_meta)
    used = {resolve_media_path(training_root, p).resolve() for e in train_entries for p in (e.file_path, e.audio_path)}
    root = held.dataset.media_root
    return sorted(
        str(path)
        for e in held.entries
        for path in (resolve_media_path(root, e.file_path).resolve(), resolve_media_path(root, e.audio_path).resolve())
        if path in used
    )


def stratified_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """Indices into the (noisiest-first) schedule at the middle of ``count`` equal strata."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


@dataclass(frozen=True)
class ClipLosses:
    """One held-out clip's losses: ``losses[c, k]`` under condition ``CONDITIONS[c]`` at timestep k; ``mouth`` the
    same over its mouth cells (None without a track)."""

    position: int
    losses: np.ndarray
    mouth: np.ndarray | None


def clip_losses(
    model: torch.nn.Module,
    encoders: FrozenEncoders,
    wav2vec: Wav2Vec2Features | None,
    held: HeldOut,
    positions: Sequence[int],
    ctx: StepContext,
    *,
    timesteps: int = 8,
) -> list[ClipLosses]:
    """The losses of the held-out clips at ``positions`` (indices into ``held.batches``), in no_grad."""
    schedule = stratified_timesteps(ctx.sigmas.numel(), timesteps)
    out = []
    with torch.no_grad():
        for position in positions:
            out.append(_one_clip(model, encoders, wav2vec, held, position, ctx, schedule))
    return out


def _one_clip(
    model: torch.nn.Module,
    encoders: FrozenEncoders,
    wav2vec: Wav2Vec2Features | None,
    held: HeldOut,
    position: int,
    ctx: StepContext,
    schedule: list[int],
) -> ClipLosses:
    device, planned = ctx.device, held.batches[position]
    index = planned[0]
    batch = held.dataset[planned]
    donor = held.dataset[held.batches[(position + 1) % len(held.batches)]]
    generator = torch.Generator().manual_seed(stream_seed(EVAL_SEED, index))
    frames = planned.frames
    with encoders.on(device):
        video = video_conditions(encoders, batch, device)
        eps = torch.randn(video.mean.shape, generator=generator, dtype=video.mean.dtype).to(device)
        latents = video.mean.to(device) + video.std.to(device) * eps
        mask = i2v_mask(frames, latents.shape[-2], latents.shape[-1], device=device)
        y = torch.cat([mask.unsqueeze(0), video.first.to(device)], dim=1)
        text = text_conditions(encoders, batch, torch.zeros(1, dtype=torch.bool)).to(device)
        image = video.image.to(device)
        own = audio_features(wav2vec, batch["audio"], device, batch.get("audio_cache"))
        other = audio_features(wav2vec, donor["audio"], device, donor.get("audio_cache"))
    other = F.interpolate(other.transpose(1, 2), size=own.shape[1], mode="linear").transpose(1, 2)
    mouth = _mouth_cells(held, planned, device)
    scale = ctx.model_cfg.audio_scale
    conditions = [(own, scale), (other, scale), (own, 0.0)]
    losses = np.zeros((len(CONDITIONS), len(schedule)))
    mouth_losses = np.zeros_like(losses) if mouth is not None else None
    for k, idx in enumerate(schedule):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        sigma = ctx.sigmas[idx : idx + 1]
        noisy = add_noise(latents, noise, sigma.to(device))
        target = (noise - latents).float()
        weight = float(loss_weights(sigma, ctx.train.weighting_scheme)[0])
        for c, (audio, audio_scale) in enumerate(conditions):
            inputs = {
                "hidden_states": torch.cat([noisy, y], dim=1).to(ctx.dtype),
                "timestep": (sigma * 1000).to(device, torch.float32),
                "encoder_hidden_states": text.to(ctx.dtype),
                "encoder_hidden_states_image": image.to(ctx.dtype),
                "audio_features": audio.to(ctx.dtype),
                "audio_scale": torch.full((1,), audio_scale, device=device),
            }
            with ctx.autocast():
                pred = model(**inputs)[0]
            sq = (pred.float() - target) ** 2
            losses[c, k] = weight * sq.mean().item()
            if mouth_losses is not None and mouth is not None:
                cells = sq.mean(dim=1)[0]  # [T_lat, h, w], channels averaged
                mouth_losses[c, k] = weight * (cells * mouth).sum().item() / mouth.sum().item()
    return ClipLosses(position, losses, mouth_losses)


def _mouth_cells(held: HeldOut, planned: PlannedBatch, device: torch.device) -> torch.Tensor | None:
    """[T_lat, h, w] 0/1: the latent cells of the clip's mouth boxes (None without a track, or an empty mouth)."""
    entry = held.entries[planned[0]]
    track = entry.extra.get("track")
    if not track:
        return None
    window = held.dataset.window(planned[0], planned)
    path = resolve_media_path(held.dataset.media_root, str(track))
    weights = latent_weights(read_track(path), window.frame_indices, planned.height, planned.width,
                             face_weight=0.0, lip_weight=1.0)  # fmt: skip
    cells = torch.from_numpy(weights - 1.0).to(device)
    return cells if cells.sum() > 0 else None


@dataclass(frozen=True)
class Estimate:
    """A mean over clips with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int


def bootstrap_mean(
    values: np.ndarray, *, seed: int = EVAL_SEED, resamples: int = 2000, level: float = 0.95
) -> Estimate:
    """The mean of ``values`` (one per clip) and the percentile interval of the means of ``resamples`` resamples of
    the clips with replacement (seeded: the same clips give the same interval)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(values.mean()), float(low), float(high), len(values))


@dataclass(frozen=True)
class RelianceReport:
    """The held-out clips' audio reliance: metric name -> estimate (`metrics`), and what was left out."""

    metrics: dict[str, Estimate]
    clips: int
    mouth_clips: int
    left_out: dict[str, list[int]]

    def lines(self) -> list[str]:
        """One line per metric, for a terminal or a log."""
        return [f"{name:<20} {e.value:+.6f}  95% CI [{e.low:+.6f}, {e.high:+.6f}]  ({e.n} clips)"
                for name, e in self.metrics.items()]  # fmt: skip

    def rows(self, step: int, checkpoint: str | None, source: str) -> list[MetricRow]:
        """One `metrics.jsonl` row per metric."""
        return [MetricRow(step=step, metric=name, value=e.value, low=e.low, high=e.high, n=e.n,
                          checkpoint=checkpoint, source=source)
                for name, e in self.metrics.items()]  # fmt: skip


def reliance_report(results: Sequence[ClipLosses], left_out: dict[str, list[int]]) -> RelianceReport:
    """Means over timesteps per clip, then over clips with bootstrap intervals: `loss` (own audio),
    `audio_gap` (mismatch - own), `audio_off_gap` (off - own), and the `mouth_` versions on tracked clips."""
    ordered = sorted(results, key=lambda r: r.position)
    per_clip = np.stack([r.losses.mean(axis=1) for r in ordered])  # [clips, 3]
    metrics = {
        "loss": bootstrap_mean(per_clip[:, 0]),
        "audio_gap": bootstrap_mean(per_clip[:, 1] - per_clip[:, 0]),
        "audio_off_gap": bootstrap_mean(per_clip[:, 2] - per_clip[:, 0]),
    }
    mouths = [r.mouth.mean(axis=1) for r in ordered if r.mouth is not None]
    if mouths:
        mouth = np.stack(mouths)
        metrics["mouth_loss"] = bootstrap_mean(mouth[:, 0])
        metrics["mouth_audio_gap"] = bootstrap_mean(mouth[:, 1] - mouth[:, 0])
        metrics["mouth_audio_off_gap"] = bootstrap_mean(mouth[:, 2] - mouth[:, 0])
    return RelianceReport(metrics, len(ordered), len(mouths), left_out)
