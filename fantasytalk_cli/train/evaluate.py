"""The loss on a fixed evaluation batch: the same clips, noise and timesteps every time, no condition
dropout, so two adapters (before and after training) are compared on equal terms. The loss of the
first and last training steps is not such a comparison: they see different clips, noise and timesteps."""

from __future__ import annotations

import torch

from fantasytalk_cli.config.schema import BucketConfig, DataConfig, ModelConfig, TrainConfig
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import facts_from_entries, plan_from_metadata
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.train.model_setup import load_training_models
from fantasytalk_cli.train.setup import cpu_step_context
from fantasytalk_cli.train.step import training_step

EVAL_SEED = 123
EVAL_STEP = 10**6
"""The step number the evaluation batch's noise and timesteps are drawn for (never a training step)."""


def fixed_batch_loss(
    data: DataConfig,
    buckets: BucketConfig,
    model: ModelConfig,
    train_cfg: TrainConfig,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    batches: int = 2,
    batch_size: int = 2,
) -> float:
    """Mean loss of the first `batches` planned batches (seed `EVAL_SEED`) on the CPU in fp32, with the
    configured adapter, or with `weights` (trainable tensors, e.g. a checkpoint's) loaded over it. The
    metadata must carry probe facts (`validate-metadata --write-clean`)."""
    assert data.train_data_meta is not None
    train = train_cfg.model_copy(
        update={
            "text_dropout": 0.0,
            "image_dropout": 0.0,
            "audio_dropout": 0.0,
            "train_batch_size": batch_size,
            "mixed_precision": "no",
        }
    )
    models = load_training_models(model, train, device=torch.device("cpu"), uniform_dtype=False)
    if weights is not None:
        models.transformer.load_state_dict(weights, strict=False)
    entries = load_entries(data.train_data_meta)
    plan, _, _ = plan_from_metadata(
        data=data,
        buckets=buckets,
        train=train_cfg,
        metadata_path=data.train_data_meta,
        facts=facts_from_entries(entries),
    )
    sampler = BucketBatchSampler(plan, batch_size=batch_size, seed=EVAL_SEED)
    dataset = ClipBatchDataset(entries, plan, data.media_root(), seed=EVAL_SEED)
    ctx = cpu_step_context(train, model, torch.float32)
    losses = []
    with torch.no_grad():
        for number, batch in enumerate(sampler):
            if number == batches:
                break
            out = training_step(
                models.transformer.eval(), models.encoders, models.wav2vec, dataset[batch], ctx, EVAL_STEP
            )
            losses.append(out.loss.item())
    if not losses:
        raise ValueError("no full evaluation batch: the metadata plans fewer than two clips into one bucket")
    return sum(losses) / len(losses)
