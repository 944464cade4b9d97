"""Which memory options make a bucket fit a GPU: each combination of `--base_weights_dtype` and
`--activation_offload` estimated, and the cheapest that fits chosen in a fixed order of cost."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fantasytalk_cli.config.schema import ModelConfig, TrainConfig
from fantasytalk_cli.planning.memory import RISK_FRACTION, MemoryEstimate, estimate_memory
from fantasytalk_cli.planning.model_size import encoders_in_use
from fantasytalk_cli.runtime.memory_options import BLOCK_OFFLOAD_REFUSED, FP8_REFUSED, SHARDING_STRATEGIES


@dataclass(frozen=True)
class MemoryOptions:
    """One combination of the memory options."""

    base_weights_dtype: str = "bf16"
    activation_offload: bool = False
    blocks_to_offload: int = 0

    def label(self) -> str:
        parts = ["fp8 weights" if self.base_weights_dtype == "fp8" else "bf16 weights"]
        if self.activation_offload:
            parts.append("activation offload")
        if self.blocks_to_offload:
            parts.append(f"{self.blocks_to_offload} blocks offloaded")
        return " + ".join(parts)

    def flags(self) -> str:
        """The command-line flags that choose it."""
        flags = [f"--base_weights_dtype {self.base_weights_dtype}"] if self.base_weights_dtype == "fp8" else []
        flags += ["--activation_offload"] if self.activation_offload else []
        flags += [f"--blocks_to_offload {self.blocks_to_offload}"] if self.blocks_to_offload else []
        return " ".join(flags) or "(none)"

    def cost(self) -> tuple[int, int]:
        """Sort key, cheapest first: fewest offloaded blocks, then `OPTION_ORDER`."""
        base = MemoryOptions(self.base_weights_dtype, self.activation_offload)
        return self.blocks_to_offload, OPTION_ORDER.index(base)


OPTION_ORDER = (
    MemoryOptions("bf16", False),
    MemoryOptions("bf16", True),
    MemoryOptions("fp8", False),
    MemoryOptions("fp8", True),
)
"""Cheapest first: no option; then activation offload (costs host-device copies, not precision); then fp8 weights
(costs precision), without and with offload. bf16 is chosen whenever it fits."""


def cheapest_fitting(
    totals: Mapping[MemoryOptions, int], capacity_bytes: int, *, fraction: float = RISK_FRACTION
) -> MemoryOptions | None:
    """The cheapest combination (`MemoryOptions.cost`: fewest offloaded blocks, then bf16 before fp8) whose total
    is within ``fraction`` of the capacity (combinations absent from ``totals`` cannot run with the strategy); None
    when none fits."""
    for options in sorted(totals, key=MemoryOptions.cost):
        if totals[options] <= fraction * capacity_bytes:
            return options
    return None


def estimates_by_option(
    estimate: Callable[[MemoryOptions], MemoryEstimate], *, fp8_allowed: bool, max_blocks: int = 0
) -> dict[MemoryOptions, MemoryEstimate]:
    """``estimate(options)`` for every combination the strategy can run, with 0..``max_blocks`` blocks offloaded
    (0 where the strategy places the weights itself)."""
    return {
        MemoryOptions(opt.base_weights_dtype, opt.activation_offload, blocks): estimate(
            MemoryOptions(opt.base_weights_dtype, opt.activation_offload, blocks)
        )
        for blocks in range(max_blocks + 1)
        for opt in OPTION_ORDER
        if fp8_allowed or opt.base_weights_dtype != "fp8"
    }


def fit_warning(
    estimate: Callable[[MemoryOptions], MemoryEstimate],
    chosen: MemoryOptions,
    capacity_bytes: int,
    *,
    fp8_allowed: bool,
    max_blocks: int = 0,
) -> str | None:
    """What `train` says before its first step when the largest bucket's estimate with the chosen options exceeds
    the safe share of the device (None when it fits), with the cheapest options that would."""
    mine = estimate(chosen)
    if mine.total_bytes <= RISK_FRACTION * capacity_bytes:
        return None
    options = estimates_by_option(estimate, fp8_allowed=fp8_allowed, max_blocks=max_blocks)
    totals = {opt: est.total_bytes for opt, est in options.items()}
    better = cheapest_fitting(totals, capacity_bytes)
    advice = f"pass {better.flags()}" if better is not None else "no memory option fits: see `ftalk plan-buckets`"
    shape = "x".join(str(v) for v in mine.shape)
    return (
        f"the largest bucket ({shape}) is estimated at {mine.total_gb:.1f} GB per GPU with {chosen.label()}, over "
        f"{RISK_FRACTION:.0%} of the device's {capacity_bytes / 1e9:.0f} GB: {advice}"
    )


def chosen_options(model: ModelConfig) -> MemoryOptions:
    """The memory options a run's config chooses."""
    return MemoryOptions(model.base_weights_dtype, model.activation_offload, model.blocks_to_offload)


def run_estimate(
    train: TrainConfig,
    model_cfg: ModelConfig,
    transformer_config: Mapping[str, Any],
    shape: tuple[int, int, int],
    options: MemoryOptions,
    *,
    strategy: str,
    devices: int,
    cached: frozenset[str] = frozenset(),
    capacity_gb: float | None = None,
    model: str = "",
) -> MemoryEstimate:
    """`estimate_memory` for a run of these `train` and `model_cfg` sections with ``options`` (the encoders the
    feature cache stands for left out); a strategy other than ZeRO/FSDP is estimated as DDP."""
    return estimate_memory(
        transformer_config,
        shape,
        batch_size=train.train_batch_size,
        strategy=strategy if strategy in SHARDING_STRATEGIES else "ddp",  # type: ignore[arg-type]
        devices=devices,
        mixed_precision=train.mixed_precision,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        low_vram=model_cfg.low_vram,
        vae_mini_batch=model_cfg.vae_mini_batch,
        capacity_gb=capacity_gb,
        model=model,
        encoders=encoders_in_use(cached),
        vae_encode="video" not in cached,
        base_weights_dtype=options.base_weights_dtype,
        activation_offload=options.activation_offload,
        blocks_to_offload=options.blocks_to_offload,
        trainable_modules=model_cfg.trainable_modules,
        lora=(model_cfg.lora_rank, model_cfg.lora_target_modules) if model_cfg.lora_rank else None,
    )


def search_space(strategy: str, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """`estimates_by_option`'s keywords for ``strategy``: fp8 and 0..all blocks offloaded where they are allowed."""
    blocks = int(transformer_config.get("num_layers", 0)) if strategy not in BLOCK_OFFLOAD_REFUSED else 0
    return {"fp8_allowed": strategy not in FP8_REFUSED, "max_blocks": blocks}
