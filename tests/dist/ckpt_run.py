"""Run under torchrun: train the tiny FantasyTalking transformer (base from a tiny model folder, adapter trainable)
for two AdamW steps under the strategy in the environment, then save it twice:

- ``OUT/run/checkpoint-2/`` through `save_training_checkpoint` (our layout, frozen weights excluded under ZeRO);
- ``OUT/reference/checkpoint-2/``: accelerate's ``save_state`` straight into the folder, frozen weights included,
  as the reference trainer writes it.

Usage: ``torchrun --nproc_per_node 2 -m tests.dist.ckpt_run OUT BASE_MODEL_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.dist import gloo_patch

gloo_patch.apply()

import torch  # noqa: E402

from fantasytalk_cli.config.schema import CheckpointConfig, DistConfig, TrainConfig  # noqa: E402
from fantasytalk_cli.models.dit_loading import load_transformer  # noqa: E402
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS, TINY_DIT  # noqa: E402
from fantasytalk_cli.models.trainable import set_trainable  # noqa: E402
from fantasytalk_cli.checkpoints.folder import CheckpointMeta  # noqa: E402
from fantasytalk_cli.train.checkpoint import save_training_checkpoint  # noqa: E402
from fantasytalk_cli.train.distributed import build_accelerator  # noqa: E402

TRAINABLE = ["processor.", "proj_model."]
STEPS = 2
GLOBAL_BATCH = 2


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "hidden_states": torch.randn(GLOBAL_BATCH, TINY_DIT["in_channels"], 2, 4, 4, generator=g),
        "timestep": torch.rand(GLOBAL_BATCH, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(GLOBAL_BATCH, 16, TINY_DIT["text_dim"], generator=g),
        "encoder_hidden_states_image": torch.randn(GLOBAL_BATCH, 257, TINY_DIT["image_dim"], generator=g),
        "audio_features": torch.randn(GLOBAL_BATCH, 20, TINY_DIT["audio_in_dim"], generator=g),
    }


def main(out: Path, base: Path) -> None:
    train = TrainConfig(mixed_precision="no", max_grad_norm=1.0)
    run_dir = out / "run"
    accelerator, strategy = build_accelerator(DistConfig(), train, CheckpointConfig(output_dir=run_dir), None)
    model = load_transformer(base, **TINY_AUDIO_DIMS)
    model.train()
    set_trainable(model, TRAINABLE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.03)
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(STEPS):
        batch = {
            k: v[rank * GLOBAL_BATCH // world : (rank + 1) * GLOBAL_BATCH // world] for k, v in _batch(step).items()
        }
        loss = model(**batch)[0].pow(2).mean()
        accelerator.backward(loss)
        # DeepSpeed clips inside its step (gradient_clipping from max_grad_norm); the others here
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
        opt.step()
        opt.zero_grad()
    meta = CheckpointMeta(
        step=STEPS,
        epoch=0,
        config_hash="test",
        config={"model": {"trainable_modules": TRAINABLE, "pretrained_model_name_or_path": str(base)}},
        strategy=strategy.name,
        world_size=world,
    )
    save_training_checkpoint(accelerator, model, strategy, run_dir, meta, None, {"step": 2})
    accelerator.save_state(str(out / "reference" / f"checkpoint-{STEPS}"))
    if accelerator.is_main_process:
        info = {"strategy": strategy.name, "fsdp_version": strategy.fsdp_version, "world": world}
        (out / "info.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    from tests.dist.launch import exit_now

    main(Path(sys.argv[1]), Path(sys.argv[2]))
    exit_now(0)
