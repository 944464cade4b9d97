"""Run under torchrun: build the accelerator for the strategy in the environment, train a toy model
with a frozen and a trainable part for two steps, save state, gather the trainable weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.dist import gloo_patch

gloo_patch.apply()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from fantasytalk_cli.config.schema import CheckpointConfig, DistConfig, TrainConfig  # noqa: E402
from fantasytalk_cli.train.distributed import build_accelerator, gather_trainable_state  # noqa: E402


class AudioAttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.processor = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.processor(self.frozen(x))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([AudioAttentionBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _record_summons() -> list[dict]:
    """FSDP1: record every `summon_full_params` call (the unit and whether it recursed)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    calls: list[dict] = []
    real = FSDP.summon_full_params

    def summon(module, recurse=True, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append({"unit": type(module.module).__name__, "recurse": recurse})
        return real(module, recurse=recurse, **kwargs)

    FSDP.summon_full_params = staticmethod(summon)
    return calls


def main(out: Path) -> None:
    train = TrainConfig(mixed_precision="no", max_grad_norm=0.05)
    accelerator, strategy = build_accelerator(DistConfig(), train, CheckpointConfig(output_dir=out), None)
    torch.manual_seed(0)
    model = Toy()
    for n, p in model.named_parameters():
        p.requires_grad_("processor." in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    rank, world = accelerator.process_index, accelerator.num_processes
    for _ in range(2):
        x = torch.randn(4, 8, generator=g)  # one global batch, each rank takes its slice
        x = x[rank * 4 // world : (rank + 1) * 4 // world]
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        # DeepSpeed clips inside its step (gradient_clipping from max_grad_norm); the others here
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
        opt.step()
        opt.zero_grad()
    accelerator.save_state(str(out / "state"))
    summons = _record_summons() if strategy.fsdp_version == 1 else []
    weights = gather_trainable_state(accelerator, model, strategy)
    if accelerator.is_main_process:
        info = {
            "strategy": strategy.name,
            "fsdp_version": strategy.fsdp_version,
            "notes": list(strategy.notes),
            "names": sorted(weights),
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "model_type": type(model).__name__,
            "summons": summons,
        }
        (out / "info.json").write_text(json.dumps(info))
        save_file(weights, str(out / "trainable.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    from tests.dist.launch import exit_now

    main(Path(sys.argv[1]))
    exit_now(0)
